"""`--mode=summary`: what a config builds, before spending any compute on it.

Builds the encoder abstractly (no weights are materialised), then reports the parameter count
per module, FLOPs per sample for each frame bucket, the mesh, the sharding of every parameter and
the per-device memory of parameters and optimiser state. Unless `config.summary.compile` is
False, it then lowers and compiles the sharded forward pass of every bucket and reports XLA's
memory and cost analysis. Everything is also written to `<workdir>/summary.json`.
"""

import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from univit_jax import atomic, config_lib, optim, sharding
from univit_jax.models import vit


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


def compile_bucket(graphdef, param_shardings, abstract_params, mesh, config, cfg, num_frames):
  """Lowers and compiles the sharded forward pass of one bucket; returns XLA's analyses."""
  batch = config_lib.bucket_batch_size(config, num_frames)
  size = config.data.image_size
  frames = jax.ShapeDtypeStruct((batch, num_frames, size, size, cfg.channels), jnp.float32)
  frame_mask = jax.ShapeDtypeStruct((batch, num_frames), jnp.bool_)
  rules = config.sharding_rules

  def forward(params, frames, frame_mask):
    embedding, _ = nnx.merge(graphdef, params)(frames, frame_mask=frame_mask)
    return embedding

  fn = jax.jit(forward, in_shardings=(
    param_shardings, sharding.batch_sharding(mesh, rules, 5), sharding.batch_sharding(mesh, rules, 2)),
    out_shardings=sharding.batch_sharding(mesh, rules, 2))
  start = time.perf_counter()
  compiled = fn.lower(abstract_params, frames, frame_mask).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(
    global_batch=batch, compile_seconds=round(seconds, 2),
    xla_flops_per_device=float((cost or {}).get("flops", float("nan"))),
    argument_bytes=int(memory.argument_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes))


def _gib(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n / 2**10:.1f} KiB"


def run(config: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """Prints the summary of `config` and writes it to `<workdir>/summary.json`."""
  devices = jax.devices()
  cfg = config_lib.validate(config, len(devices))
  mesh = sharding.make_mesh(config, devices)
  graphdef, abstract_params = vit.abstract_encoder(cfg)
  param_shardings = sharding.tree_shardings(abstract_params, mesh, config.sharding_rules)
  rows = parameter_rows(abstract_params, param_shardings)
  total = sum(r["params"] for r in rows)
  by_module = params_by_module(rows)

  tx = optim.make_optimizer(config.optim, config.total_steps)
  opt_state = jax.eval_shape(tx.init, abstract_params)
  # Optimiser moments are trees of the parameters' Variables, so they inherit their axes.
  opt_shardings = sharding.tree_shardings(opt_state, mesh, config.sharding_rules)
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
  if config.summary.compile:
    if cfg.scan:
      print("(layers are scanned: XLA's flop count covers the loop body once, not depth times)")
    for t in frames:
      summary["buckets"][t].update(compile_bucket(
        graphdef, param_shardings, abstract_params, mesh, config, cfg, t))
      _print_bucket(t, summary["buckets"][t])
  if workdir:
    atomic.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


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


def _print_bucket(t: int, b: dict) -> None:
  print(f"compiled {t:>2}-frame forward in {b['compile_seconds']:.1f} s: per device "
        f"arguments {_gib(b['argument_bytes'])}, temporaries {_gib(b['temp_bytes'])}, "
        f"output {_gib(b['output_bytes'])}; XLA flops/device {b['xla_flops_per_device']:.3e}")
