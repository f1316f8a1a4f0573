"""Generation speed of the demo dataset: records per second for each kind, one process.

  python -m benchmarks.demo_data [--records=500] [--image_size=32] [--num_frames=16]

Prints a table and writes benchmarks/results/demo_data.json. The digits load once before timing
(their load time is reported separately); each kind is timed over `--records` consecutive records,
best of `--repeats` passes.
"""

import argparse
import os
import time

import numpy as np

import machine  # benchmarks/machine.py  # pylint: disable=import-error
from univit_jax import atomic
from univit_jax.data import demo

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "demo_data.json")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--records", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--num_frames", type=int, default=16)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()

  start = time.perf_counter()
  demo.split_digits("train")  # Loads and prepares the digits.
  load_s = time.perf_counter() - start

  rows = []
  for kind in demo.DEMO_KINDS:
    source = demo.DemoSource(kind, "train", num_examples=args.records,
                             image_size=args.image_size, num_frames=args.num_frames)
    passes = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      for i in range(len(source)):
        source[i]
      passes.append(time.perf_counter() - start)
    best = min(passes)
    frames = source.num_frames
    rows.append({"kind": kind, "frames": frames, "records_per_s": args.records / best,
                 "ms_per_record": 1e3 * best / args.records,
                 "median_pass_ms_per_record": 1e3 * float(np.median(passes)) / args.records})

  print(f"digit load + prepare: {load_s:.2f} s")
  print(f"{'kind':<8} {'frames':>6} {'records/s':>10} {'ms/record':>10}")
  for row in rows:
    print(f"{row['kind']:<8} {row['frames']:>6} {row['records_per_s']:>10.0f} "
          f"{row['ms_per_record']:>10.3f}")
  atomic.write_json(args.out, {
    "benchmark": "demo_data", "image_size": args.image_size, "num_frames": args.num_frames,
    "records": args.records, "repeats": args.repeats, "digit_load_s": load_s,
    "machine": machine.describe(),
    "numpy": np.__version__, "results": rows})


if __name__ == "__main__":
  main()
