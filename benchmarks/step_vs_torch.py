"""Train-step speed of our encoder against a PyTorch ViT of the same shapes, and its MFU.

  python benchmarks/step_vs_torch.py                  # this CPU: Ti/16, f32 and bf16
  python benchmarks/step_vs_torch.py --variants=B/16,L/14 --dtypes=bfloat16 \
      --batch=256 --clip_batch=32 --attention=xla,cudnn --univit_step   # a GPU

Three measurements per (variant, frame bucket, compute dtype), back to back in one process:
  ours    `models/vit.UniViT` + a linear classifier, softmax cross-entropy, AdamW
          (weight decay 0.05), `jax.jit` with the state donated; one row per `--attention`.
  torch   a PyTorch module of the same shapes written here (patch projection, sinusoidal time
          embedding, pre-norm, RoPE on q/k, `scaled_dot_product_attention` with the same key mask,
          exact GELU, MAP pooling head, classifier), eager, `torch.optim.AdamW`; bf16 compute is
          `torch.autocast` over float32 parameters, as ours keeps float32 parameters.
  univit  (`--univit_step`) the real UniViT train step (`train/step.py`: every bank term, region
          and segment terms, the structured contrastive loss with its segment-shuffled pass,
          AdamW with the config's recipe) at the variant's pretraining config, banks of
          `--bank_classes` classes.
Buckets: images (T = 1) at `--batch`, and `--clip_frames`-frame clips at `--clip_batch`.

MFU = model FLOPs per step / step time / the matmul peak measured in the same run (a square
`jnp.dot` of `--peak_size` in f32, and in bf16 with f32 accumulation). Model FLOPs are 3x the
analytic forward FLOPs (`summary.forward_flops`, multiply-add = 2; backward = 2x forward), so
remat's recomputation and XLA's elementwise work are not counted as useful; XLA's own count of
the compiled step is printed beside it. Step times are medians over `--steps` timed steps after
`--warmup`. Prints a table and writes benchmarks/results/step_vs_torch_<platform>.json after
every row (a run cut short keeps what it measured).
"""

import dataclasses
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine  # benchmarks/machine.py  # pylint: disable=import-error
from univit_jax import atomic, config_lib, positions as positions_lib, sharding, specs, summary
from univit_jax.models import rope, vit

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["Ti/16"], "model sizes (univit_jax/specs.py)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes (parameters stay float32)")
flags.DEFINE_list("attention", ["xla"], "our self-attention implementations (config_lib)")
flags.DEFINE_bool("scan", False, "scan our classifier's layers (as the pretraining configs do; "
                  "compiles faster, and XLA's FLOP count then covers one layer)")
flags.DEFINE_integer("image_size", 224, "frame side in pixels")
flags.DEFINE_integer("batch", 32, "images per step")
flags.DEFINE_integer("clip_frames", 8, "frames of the clip bucket (0: images only)")
flags.DEFINE_integer("clip_batch", 4, "clips per step")
flags.DEFINE_integer("classes", 1000, "classifier outputs")
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_integer("warmup", 3, "untimed steps (the first compiles)")
flags.DEFINE_integer("peak_size", 2048, "side of the square matmul that measures the peak")
flags.DEFINE_bool("torch", True, "also time the PyTorch peer (needs torch installed)")
flags.DEFINE_bool("univit_step", False, "also time the full UniViT train step")
flags.DEFINE_integer("bank_classes", 100_000, "classes per bank of the UniViT step")
flags.DEFINE_integer("threads", 0, "torch intra-op threads on CPU (0: torch's default)")
flags.DEFINE_string("out", "", "JSON path (default benchmarks/results/step_vs_torch_<platform>"
                    ".json)")


def median_time(fn, steps: int, warmup: int) -> tuple[float, float]:
  """(seconds of the first call, median seconds of `steps` calls after `warmup` calls);
  `fn` must block until its work is done."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def matmul_peak(size: int, dtype: str, steps: int = 10) -> float:
  """FLOP/s of a square `jnp.dot` (bf16 inputs accumulate in f32)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  _, seconds = median_time(lambda: dot(a, b).block_until_ready(), steps, 2)
  return 2 * size ** 3 / seconds


def model_config(variant: str, dtype: str, attention: str = "xla", scan: bool = False
                 ) -> config_lib.ModelConfig:
  return config_lib.ModelConfig(**specs.decode_variant(variant), dtype=dtype,
                                attention=attention, scan=scan)


class Classifier(nnx.Module):
  """The encoder and a linear classifier on its embedding."""

  def __init__(self, cfg: config_lib.ModelConfig, classes: int, *, rngs: nnx.Rngs):
    self.encoder = vit.UniViT(cfg, rngs=rngs)
    self.head = nnx.Linear(cfg.width, classes, rngs=rngs)

  def __call__(self, frames: jax.Array) -> jax.Array:
    embedding, _ = self.encoder(frames)
    return self.head(embedding)


def compile_ours(cfg: config_lib.ModelConfig, frames: np.ndarray, labels: np.ndarray,
                 classes: int) -> tuple[jax.stages.Compiled, Callable[[], None], float]:
  """Our classifier's train step, jitted with the state donated: (the compiled step, a function
  that runs one step on `frames` and `labels` and blocks until its loss is ready, compile
  seconds)."""
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(Classifier(cfg, classes, rngs=nnx.Rngs(0)))
  tx = optax.adamw(1e-4, weight_decay=0.05)
  opt_state = tx.init(params)

  def step(params, opt_state, frames, labels):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(frames)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  frames, labels = jnp.asarray(frames), jnp.asarray(labels)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
    params, opt_state, frames, labels).compile()
  compile_seconds = time.perf_counter() - start
  state = [params, opt_state]

  def run():
    state[0], state[1], loss = compiled(state[0], state[1], frames, labels)
    loss.block_until_ready()

  return compiled, run, compile_seconds


def time_ours(cfg: config_lib.ModelConfig, frames: np.ndarray, labels: np.ndarray,
              classes: int, steps: int, warmup: int) -> dict:
  """Median step time of our classifier step; XLA's FLOP count of the compiled step."""
  compiled, run, compile_seconds = compile_ours(cfg, frames, labels, classes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  _, seconds = median_time(run, steps, warmup)
  return dict(seconds=seconds, compile_seconds=compile_seconds,
              xla_flops=float((cost or {}).get("flops", float("nan"))))


def time_univit_step(variant: str, dtype: str, attention: str, image_size: int,
                     num_frames: int, batch: int, bank_classes: int, steps: int,
                     warmup: int) -> dict:
  """Median time of the real UniViT train step (`train/step.py`) on one device."""
  # Imported here: the train package pulls in the data pipeline, which only this row needs.
  from univit_jax import optim  # pylint: disable=import-outside-toplevel
  from univit_jax.train import labels as labels_lib  # pylint: disable=import-outside-toplevel
  from univit_jax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from univit_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  config = config_lib.pretraining_config(None, variant=variant, tokens_per_batch=1)
  config.model.dtype, config.model.attention = dtype, attention
  config.data.image_size = image_size
  cfg = config_lib.model_config(config)
  loss_cfg = config_lib.loss_config(config)
  banks = loss_cfg.trained_banks
  sizes = dict.fromkeys(banks, bank_classes)
  mesh_cfg = config_lib.MeshConfig.from_config(config)
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
  rules = mesh_cfg.rules
  tx = optim.make_optimizer(config_lib.OptimConfig.from_config(config), 1000)
  graphdef, abstract_params = state_lib.abstract_model(cfg, sizes)
  shardings = state_lib.state_shardings(abstract_params, tx, mesh, rules)
  state = state_lib.create_state(cfg, sizes, {}, tx, shardings, 0)

  boxes = config.data.max_boxes if num_frames == 1 else 0
  spec = step_lib.StepSpec.for_bucket(num_frames, banks, bool(boxes))
  size, top_k = config.data.image_size, int(config.cluster.top_k)
  grid = size // cfg.patch_size
  rng = np.random.default_rng(0)
  positions = positions_lib.grid_positions(
    positions_lib.frame_times(num_frames, cfg.rope.virtual_frames), grid, grid)
  batch_arrays = dict(
    frames=rng.standard_normal((batch, num_frames, size, size, 3), np.float32),
    positions=np.broadcast_to(positions, (batch,) + positions.shape).astype(np.float32),
    frame_mask=np.ones((batch, num_frames), bool))
  if boxes:
    ys, xs = np.sort(rng.uniform(size=(2, batch, boxes, 2)), axis=-1).astype(np.float32)
    batch_arrays["boxes"] = np.stack([ys[..., 0], xs[..., 0], ys[..., 1], xs[..., 1]], -1)
  for key, (shape, dt) in labels_lib.label_shapes(banks, top_k, num_frames, batch,
                                                  boxes or None).items():
    if dt == np.bool_:
      batch_arrays[key] = np.ones(shape, bool)
    elif key == "global_bank":
      index = labels_lib.GLOBAL_BANKS.index(
        specs.OBJECT_BANK if num_frames == 1 else specs.event_bank_name(1))
      batch_arrays[key] = np.full(shape, index, np.int32)
    else:
      batch_arrays[key] = rng.integers(0, bank_classes, shape, dtype=np.int32)
  replicated = sharding.replicated(mesh)
  weights = step_lib.term_weights(loss_cfg, 0.5, banks)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_arrays.items()}
  start = time.perf_counter()
  compiled = step_lib.compile_step(
    step_lib.make_train_step(graphdef, tx, optax.constant_schedule(1e-3), loss_cfg, spec),
    jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state),
    shardings, abstract_batch, dict.fromkeys(abstract_batch, replicated), weights, replicated)
  compile_seconds = time.perf_counter() - start
  device_batch = {k: jax.device_put(v, replicated) for k, v in batch_arrays.items()}
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], device_batch, weights)
    metrics["loss"].block_until_ready()

  _, seconds = median_time(run, steps, warmup)
  # Useful work: two encoder passes when the contrastive term shuffles segments; the bank
  # logits (every pooled query against K centres) come on top of the encoder's FLOPs.
  passes = 2 if spec.contrast_granularity else 1
  pooled = 1 + sum(spec.segments) + boxes
  bank_flops = 2 * batch * pooled * bank_classes * cfg.width
  flops = 3 * (passes * batch * summary.forward_flops(cfg, num_frames, size) + bank_flops)
  return dict(seconds=seconds, compile_seconds=compile_seconds, model_flops=flops)


# ---------------------------------------------------------------------------------------------
# The PyTorch peer.


def torch_vit(cfg: config_lib.ModelConfig, classes: int, num_frames: int, grid: int):
  """A PyTorch module computing what `Classifier` computes, with the same shapes."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  from torch.nn import functional as F  # pylint: disable=import-outside-toplevel

  d, heads, head_dim = cfg.width, cfg.num_heads, cfg.head_dim
  positions = positions_lib.grid_positions(
    positions_lib.frame_times(num_frames, cfg.rope.virtual_frames), grid, grid)
  angles = np.asarray(rope.rope_angles(
    jnp.asarray(positions), head_dim, cfg.rope.mode, cfg.rope.base, cfg.rope.split,
    None, cfg.rope.temporal_span, cfg.rope.virtual_frames))  # [N, P]
  time_feats = np.asarray(vit.time_features(jnp.asarray(positions[:, 0]),
                                            cfg.rope.virtual_frames))

  class Mlp(nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.fc2 = nn.Linear(d, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, d)

    def forward(self, x):
      return self.fc2(F.gelu(self.fc1(x)))

  def rotate(x, cos, sin):  # x [B, H, N, K]: pairs (2i, 2i + 1) as in rope.apply_rope
    pairs = cos.shape[-1]
    x1, x2 = x[..., 0:2 * pairs:2], x[..., 1:2 * pairs:2]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., 2 * pairs:]], dim=-1)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
      self.qkv, self.out, self.mlp = nn.Linear(d, 3 * d), nn.Linear(d, d), Mlp()

    def forward(self, x, cos, sin, mask):
      b, n, _ = x.shape
      q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
      q, k = rotate(q, cos, sin), rotate(k, cos, sin)
      y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
      x = x + self.out(y.transpose(1, 2).reshape(b, n, d))
      return x + self.mlp(self.norm2(x))

  class MapHead(nn.Module):
    def __init__(self):
      super().__init__()
      self.probe = nn.Parameter(torch.randn(1, 1, d) * d ** -0.5)
      self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
      self.norm, self.mlp = nn.LayerNorm(d, eps=1e-6), Mlp()

    def forward(self, x, mask):
      b, n, _ = x.shape
      q = self.q(self.probe.expand(b, 1, d)).view(b, 1, heads, head_dim).transpose(1, 2)
      k, v = self.kv(x).view(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
      y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
      y = self.out(y.transpose(1, 2).reshape(b, 1, d))
      return (y + self.mlp(self.norm(y)))[:, 0]

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      p = cfg.patch_size
      self.p = p
      self.patch = nn.Linear(p * p * cfg.channels, d, bias=False)
      self.time = nn.Linear(time_feats.shape[-1], d, bias=False)
      self.norm_pre, self.norm_post = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
      self.blocks = nn.ModuleList([Block() for _ in range(cfg.depth)])
      self.head, self.classifier = MapHead(), nn.Linear(d, classes)
      self.register_buffer("cos", torch.from_numpy(np.cos(angles)))
      self.register_buffer("sin", torch.from_numpy(np.sin(angles)))
      self.register_buffer("time_feats", torch.from_numpy(np.array(time_feats)))

    def forward(self, frames, token_mask):  # frames [B, T, H, W, C], token_mask [B, N] bool
      b, t, h, w, c = frames.shape
      p = self.p
      x = frames.reshape(b, t, h // p, p, w // p, p, c).permute(0, 1, 2, 4, 3, 5, 6)
      x = self.patch(x.reshape(b, t * (h // p) * (w // p), p * p * c))
      x = self.norm_pre(x + self.time(self.time_feats))
      mask = token_mask[:, None, None, :]
      for block in self.blocks:
        x = block(x, self.cos, self.sin, mask)
      return self.classifier(self.head(self.norm_post(x), mask))

  return Model()


def time_torch(cfg: config_lib.ModelConfig, frames: np.ndarray, labels: np.ndarray,
               classes: int, steps: int, warmup: int) -> dict:
  """Median step time of the PyTorch peer (eager, AdamW, autocast for bf16)."""
  import torch  # pylint: disable=import-outside-toplevel

  device = "cuda" if torch.cuda.is_available() else "cpu"
  grid = frames.shape[2] // cfg.patch_size
  model = torch_vit(cfg, classes, frames.shape[1], grid).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
  x = torch.from_numpy(frames).to(device)
  y = torch.from_numpy(labels.astype(np.int64)).to(device)
  token_mask = torch.ones(x.shape[0], x.shape[1] * grid * grid, dtype=torch.bool, device=device)
  autocast = cfg.dtype == "bfloat16"

  def run():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      loss = torch.nn.functional.cross_entropy(model(x, token_mask), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device == "cuda":
      torch.cuda.synchronize()
    else:
      loss.item()

  _, seconds = median_time(run, steps, warmup)
  del model, opt, x, y
  if device == "cuda":
    torch.cuda.empty_cache()  # leave the device memory to JAX's rows
  return dict(seconds=seconds, torch=torch.__version__, torch_device=device)


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Bucket:
  num_frames: int
  batch: int


def main(argv):
  del argv
  backend = jax.default_backend()
  device = jax.devices()[0]
  out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"step_vs_torch_{backend}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  have_torch = False
  if FLAGS.torch:
    try:
      import torch  # pylint: disable=import-outside-toplevel
      have_torch = True
      if FLAGS.threads and backend == "cpu":
        torch.set_num_threads(FLAGS.threads)
    except ImportError:
      print("torch is not installed: pip install -r requirements-bench.txt (ours only)")

  peaks = {dt: matmul_peak(FLAGS.peak_size, dt) for dt in FLAGS.dtypes}
  result = dict(
    backend=backend, device=getattr(device, "device_kind", str(device)),
    machine=machine.describe(),
    flags={k: FLAGS[k].value for k in (
      "variants", "dtypes", "attention", "scan", "image_size", "batch", "clip_frames",
      "clip_batch", "classes", "steps", "warmup", "peak_size", "univit_step", "bank_classes")},
    peak_flops={dt: round(p) for dt, p in peaks.items()}, rows=[])
  print(f"{backend} ({result['device']}), jax {jax.__version__}; matmul peak "
        + ", ".join(f"{dt} {p / 1e12:.3f} TFLOP/s" for dt, p in peaks.items()), flush=True)

  buckets = [Bucket(1, FLAGS.batch)]
  if FLAGS.clip_frames:
    buckets.append(Bucket(FLAGS.clip_frames, FLAGS.clip_batch))
  rng = np.random.default_rng(0)
  size = FLAGS.image_size

  def record(row: dict) -> None:
    result["rows"].append(row)
    atomic.write_json(out, result)
    samples = row.get("samples_per_s")
    print(f"{row['variant']:>6} T={row['frames']:<2} b={row['batch']:<4} {row['dtype']:>8} "
          f"{row['impl']:<13} " + (
            f"{row['seconds'] * 1e3:9.1f} ms  {samples:8.1f} samples/s  "
            f"MFU {row['mfu']:6.1%}" + (f"  x torch {row['vs_torch']:.2f}"
                                        if "vs_torch" in row else "")
            if samples else f"failed: {row['error']}"), flush=True)

  for variant in FLAGS.variants:
    for bucket in buckets:
      frames = rng.standard_normal((bucket.batch, bucket.num_frames, size, size, 3),
                                   np.float32)
      labels = rng.integers(0, FLAGS.classes, bucket.batch).astype(np.int32)
      for dtype in FLAGS.dtypes:
        cfg = model_config(variant, dtype)
        flops = 3 * bucket.batch * summary.forward_flops(cfg, bucket.num_frames, size)
        base = dict(variant=variant, frames=bucket.num_frames, batch=bucket.batch, dtype=dtype,
                    model_flops=flops)

        def finish(row: dict, seconds: float) -> dict:
          row.update(seconds=seconds, samples_per_s=row["batch"] / seconds,
                     mfu=row["model_flops"] / seconds / peaks[row["dtype"]])
          return row

        torch_seconds = None
        if have_torch:
          try:
            timed = time_torch(cfg, frames, labels, FLAGS.classes, FLAGS.steps, FLAGS.warmup)
            torch_seconds = timed.pop("seconds")
            record(finish(dict(base, impl="torch", **timed), torch_seconds))
          except Exception as e:  # pylint: disable=broad-except
            traceback.print_exc()
            record(dict(base, impl="torch", error=f"{type(e).__name__}: {e}"))
        for attention in FLAGS.attention:
          impl = f"ours-{attention}"
          try:
            timed = time_ours(model_config(variant, dtype, attention, FLAGS.scan), frames,
                              labels, FLAGS.classes, FLAGS.steps, FLAGS.warmup)
            row = finish(dict(base, impl=impl, **timed), timed.pop("seconds"))
            if torch_seconds:
              row["vs_torch"] = torch_seconds / row["seconds"]
            record(row)
          except Exception as e:  # pylint: disable=broad-except
            traceback.print_exc()
            record(dict(base, impl=impl, error=f"{type(e).__name__}: {e}"))
        if FLAGS.univit_step:
          attention = FLAGS.attention[-1]
          try:
            timed = time_univit_step(variant, dtype, attention, size, bucket.num_frames,
                                     bucket.batch, FLAGS.bank_classes, FLAGS.steps,
                                     FLAGS.warmup)
            row = dict(base, impl=f"univit-{attention}", **timed)
            record(finish(row, row.pop("seconds")))
          except Exception as e:  # pylint: disable=broad-except
            traceback.print_exc()
            record(dict(base, impl=f"univit-{attention}", error=f"{type(e).__name__}: {e}"))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
