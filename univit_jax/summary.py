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
                          model-FLOP utilisation. Compiled or not, a line per bank gives its
                          centres' sharding and bytes per device, and says when the mesh's
                          class shards do not divide its class count, which leaves the bank
                          whole on every device
  summary.step="forward"  the encoder's forward pass only
`summary.devices=N` compiles for N simulated devices (fake CPU devices, in a child process when
this one has another count) laid out as `config.mesh`, e.g. 64 for a v5p-128 slice
(docs/scaling.md): `main` builds the run's sections for N devices, and `run` compiles for the
devices they were built for. Everything is also written to `<workdir>/summary.json`.
"""

import dataclasses
import json
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
import numpy as np
import optax
from flax import nnx

from univit_jax import atomic, collectives, config_lib, losses, optim, run_config, sharding
from univit_jax import specs
from univit_jax.clustering import labels as cluster_labels
from univit_jax.models import vit
from univit_jax.train import labels as labels_lib
from univit_jax.train import state as state_lib
from univit_jax.train import step as step_lib

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
  """One row per parameter (`nnx.Param`; statistics such as the running mean embeddings,
  `vit.EmbeddingCenter`, are left out): path, shape, dtype, logical axes, partition spec, bytes
  per device. `shardings` is `state`'s tree of shardings."""
  rows = []
  leaves = jax.tree_util.tree_flatten_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  for (path, var), sh in zip(leaves, jax.tree.leaves(shardings)):
    if not isinstance(var, nnx.Param):
      continue
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
                   mesh: jax.sharding.Mesh, run: run_config.RunConfig, num_frames: int) -> dict:
  """Lowers and compiles the sharded forward pass of one bucket, its activations pinned as in
  training (`sharding.activation_sharding`); returns XLA's analyses."""
  batch = run.data.batch_sizes()[num_frames]
  size = run.data.image_size
  frames = jax.ShapeDtypeStruct((batch, num_frames, size, size, run.model.channels), jnp.float32)
  frame_mask = jax.ShapeDtypeStruct((batch, num_frames), jnp.bool_)
  rules = run.mesh.rules
  activations = sharding.activation_sharding(mesh, rules)

  def forward(params, frames, frame_mask):
    embedding, _ = nnx.merge(graphdef, params)(frames, frame_mask=frame_mask,
                                               activation_sharding=activations)
    return embedding

  fn = jax.jit(forward, out_shardings=sharding.batch_sharding(mesh, rules, 2), in_shardings=(
    param_shardings, sharding.batch_sharding(mesh, rules, 5),
    sharding.batch_sharding(mesh, rules, 2)))
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


def bank_sizes(run: run_config.RunConfig) -> dict[str, int]:
  """Classes of every trained bank, from `cluster.num_clusters` (what clustering will make).

  Raises:
    config_lib.ConfigError: a trained bank without a class count.
  """
  counts = dict(run.cluster.num_clusters)
  missing = [name for name in run.loss.trained_banks if name not in counts]
  if missing:
    raise config_lib.ConfigError(
      f"cluster.num_clusters gives no class count for the trained banks {missing}")
  return {name: counts[name] for name in run.loss.trained_banks}


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
    sizes: classes per trained bank (`bank_sizes`).
    top_k: labels per row of the trained banks (`cluster.top_k`, as clustering writes them).
    class_shards: ways the banks' class axis is split over the mesh.
    tx: the optimiser.
    graphdef: the model's graph (encoder and banks).
    shardings: the train state's shardings (`state.state_shardings`).
    abstract: the train state as sharded `ShapeDtypeStruct`s.
  """
  sizes: dict[str, int]
  top_k: int
  class_shards: int
  tx: optax.GradientTransformation
  graphdef: nnx.GraphDef
  shardings: state_lib.TrainState
  abstract: state_lib.TrainState

  @classmethod
  def build(cls, run: run_config.RunConfig, mesh: jax.sharding.Mesh) -> "TrainSetup":
    """Raises:
      config_lib.ConfigError: a trained bank without a class count.
      lloyd.KMeansError: naming the bank and field, for an invalid `cluster` section.
    """
    sizes = bank_sizes(run)
    cluster = cluster_labels.cluster_specs(run.cluster)
    tx = optim.make_optimizer(run.optim, run.train.total_steps)
    graphdef, abstract_params = state_lib.abstract_model(run.model, sizes)
    shardings = state_lib.state_shardings(abstract_params, tx, mesh, run.mesh.rules)
    return cls(sizes=sizes, top_k=max(cluster[name].top_k for name in sizes),
               class_shards=run.mesh.shards("classes", mesh.size), tx=tx, graphdef=graphdef,
               shardings=shardings,
               abstract=state_lib.abstract_state(run.model, sizes, tx, shardings))

  def bank_rows(self) -> list[dict]:
    """Per bank: classes, partition spec of its centres and their bytes per device (each Adam
    moment takes as much again), and `replicated`, why it is kept whole on every device (a
    class count the class shards do not divide; `config_lib.replicated_bank`) or None."""
    rows = []
    for name, k in self.sizes.items():
      centres = self.abstract.params["heads"]["banks"][name]["centres"]
      sh = centres.sharding
      rows.append(dict(
        name=name, classes=k, spec=str(sh.spec), device_bytes=math.prod(
          sh.shard_shape(centres.shape)) * np.dtype(centres.dtype).itemsize,
        replicated=config_lib.replicated_bank(name, k, self.class_shards)))
    return rows


def compile_train_step(run: run_config.RunConfig, setup: TrainSetup, mesh: jax.sharding.Mesh,
                       num_frames: int) -> dict:
  """Lowers and compiles the train step of one bucket on the abstract state and batch, with the
  training loop's shardings, donation, logits and activation shardings; returns XLA's
  analyses, the model FLOPs of the step and, per target of `TARGETS`, whether it fits and its
  time at `MFU`. The batch carries `data.max_boxes` boxes per example (0: none)."""
  rules = run.mesh.rules
  names = tuple(setup.sizes)
  boxes = run.data.max_boxes
  spec = step_lib.StepSpec.for_bucket(num_frames, names, boxes > 0)
  batch = step_lib.abstract_batch(run.data, spec, run.data.batch_sizes()[num_frames],
                                  setup.top_k, run.loss.image_labels)
  train_step = step_lib.make_train_step(
    setup.graphdef, setup.tx, optim.learning_rate(run.optim, run.train.total_steps), run.loss,
    spec, sharding.logits_sharding(mesh, rules), sharding.activation_sharding(mesh, rules))
  start = time.perf_counter()
  compiled = step_lib.compile_step(
    train_step, setup.abstract, setup.shardings, batch,
    dict.fromkeys(batch, sharding.batch_sharding(mesh, rules)),
    step_lib.term_weights(run.loss, 0.0, names), sharding.replicated(mesh))
  out = dict(global_batch=batch["frames"].shape[0], boxes=boxes,
             **_analysis(compiled, time.perf_counter() - start))
  out["model_flops"] = train_flops(run.model, spec, batch, setup.sizes, run.data.image_size,
                                   run.loss.discrimination.sample_ratio)
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


def run(run: run_config.RunConfig, workdir: str | None) -> dict:
  """Prints the summary of `run` on the `run.num_devices` devices its sections were built for
  and writes it to `<workdir>/summary.json`. With `summary.step="train"` it also lists the
  class banks (`TrainSetup.bank_rows`), compiled or not.

  Every process computes the summary (compiling takes part in its collectives); process 0 alone
  writes summary.json, and the others wait for it at the `summary done` barrier.

  Raises:
    config_lib.ConfigError: naming the field, for a trained bank without a class count (the
      train step).
    lloyd.KMeansError: naming the bank and field, for an invalid `cluster` section (the train
      step: its labels per row).
  """
  if run.summary.step == "train":
    bank_sizes(run)
  summary = _simulated(run) if run.num_devices != jax.device_count() else summarise(run)
  if workdir and jax.process_index() == 0:
    atomic.write_json(os.path.join(workdir, "summary.json"), summary)
  collectives.barrier("summary done")
  return summary


def for_accelerators(run: run_config.RunConfig) -> run_config.RunConfig:
  """`run` with `model.dtype="auto"` resolved as on an accelerator (bfloat16): the summary
  sizes the step for the accelerators of `TARGETS`, also when it compiles on (simulated) CPU
  devices, where the run's own sections resolve it to float32."""
  dtype = config_lib.resolve_compute_dtype(run.record["model"]["dtype"], platform="tpu")
  return dataclasses.replace(run, model=dataclasses.replace(run.model, dtype=dtype))


def summarise(run: run_config.RunConfig) -> dict:
  """The summary `run` prints and returns, on this process's devices (the `run.num_devices` its
  sections were built for), for the accelerators of `TARGETS` (`for_accelerators`)."""
  run = for_accelerators(run)
  options, cfg = run.summary, run.model
  train = options.step == "train"
  devices = jax.devices()
  mesh = sharding.make_mesh(run.mesh, devices)
  graphdef, abstract_params = vit.abstract_encoder(cfg)
  param_shardings = sharding.tree_shardings(abstract_params, mesh, run.mesh.rules)
  rows = parameter_rows(abstract_params, param_shardings)
  total = sum(r["params"] for r in rows)
  by_module = params_by_module(rows)

  tx = optim.make_optimizer(run.optim, run.train.total_steps)
  opt_state = jax.eval_shape(tx.init, abstract_params)
  # Optimiser moments are trees of the parameters' Variables, so they inherit their axes.
  opt_shardings = sharding.tree_shardings(opt_state, mesh, run.mesh.rules)
  param_bytes = sum(r["device_bytes"] for r in rows)
  opt_bytes = _device_bytes(opt_state, opt_shardings)

  summary = dict(
    model=dict(variant=run.record["model"]["variant"],
               **{k: v for k, v in vars(cfg).items() if k != "rope"}, rope=vars(cfg.rope)),
    params_total=total, params_backbone=total - by_module.get("head", 0),
    params_by_module=by_module,
    mesh=dict(zip(mesh.axis_names, (int(s) for s in mesh.devices.shape))),
    devices=f"{len(devices)} x {devices[0].platform}",
    device_bytes=dict(params=param_bytes, optimizer=opt_bytes),
    buckets={}, parameters=rows)
  batch_sizes = run.data.batch_sizes()
  for t in run.parts.frames:
    summary["buckets"][t] = dict(
      global_batch=batch_sizes[t],
      tokens_per_sample=t * config_lib.tokens_per_frame(run.data.image_size, cfg.patch_size),
      gflops_per_sample=forward_flops(cfg, t, run.data.image_size) / 1e9)

  _print_static(summary)
  setup = TrainSetup.build(run, mesh) if train else None
  if setup:
    summary["banks"] = setup.bank_rows()
    _print_banks(summary["banks"])
  if options.compile:
    if cfg.scan:
      print("(layers are scanned: XLA's flop count covers the loop body once, not depth times)")
    for t in run.parts.frames:
      summary["buckets"][t].update(
        compile_train_step(run, setup, mesh, t) if train else
        compile_bucket(graphdef, param_shardings, abstract_params, mesh, run, t))
      _print_bucket(t, options.step, summary["buckets"][t])
    if train:
      _print_targets(summary["buckets"])
  return summary


def _simulated(run: run_config.RunConfig) -> dict:
  """`run` over `run.num_devices` fake CPU devices, in a child process: XLA fixes the host
  platform's device count when JAX starts, and this process's JAX has started. The child is
  given the run's `record` and rebuilds its sections for its devices.

  The child's programs are analysed, never run, so LLVM's optimisation of their CPU code is
  skipped (a third of the compile time); the HLO passes and the buffer assignment that XLA's
  memory analysis reports are the same.
  """
  flags = re.sub(r"--xla_(force_host_platform_device_count|backend_optimization_level)=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
    f"{flags} --xla_force_host_platform_device_count={run.num_devices} "
    "--xla_backend_optimization_level=0").strip(),
    PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
  with tempfile.TemporaryDirectory() as tmp:
    request = os.path.join(tmp, "request.json")
    with open(request, "w") as f:
      json.dump(dict(record=run.record), f)
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
    if b["replicated"]:
      print(f"  replicated: {b['replicated']}")


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
  with open(sys.argv[1]) as request:
    _request = json.load(request)
  _summary = summarise(run_config.from_record(_request["record"], jax.device_count()))
  with open(sys.argv[1] + ".out", "wb") as reply:
    pickle.dump(_summary, reply)
