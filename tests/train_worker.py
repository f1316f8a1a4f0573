"""Runs training phases in a fresh process, for the train tests (kills, resumes, NaNs).

  python tests/train_worker.py CACHE_DIR PHASES_JSON

PHASES_JSON is a list of {"workdir", "total_steps", "train": {overrides of config.train},
"clusters_version": optional, rewrites the workdir's cluster outputs with this version first,
"nan_step": optional, the batch of this step has NaN frames (`train_fixtures.nan_at_step`),
"step_sleep": optional, seconds each step sleeps (`train_fixtures.slow_steps`)}.
After each phase it prints one JSON line {"phase", "step", "preempted", "error_type", "error",
"checkpoints" (the names in <workdir>/checkpoints)}
and writes `<workdir>/params_<phase>.npz` (the final parameter leaves) and
`<workdir>/data_<phase>.json` (the data iterator position).
"""

import contextlib
import json
import os
import sys

if __name__ == "__main__":
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  sys.path[:0] = [tests_dir, os.path.dirname(tests_dir)]
  import jax
  import numpy as np
  import helpers
  import train_fixtures

  from univit_jax import train

  cache, phases = sys.argv[1], json.loads(sys.argv[2])
  for index, phase in enumerate(phases):
    workdir = phase["workdir"]
    if "clusters_version" in phase:
      train_fixtures.write_clusters(workdir, version=phase["clusters_version"])
    config = train_fixtures.tiny_config(compilation_cache_dir=cache, **phase.get("train", {}))
    for key, value in phase.get("optim", {}).items():
      config.optim[key] = value
    config.total_steps = phase["total_steps"]
    report = dict(phase=index, step=None, preempted=None, error_type=None, error=None)
    faults = contextlib.ExitStack()
    if "nan_step" in phase:
      faults.enter_context(train_fixtures.nan_at_step(phase["nan_step"]))
    if "step_sleep" in phase:
      faults.enter_context(train_fixtures.slow_steps(phase["step_sleep"]))
    try:
      with faults:
        result = train.run_train(helpers.typed(config), workdir)
    except (train.NonFiniteError, train.CheckpointMismatchError, train.LabelError) as e:
      report.update(error_type=type(e).__name__, error=str(e))
    else:
      report.update(step=result.step, preempted=result.preempted)
      leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(result.state.params))
      np.savez(os.path.join(workdir, f"params_{index}.npz"),
               **{jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves})
      with open(os.path.join(workdir, f"data_{index}.json"), "w") as f:
        json.dump(result.data_state, f, default=str)
    folder = os.path.join(workdir, "checkpoints")
    report["checkpoints"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    print(json.dumps(report), flush=True)
