"""Wall time of the README's main command: the two-round demo pipeline from an empty workdir.

  python benchmarks/demo_pipeline.py [--repeats=1]

Runs `python -m univit_jax.main --config=configs/demo.py --workdir=<fresh temp dir>` in a
subprocess (one CPU device, no persistent compilation cache from earlier runs), times it, and
records the wall time, the bar (600 s), each round's final loss terms and cluster objectives from
`pipeline.json`. Prints a table and writes benchmarks/results/demo_pipeline.json.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import machine  # noqa: E402  # pylint: disable=import-error
from univit_jax import atomic  # pylint: disable=wrong-import-position  # noqa: E402

BAR_SECONDS = 600
_REPEATS = flags.DEFINE_integer("repeats", 1, "fresh runs to time (the median is reported)")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results",
                                               "demo_pipeline.json"), "JSON results path")


def run_once() -> tuple[float, dict]:
  with tempfile.TemporaryDirectory() as workdir:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "univit_jax.main", "--config=configs/demo.py",
                    f"--workdir={workdir}"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    with open(os.path.join(workdir, "pipeline.json")) as f:
      return seconds, json.load(f)


def main(argv):
  del argv
  times, summaries = [], []
  for _ in range(_REPEATS.value):
    seconds, summary = run_once()
    times.append(seconds)
    summaries.append(summary)
  median = statistics.median(times)
  print(f"{'run':>4} {'seconds':>9}")
  for i, t in enumerate(times):
    print(f"{i:>4} {t:>9.1f}")
  print(f"median {median:.1f} s (bar {BAR_SECONDS} s): {'within' if median <= BAR_SECONDS else 'OVER'}")
  for r, info in enumerate(summaries[-1]["rounds"], 1):
    objectives = {b: round(c["objective"], 3) for b, c in info["clusters"].items()}
    print(f"round {r}: cluster objectives {objectives}; embedding cosine "
          f"{info['embedding_cosine']}")
  result = dict(
    benchmark="demo_pipeline", command="python -m univit_jax.main --config=configs/demo.py",
    machine=machine.describe(),
    seconds=times, median_seconds=median, bar_seconds=BAR_SECONDS,
    rounds=[dict(clusters=i["clusters"], last_losses=i["last_losses"],
                 embedding_cosine=i["embedding_cosine"]) for i in summaries[-1]["rounds"]])
  atomic.write_json(_OUT.value, result)


if __name__ == "__main__":
  app.run(main)
