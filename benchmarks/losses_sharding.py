"""How the discrimination loss partitions over a mesh: per-device FLOPs and collectives.

  python -m benchmarks.losses_sharding

Compiles the jitted value-and-gradient of one bank's loss on 8 fake CPU devices, the bank's class
axis sharded over ("fsdp", "model") and the batch over ("data", "fsdp"), with and without pinning
the [N, M] logits to (batch axes, "model"). Reports XLA's per-device FLOP count and the shapes of
the collectives (a bank-sized all-gather would mean the sharding is lost). Prints a table and
writes benchmarks/results/losses_sharding.json.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from univit_jax import atomic, config_lib, losses  # noqa: E402

NUM_CLASSES, DIM, ROWS, LABELS = 8192, 64, 64, 10
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _analyse(kind: str, mesh_shape: tuple[int, int, int], pin_logits: bool) -> dict:
  mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  classes = NamedSharding(mesh, P(("fsdp", "model"), None))
  logits = NamedSharding(mesh, P(("data", "fsdp"), "model")) if pin_logits else None
  cfg = config_lib.DiscriminationConfig(kind=kind)

  def step(e, labels, w):
    f = lambda e, w: losses.discrimination_loss(e, labels, None, w, jax.random.key(0), cfg,
                                                logits)[0]
    return jax.value_and_grad(f, argnums=(0, 1))(e, w)

  compiled = jax.jit(step, in_shardings=(batch, batch, classes),
                     out_shardings=(None, (batch, classes))).lower(
    jax.ShapeDtypeStruct((ROWS, DIM), jnp.float32),
    jax.ShapeDtypeStruct((ROWS, LABELS), jnp.int32),
    jax.ShapeDtypeStruct((NUM_CLASSES, DIM), jnp.float32)).compile()
  text = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  collectives = {op: sorted(set(re.findall(rf"= (\S+?)(?:\{{[^}}]*\}})? {op}(?:-start)?\(", text)))
                 for op in COLLECTIVES}
  return dict(kind=kind, mesh=mesh_shape, pin_logits=pin_logits, flops=cost.get("flops"),
              collectives={op: shapes for op, shapes in collectives.items() if shapes})


def main() -> None:
  rows = [_analyse(kind, mesh, pin)
          for kind in config_lib.LOSS_KINDS
          for mesh in ((1, 1, 8), (2, 2, 2))
          for pin in (False, True)]
  m = losses.num_sampled_classes(NUM_CLASSES, ROWS * LABELS, 0.1)
  print(f"K={NUM_CLASSES} D={DIM} N={ROWS} k={LABELS} M={m}; bank shard "
        f"[K / shards, D], sampled centres [{m}, {DIM}]")
  print(f"{'loss':<14}{'mesh':<11}{'pin logits':<12}{'MFLOP/device':>13}  collectives")
  for r in rows:
    shapes = "; ".join(f"{op} {' '.join(s)}" for op, s in r["collectives"].items())
    print(f"{r['kind']:<14}{str(r['mesh']):<11}{str(r['pin_logits']):<12}"
          f"{r['flops'] / 1e6:>13.2f}  {shapes}")
  out = os.path.join(os.path.dirname(__file__), "results", "losses_sharding.json")
  atomic.write_json(out, dict(num_classes=NUM_CLASSES, dim=DIM, rows=ROWS, labels=LABELS,
                              sampled_classes=m, results=rows))
  print("wrote", out)


if __name__ == "__main__":
  main()
