"""Runs training phases in a fresh process, for the train tests (kills, resumes, NaNs, several
processes).

  python tests/train_worker.py CACHE_DIR PHASES_JSON [--process I --processes P --port PORT]

PHASES_JSON is a list of {"workdir", "total_steps", "train": {overrides of config.train},
"clusters_version": optional, rewrites the workdir's cluster outputs with this version first,
"nan_step": optional, the batch of this step has NaN frames (`train_fixtures.nan_at_step`),
"step_sleep": optional, seconds each step sleeps (`train_fixtures.slow_steps`),
"hosts": optional, one process reads the batches of a job of this many processes
(`train_fixtures.batches_of_hosts`),
"fail": optional {"process", "step", "message"}, that process raises RuntimeError(message) when
it reads the batch of that step (`train_fixtures.raise_at_step`)}.
After each phase it prints one JSON line {"phase", "step", "preempted", "error_type", "error",
"checkpoints" (the names in <workdir>/checkpoints)}
and writes `<workdir>/params_<phase>.npz` (the final parameter leaves) and
`<workdir>/data_<phase>.json` (the data iterator position).

With several processes (`helpers.start_processes`) they train together; process 0 writes those
files, and every phase runs under the entry point's error reporting (`main.run_stage`), so an
error in one process ends all of them, as in `python -m univit_jax.main`.
"""

import argparse
import contextlib
import functools
import json
import os
import sys

if __name__ == "__main__":
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  sys.path[:0] = [tests_dir, os.path.dirname(tests_dir)]
  import helpers

  parser = argparse.ArgumentParser()
  parser.add_argument("cache")
  parser.add_argument("phases", type=json.loads)
  helpers.add_process_arguments(parser)
  args = parser.parse_args()
  helpers.join_processes(args)

  import jax
  import numpy as np
  import train_fixtures

  from univit_jax import collectives, main, train

  for index, phase in enumerate(args.phases):
    workdir = phase["workdir"]
    if "clusters_version" in phase:
      train_fixtures.write_clusters(workdir, version=phase["clusters_version"])
    config = train_fixtures.tiny_config(compilation_cache_dir=args.cache, **phase.get("train", {}))
    for key, value in phase.get("optim", {}).items():
      config.optim[key] = value
    config.total_steps = phase["total_steps"]
    report = dict(phase=index, step=None, preempted=None, error_type=None, error=None)
    faults = contextlib.ExitStack()
    if "nan_step" in phase:
      faults.enter_context(train_fixtures.nan_at_step(phase["nan_step"]))
    if "step_sleep" in phase:
      faults.enter_context(train_fixtures.slow_steps(phase["step_sleep"]))
    if "hosts" in phase:
      faults.enter_context(train_fixtures.batches_of_hosts(phase["hosts"]))
    if phase.get("fail", {}).get("process") == args.process:
      faults.enter_context(train_fixtures.raise_at_step(phase["fail"]["step"],
                                                        phase["fail"]["message"]))
    run = functools.partial(train.run_train, helpers.typed(config), workdir)
    try:
      with faults:
        result = main.run_stage(run) if args.processes > 1 else run()
    except (train.NonFiniteError, train.CheckpointMismatchError, train.LabelError) as e:
      report.update(error_type=type(e).__name__, error=str(e))
    else:
      report.update(step=result.step, preempted=result.preempted)
      leaves = jax.tree_util.tree_leaves_with_path(
        jax.tree.map(collectives.gather, result.state.params))
      if args.process == 0:
        np.savez(os.path.join(workdir, f"params_{index}.npz"),
                 **{jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves})
        with open(os.path.join(workdir, f"data_{index}.json"), "w") as f:
          json.dump(result.data_state, f, default=str)
    folder = os.path.join(workdir, "checkpoints")
    report["checkpoints"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    print(json.dumps(report), flush=True)
