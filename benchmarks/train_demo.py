"""Training speed of the demo config: compile time per bucket and step time per frame bucket.

  python benchmarks/train_demo.py [--steps=40] [--config_arg=] [--log_every=1]

Writes random cluster outputs (the cluster stage's file format) for the demo sources into a
temporary workdir, runs `--mode=train`'s `run_train` for `--steps` steps with a log record every
step, and reports, per frame bucket, the global batch, the median step time, samples/s and
tokens/s (the first step of each bucket is dropped), plus the cold compile time of all buckets
(no persistent cache), and the mean step time over all steps (wall time less the compile). With
`--log_every` > 1 the loop runs at a training run's logging cadence (the per-bucket rows then
come from the logged steps' windows); the mean step time measures the loop's host-side overhead
between steps. Prints a table and writes benchmarks/results/train_demo.json.
"""

import importlib.util
import os
import statistics
import tempfile
import time

import jax
from absl import app, flags, logging

import synthetic  # benchmarks/synthetic.py  # pylint: disable=import-error
import machine  # benchmarks/machine.py  # pylint: disable=import-error
from univit_jax import atomic, run_config
from univit_jax.train import logs, loop

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 40, "training steps")
flags.DEFINE_string("config_arg", "", "argument of configs/demo.py")
flags.DEFINE_integer("clusters", 64, "classes per bank")
flags.DEFINE_integer("log_every", 1, "steps between metrics records (1: per-bucket step times)")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results", "train_demo.json"),
                    "JSON results path")

TOP_K = 10


def _demo_config(arg: str):
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "demo.py")
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _demo_config(FLAGS.config_arg)
  config.total_steps = FLAGS.steps
  config.train.log_every = FLAGS.log_every
  config.train.checkpoint_every = FLAGS.steps
  config.train.compilation_cache_dir = "none"
  config.train.progress_bar = False
  run = run_config.build(config, jax.device_count())
  with tempfile.TemporaryDirectory() as workdir:
    synthetic.write_random_clusters(workdir, run, FLAGS.clusters, TOP_K,
                                    regions=run.data.max_boxes)
    start = time.perf_counter()
    compile_s = loop.run_train(run, workdir).compile_s
    total = time.perf_counter() - start
    records = logs.read_metrics(workdir)

  by_bucket: dict[int, list[dict]] = {}
  for r in records:
    by_bucket.setdefault(int(r["frames"]), []).append(r)
  rows = []
  for t, rs in sorted(by_bucket.items()):
    timed_rs = rs[1:] or rs
    step = statistics.median(r["step_time_s"] for r in timed_rs)
    rows.append(dict(frames=t, steps=len(rs), step_time_s=step,
                     samples_per_s=statistics.median(r["samples_per_s"] for r in timed_rs),
                     tokens_per_s=statistics.median(r["tokens_per_s"] for r in timed_rs)))
  mean_step_s = (total - compile_s) / FLAGS.steps
  result = dict(
    config=f"configs/demo.py:{FLAGS.config_arg}", steps=FLAGS.steps, log_every=FLAGS.log_every,
    devices=[str(d) for d in jax.devices()], machine=machine.describe(), compile_all_buckets_s=compile_s,
    wall_s=total, mean_step_s=mean_step_s, buckets=rows,
    first_losses={k: v for k, v in records[0].items() if k.endswith("/loss") or k == "loss"},
    last_losses={k: v for k, v in records[-1].items() if k.endswith("/loss") or k == "loss"})
  print(f"demo training, {FLAGS.steps} steps on {len(jax.devices())} {jax.devices()[0].platform} "
        f"device(s): compile {compile_s:.1f}s (all buckets, cold), wall {total:.1f}s, "
        f"{mean_step_s:.3f}s a step (log every {FLAGS.log_every})")
  print(f"{'frames':>6} {'steps':>5} {'step s':>8} {'samples/s':>10} {'tokens/s':>10}")
  for r in rows:
    print(f"{r['frames']:>6} {r['steps']:>5} {r['step_time_s']:>8.3f} {r['samples_per_s']:>10.1f} "
          f"{r['tokens_per_s']:>10.0f}")
  atomic.write_json(FLAGS.out, result)


if __name__ == "__main__":
  app.run(main)
