"""`--mode=summary`: what a config builds, before spending any compute on it.

Builds the encoder abstractly (no weights are materialised), then reports the parameter count
per module, FLOPs per sample for each frame bucket, the mesh, the sharding of every parameter and
the per-device memory of parameters and optimiser state. Unless `summary.compile` is False, it
then lowers and compiles every bucket ahead of time on abstract inputs and reports XLA's memory
and cost analysis:
  summary.step="train"    the full train step (`train/step.py`: forward, every bank term with its
                          partial-FC logits, the contrastive term, backward, AdamW), jitted with
                          the training loop's shardings and donation, against banks of
                          `cluster.num_clusters` classes and `data.max_boxes` boxes per example
                          (0: no region terms); beside it, each target accelerator of `TARGETS`:
                          whether the per-device total fits its HBM, and the step time at 50%
                          model-FLOP utilisation
  summary.step="forward"  the encoder's forward pass only
`summary.devices=N` compiles for N simulated devices (fake CPU devices, in a child process when
this one has another count) laid out as `config.mesh`, e.g. 64 for a v5p-128 slice
(docs/scaling.md). Everything is also written to `<workdir>/summary.json`.
"""

import dataclasses
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from univit_jax import atomic, config_lib, losses, optim, sharding, specs
from univit_jax.data import pipeline
from univit_jax.models import vit
from univit_jax.run_config import data_config
from univit_jax.train import labels as labels_lib
from univit_jax.train import state as state_lib
from univit_jax.train import step as step_lib

STEPS = ("train", "forward")
# The batch fields the train step reads besides the labels (as the training loop passes them).
_STEP_INPUTS = ("frames", "positions", "frame_mask", "boxes")
# Model-FLOP utilisation at which `step_seconds` is estimated.
MFU = 0.5


@dataclasses.dataclass(frozen=True)
class Target:
  """An accelerator the compiled step is compared with: HBM per chip (bytes) and peak dense bf16
  FLOP/s per chip."""
  hbm_bytes: int
  peak_flops: float


# Google Cloud TPU docs (v5e, v5p, v6e pages: "HBM capacity", "Peak compute per chip (bf16)");
# NVIDIA's H100 SXM datasheet (80 GB; bf16 1,979 TFLOP/s with 2:4 sparsity, 989 dense).
TARGETS = {
  "TPU v5e": Target(16 * 2**30, 197e12),
  "TPU v5p": Target(95 * 2**30, 459e12),
  "TPU v6e": Target(32 * 2**30, 918e12),
  "H100": Target(80 * 2**30, 989e12),
}


@dataclasses.dataclass(frozen=True)
class Options:
  """Typed view of `config.summary`.

  Attributes:
    compile: lower and compile every bucket.
    step: what is compiled, one of STEPS.
    devices: simulated device count (0: this process's devices).
  """
  compile: bool
  step: str
  devices: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Options":
    """Raises:
      config_lib.ConfigError: naming the field.
    """
    s = config.summary
    if s.step not in STEPS:
      raise config_lib.ConfigError(f"summary.step={s.step!r}: expected one of {STEPS}")
    if s.devices < 0:
      raise config_lib.ConfigError(
        f"summary.devices={s.devices} must be >= 0 (0: this process's devices)")
    return cls(compile=bool(s.compile), step=str(s.step), devices=int(s.devices))


def forward_flops(cfg: config_lib.ModelConfig, num_frames: int, image_size: int) -> float:
  """Analytic forward FLOPs of one sample (a multiply-add counts 2), pooling head included."""
  n = num_frames * (image_size // cfg.patch_size) ** 2
  d, m = cfg.width, cfg.mlp_dim
  patch = 2 * n * cfg.patch_size ** 2 * cfg.channels * d
  layer = 2 * n * 4 * d * d + 4 * n * n * d + 4 * n * d * m
  head = 4 * n * d * d + 4 * d * d + 4 * n * d + 4 * d * m
  return float(patch + cfg.depth * layer + head)


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def parameter_rows(state: nnx.State, shardings) -> list[dict]:
  """One row per parameter: path, shape, dtype, logical axes, partition spec, bytes per device."""
  rows = []
  leaves = jax.tree_util.tree_flatten_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for (path, var), sh in zip(leaves, jax.tree.leaves(shardings)):
    shard_shape = sh.shard_shape(var.shape)
    rows.append(dict(
      path=_path(path), shape=tuple(var.shape), dtype=str(var.dtype),
      logical=tuple(var.get_metadata().get("out_sharding") or ()), spec=str(sh.spec),
      params=math.prod(var.shape),
      device_bytes=math.prod(shard_shape) * np.dtype(var.dtype).itemsize))
  return rows


def params_by_module(rows: list[dict]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for row in rows:
    top = row["path"].split("/")[0]
    counts[top] = counts.get(top, 0) + row["params"]
  return counts


def _device_bytes(tree, shardings) -> int:
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def compile_bucket(graphdef: nnx.GraphDef, param_shardings, abstract_params: nnx.State,
                   mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict,
                   cfg: config_lib.ModelConfig, num_frames: int) -> dict:
  """Lowers and compiles the sharded forward pass of one bucket; returns XLA's analyses."""
  batch = config_lib.bucket_batch_size(config, num_frames)
  size = config.data.image_size
  frames = jax.ShapeDtypeStruct((batch, num_frames, size, size, cfg.channels), jnp.float32)
  frame_mask = jax.ShapeDtypeStruct((batch, num_frames), jnp.bool_)
  rules = config_lib.MeshConfig.from_config(config).rules

  def forward(params, frames, frame_mask):
    embedding, _ = nnx.merge(graphdef, params)(frames, frame_mask=frame_mask)
    return embedding

  fn = jax.jit(forward, in_shardings=(
    param_shardings, sharding.batch_sharding(mesh, rules, 5), sharding.batch_sharding(mesh, rules, 2)),
    out_shardings=sharding.batch_sharding(mesh, rules, 2))
  start = time.perf_counter()
  compiled = fn.lower(abstract_params, frames, frame_mask).compile()
  return dict(global_batch=batch, **_analysis(compiled, time.perf_counter() - start))


def _analysis(compiled: jax.stages.Compiled, seconds: float) -> dict:
  """XLA's per-device memory and FLOP counts of a compiled program. `total_bytes` is what the
  program holds at its peak by XLA's buffer assignment: arguments, outputs that do not reuse a
  donated argument's buffer, and temporaries."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = dict(
    compile_seconds=round(seconds, 2),
    xla_flops_per_device=float((cost or {}).get("flops", float("nan"))),
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes))
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"])
  return out


def bank_sizes(config: ml_collections.ConfigDict, loss_cfg: config_lib.LossConfig
               ) -> dict[str, int]:
  """Classes of every trained bank, from `cluster.num_clusters` (what clustering will make).

  Raises:
    config_lib.ConfigError: a trained bank without a class count.
  """
  counts = config.cluster.num_clusters
  missing = [name for name in loss_cfg.trained_banks if name not in counts]
  if missing:
    raise config_lib.ConfigError(
      f"cluster.num_clusters gives no class count for the trained banks {missing}")
  return {name: int(counts[name]) for name in loss_cfg.trained_banks}


def step_batch(config: ml_collections.ConfigDict, loss_cfg: config_lib.LossConfig,
               num_frames: int) -> tuple[dict[str, jax.ShapeDtypeStruct], int]:
  """The abstract global batch the train step of a bucket takes, as the training loop builds it
  (`pipeline.example_shapes` and `labels.label_shapes`), and its boxes per example."""
  data_cfg = data_config.DataConfig.from_config(config)
  boxes = data_cfg.max_boxes
  size = config_lib.bucket_batch_size(config, num_frames)
  shapes = pipeline.example_shapes(data_cfg, num_frames, size, boxes > 0)
  batch = {k: v for k, v in shapes.items() if k in _STEP_INPUTS}
  top_k = int(config.cluster.top_k)
  placeholders = {name: labels_lib.BankLabels(
    name=name, centroids=np.zeros((1, 1), np.float32), keys=np.zeros(0, np.int64),
    labels=np.zeros((0, top_k), np.int32), version="") for name in loss_cfg.trained_banks}
  for key, (shape, dtype) in labels_lib.label_shapes(placeholders, num_frames, size, boxes or None,
                                                     loss_cfg.image_labels).items():
    batch[key] = jax.ShapeDtypeStruct(shape, dtype)
  return batch, boxes


def train_flops(cfg: config_lib.ModelConfig, spec: step_lib.StepSpec,
                batch: dict[str, jax.ShapeDtypeStruct], sizes: dict[str, int], image_size: int,
                sample_ratio: float) -> float:
  """Analytic model FLOPs of one train step over the global batch: 3x (forward + backward) the
  encoder passes (two with the shuffled copies of the contrastive term) and the cosine logits of
  every bank term against its sampled classes (`losses.num_sampled_classes`). Rematerialised
  work is not counted (MFU's convention)."""
  b = batch["frames"].shape[0]
  passes = 2 if spec.contrast_granularity else 1
  terms = [(batch["labels_global"], name) for name in labels_lib.GLOBAL_BANKS if name in sizes]
  terms += [(batch[f"labels_segments_{g}"], specs.event_bank_name(g)) for g in spec.segments]
  if spec.has_boxes and specs.OBJECT_BANK in sizes:
    terms.append((batch["labels_regions"], specs.OBJECT_BANK))
  logits = sum(2 * math.prod(labels.shape[:-1]) * cfg.width * losses.num_sampled_classes(
    sizes[name], math.prod(labels.shape), sample_ratio) for labels, name in terms)
  return 3.0 * (passes * b * forward_flops(cfg, spec.num_frames, image_size) + logits)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """What the train step of every bucket shares, built as the training loop builds it.

  Attributes:
    loss: the loss config.
    sizes: classes per trained bank (`bank_sizes`).
    optim: the optimiser config.
    tx: the optimiser.
    graphdef: the model's graph (encoder and banks).
    shardings: the train state's shardings (`state.state_shardings`).
    abstract: the train state as sharded `ShapeDtypeStruct`s.
  """
  loss: config_lib.LossConfig
  sizes: dict[str, int]
  optim: config_lib.OptimConfig
  tx: optax.GradientTransformation
  graphdef: nnx.GraphDef
  shardings: state_lib.TrainState
  abstract: state_lib.TrainState

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, cfg: config_lib.ModelConfig,
            mesh: jax.sharding.Mesh) -> "TrainSetup":
    """Raises:
      config_lib.ConfigError: naming the field (loss section, bank class counts).
    """
    loss = config_lib.loss_config(config)
    sizes = bank_sizes(config, loss)
    optim_cfg = config_lib.OptimConfig.from_config(config)
    tx = optim.make_optimizer(optim_cfg, config.total_steps)
    graphdef, abstract_params = state_lib.abstract_model(cfg, sizes)
    shardings = state_lib.state_shardings(
      abstract_params, tx, mesh, config_lib.MeshConfig.from_config(config).rules)
    return cls(loss=loss, sizes=sizes, optim=optim_cfg, tx=tx, graphdef=graphdef,
               shardings=shardings, abstract=state_lib.abstract_state(cfg, sizes, tx, shardings))

  def bank_rows(self) -> list[dict]:
    """Per bank: classes, partition spec of its centres and their bytes per device (each Adam
    moment takes as much again). A class count the class shards do not divide leaves the bank
    replicated."""
    rows = []
    for name, k in self.sizes.items():
      centres = self.abstract.params["heads"]["banks"][name]["centres"]
      sh = centres.sharding
      rows.append(dict(name=name, classes=k, spec=str(sh.spec), device_bytes=math.prod(
        sh.shard_shape(centres.shape)) * np.dtype(centres.dtype).itemsize))
    return rows


def compile_train_step(config: ml_collections.ConfigDict, cfg: config_lib.ModelConfig,
                       setup: TrainSetup, mesh: jax.sharding.Mesh, num_frames: int) -> dict:
  """Lowers and compiles the train step of one bucket on the abstract state and batch, with the
  training loop's shardings, donation and logits sharding; returns XLA's analyses, the model
  FLOPs of the step and, per target of `TARGETS`, whether it fits and its time at `MFU`."""
  rules = config_lib.MeshConfig.from_config(config).rules
  batch, boxes = step_batch(config, setup.loss, num_frames)
  names = tuple(setup.sizes)
  spec = step_lib.StepSpec.for_bucket(num_frames, names, boxes > 0)
  train_step = step_lib.make_train_step(
    setup.graphdef, setup.tx, optim.learning_rate(setup.optim, config.total_steps), setup.loss,
    spec, sharding.logits_sharding(mesh, rules))
  start = time.perf_counter()
  compiled = step_lib.compile_step(
    train_step, setup.abstract, setup.shardings, batch,
    dict.fromkeys(batch, sharding.batch_sharding(mesh, rules)),
    step_lib.term_weights(setup.loss, 0.0, names), sharding.replicated(mesh))
  out = dict(global_batch=batch["frames"].shape[0], boxes=boxes,
             **_analysis(compiled, time.perf_counter() - start))
  out["model_flops"] = train_flops(cfg, spec, batch, setup.sizes, config.data.image_size,
                                   setup.loss.discrimination.sample_ratio)
  per_device = out["model_flops"] / mesh.size
  out["targets"] = {name: dict(fits=out["total_bytes"] <= t.hbm_bytes,
                               step_seconds=per_device / (MFU * t.peak_flops))
                    for name, t in TARGETS.items()}
  return out


def _gib(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n / 2**10:.1f} KiB"


def run(config: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """Prints the summary of `config` and writes it to `<workdir>/summary.json`.

  Raises:
    config_lib.ConfigError: naming the field, for an invalid model, data, mesh or summary
      section, or (train step) loss section or bank without a class count.
  """
  options = Options.from_config(config)
  cfg = config_lib.validate(config, options.devices or jax.device_count())
  train = options.compile and options.step == "train"
  if train:
    bank_sizes(config, config_lib.loss_config(config))
  if options.devices and options.devices != jax.device_count():
    return _simulated(config, workdir, options.devices)
  devices = jax.devices()
  mesh_cfg = config_lib.MeshConfig.from_config(config)
  mesh = sharding.make_mesh(mesh_cfg, devices)
  graphdef, abstract_params = vit.abstract_encoder(cfg)
  param_shardings = sharding.tree_shardings(abstract_params, mesh, mesh_cfg.rules)
  rows = parameter_rows(abstract_params, param_shardings)
  total = sum(r["params"] for r in rows)
  by_module = params_by_module(rows)

  tx = optim.make_optimizer(config_lib.OptimConfig.from_config(config), config.total_steps)
  opt_state = jax.eval_shape(tx.init, abstract_params)
  # Optimiser moments are trees of the parameters' Variables, so they inherit their axes.
  opt_shardings = sharding.tree_shardings(opt_state, mesh, mesh_cfg.rules)
  param_bytes = sum(r["device_bytes"] for r in rows)
  opt_bytes = _device_bytes(opt_state, opt_shardings)

  summary = dict(
    model=dict(variant=config.model.variant, **{k: v for k, v in vars(cfg).items()
                                                if k != "rope"}, rope=vars(cfg.rope)),
    params_total=total, params_backbone=total - by_module.get("head", 0),
    params_by_module=by_module,
    mesh=dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
    devices=f"{len(devices)} x {devices[0].platform}",
    device_bytes=dict(params=param_bytes, optimizer=opt_bytes),
    buckets={}, parameters=rows)
  frames = config_lib.active_parts(config).frames
  for t in frames:
    summary["buckets"][t] = dict(
      global_batch=config_lib.bucket_batch_size(config, t),
      tokens_per_sample=t * config_lib.tokens_per_frame(
        config.data.image_size, config.model.patch_size),
      gflops_per_sample=forward_flops(cfg, t, config.data.image_size) / 1e9)

  _print_static(summary)
  setup = TrainSetup.build(config, cfg, mesh) if train else None
  if setup:
    summary["banks"] = setup.bank_rows()
    _print_banks(summary["banks"])
  if options.compile:
    if cfg.scan:
      print("(layers are scanned: XLA's flop count covers the loop body once, not depth times)")
    for t in frames:
      summary["buckets"][t].update(
        compile_train_step(config, cfg, setup, mesh, t) if train else
        compile_bucket(graphdef, param_shardings, abstract_params, mesh, config, cfg, t))
      _print_bucket(t, options.step, summary["buckets"][t])
    if train:
      _print_targets(summary["buckets"])
  if workdir:
    atomic.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def _simulated(config: ml_collections.ConfigDict, workdir: str | None, devices: int) -> dict:
  """`run` over `devices` fake CPU devices, in a child process: XLA fixes the host platform's
  device count when JAX starts, and this process's JAX has started.

  The child's programs are analysed, never run, so LLVM's optimisation of their CPU code is
  skipped (a third of the compile time); the HLO passes and the buffer assignment that XLA's
  memory analysis reports are the same.
  """
  flags = re.sub(r"--xla_(force_host_platform_device_count|backend_optimization_level)=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
    f"{flags} --xla_force_host_platform_device_count={devices} "
    "--xla_backend_optimization_level=0").strip(),
    PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
  with tempfile.TemporaryDirectory() as tmp:
    request = os.path.join(tmp, "request.pkl")
    with open(request, "wb") as f:
      pickle.dump((config, workdir), f)
    subprocess.run([sys.executable, "-m", "univit_jax.summary", request], env=env, check=True)
    with open(request + ".out", "rb") as f:
      return pickle.load(f)


def _print_static(s: dict) -> None:
  print(f"UniViT {s['model']['variant']}: {s['params_total']:,} parameters "
        f"({s['params_backbone']:,} backbone, {s['params_total'] - s['params_backbone']:,} "
        "pooling head)")
  for name, n in s["params_by_module"].items():
    print(f"  {name:<12} {n:>14,}")
  print(f"mesh {s['mesh']} over {s['devices']}")
  print(f"{'parameter':<44} {'shape':<20} {'logical axes':<28} {'partition spec'}")
  for r in s["parameters"]:
    print(f"{r['path']:<44} {str(r['shape']):<20} {str(r['logical']):<28} {r['spec']}")
  print(f"per-device memory: parameters {_gib(s['device_bytes']['params'])}, "
        f"optimiser state {_gib(s['device_bytes']['optimizer'])}")
  print(f"{'frames':>6} {'batch':>7} {'tokens':>7} {'GFLOPs/sample (fwd)':>20}")
  for t, b in s["buckets"].items():
    print(f"{t:>6} {b['global_batch']:>7} {b['tokens_per_sample']:>7} "
          f"{b['gflops_per_sample']:>20.3f}")


def _print_bucket(t: int, step: str, b: dict) -> None:
  what = "train step" if step == "train" else "forward"
  print(f"compiled {t:>2}-frame {what} in {b['compile_seconds']:.1f} s: per device "
        f"arguments {_gib(b['argument_bytes'])}, outputs {_gib(b['output_bytes'])} "
        f"({_gib(b['alias_bytes'])} in donated buffers), temporaries {_gib(b['temp_bytes'])}, "
        f"total {_gib(b['total_bytes'])}; XLA flops/device {b['xla_flops_per_device']:.3e}")
  if step == "train":
    print(f"  {b['boxes']} boxes per example; model FLOPs per step {b['model_flops']:.3e}")


def _print_banks(banks: list[dict]) -> None:
  for b in banks:
    print(f"bank {b['name']:<8} {b['classes']:>10,} classes  {b['spec']:<32} "
          f"{_gib(b['device_bytes'])} per device (and as much per Adam moment)")


def _print_targets(buckets: dict) -> None:
  """Per bucket: whether the per-device total fits each target's HBM, and the step time there
  at `MFU`."""
  print(f"per-device total against HBM; step time at {MFU:.0%} MFU")
  heads = "".join(f" {name + ' (' + _gib(t.hbm_bytes) + ')':>22}" for name, t in TARGETS.items())
  print(f"{'frames':>6} {'batch':>7} {'total':>11}{heads}")
  for t, b in buckets.items():
    cells = "".join(f" {'fits' if r['fits'] else 'OOM':>12} {r['step_seconds']:>7.3g} s"
                    for r in b["targets"].values())
    print(f"{t:>6} {b['global_batch']:>7} {_gib(b['total_bytes']):>11}{cells}")


if __name__ == "__main__":
  with open(sys.argv[1], "rb") as request:
    _config, _workdir = pickle.load(request)
  with open(sys.argv[1] + ".out", "wb") as reply:
    pickle.dump(run(_config, _workdir), reply)
