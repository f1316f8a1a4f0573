"""Speed of one bank's discrimination loss (forward + gradients) and of the structured contrast.

  python -m benchmarks.losses_bench [--classes 100000 --dim 256 --rows 512 --repeats 5]

Prints a table and writes benchmarks/results/losses_<backend>.json. Each entry is the median of
`repeats` timed calls of the jitted value-and-gradient, after one compile-and-run call.
"""

import argparse
import os
import statistics
import time

import jax
import numpy as np

import machine  # benchmarks/machine.py  # pylint: disable=import-error
from univit_jax import atomic, config_lib, losses


def _time(fn, *args, repeats: int) -> tuple[float, float]:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--classes", type=int, default=100_000)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--rows", type=int, default=512)
  parser.add_argument("--labels", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  emb = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
  bank = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
  labels = rng.integers(0, args.classes, size=(args.rows, args.labels)).astype(np.int32)
  targets = (rng.random((args.rows, args.rows)) > 0.9).astype(np.float32)
  key = jax.random.key(0)
  m = losses.num_sampled_classes(args.classes, labels.size, 0.1)

  rows = []
  for kind in config_lib.LOSS_KINDS:
    cfg = config_lib.DiscriminationConfig(kind=kind)
    fn = jax.jit(jax.value_and_grad(
      lambda e, w: losses.discrimination_loss(e, labels, None, w, key, cfg)[0], argnums=(0, 1)))
    compile_s, step_s = _time(fn, emb, bank, repeats=args.repeats)
    rows.append(dict(loss=kind, compile_s=compile_s, step_s=step_s))
  valid = np.ones(args.rows, bool)
  sample = jax.jit(lambda l: losses.sample_classes(l, valid, args.classes, 0.1, key).classes)
  compile_s, step_s = _time(sample, labels, repeats=args.repeats)
  rows.append(dict(loss="sample_classes only", compile_s=compile_s, step_s=step_s))
  contrast = jax.jit(jax.value_and_grad(
    lambda e: losses.structured_contrastive_loss(e, targets, None, 0.1)[0]))
  compile_s, step_s = _time(contrast, emb, repeats=args.repeats)
  rows.append(dict(loss="structured_contrastive", compile_s=compile_s, step_s=step_s))

  print(f"K={args.classes} D={args.dim} N={args.rows} k={args.labels} M={m} "
        f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"load={os.getloadavg()[0]:.1f}")
  print(f"{'loss':<26}{'compile s':>12}{'step ms':>12}")
  for row in rows:
    print(f"{row['loss']:<26}{row['compile_s']:>12.2f}{1e3 * row['step_s']:>12.1f}")
  out = os.path.join(os.path.dirname(__file__), "results", f"losses_{jax.default_backend()}.json")
  atomic.write_json(out, dict(args=vars(args), sampled_classes=m, backend=jax.default_backend(),
                        machine=machine.describe(), results=rows))
  print("wrote", out)


if __name__ == "__main__":
  main()
