"""Fault injection, one chosen point per stage: SIGKILL extract, cluster, train and export, and
fill the disk under training; each rerun must end with an uninterrupted run's outputs.

These reuse benchmarks/faults.py (see its docstring for what each trial checks); its random sweep,
`python benchmarks/faults.py --trials=50`, is the full version (benchmarks/results/faults.json).
The torn metrics line a kill leaves is appended after every kill in training here, and tested on
its own in tests/test_logs.py and tests/test_train.py.
"""

import errno
import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import faults  # noqa: E402  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> faults.Setup:
  """One round of the benchmark's tiny pipeline, uninterrupted: the reference (it also fills the
  run's compilation cache, conftest.py)."""
  root = str(tmp_path_factory.mktemp("faults"))
  setup = faults.Setup(root=root, reference=os.path.join(root, "reference"),
                       cache=os.environ["JAX_COMPILATION_CACHE_DIR"], rounds=1)
  faults.make_reference(setup)
  return setup


@pytest.mark.slow
@pytest.mark.parametrize("stage, mode, trigger, delay, previous_export", [
  # Between a chunk's files and the meta.json that commits it: the rerun must redo the chunk.
  ("extract", None, "features/object/chunk_00000.ids.npy", 0.0, False),
  # Mid k-means, once its per-iteration checkpoint folder exists.
  ("cluster", None, "clusters/object/checkpoint", 0.2, False),
  # Just after checkpoint 2 of 6: the rerun resumes there, past a torn metrics line.
  ("train", None, "checkpoints/2", 0.0, False),
  # Mid re-export (`--mode=export`) over a complete earlier export.
  ("export", "export", ".export.partial/params", 0.0, True),
])
@pytest.mark.slow
def test_kill_then_rerun_gives_the_uninterrupted_outputs(setup, tmp_path, stage, mode, trigger,
                                                          delay, previous_export):
  record = faults.kill_trial(setup, stage, str(tmp_path), 1, delay, previous_export, mode,
                             trigger)
  assert record["killed"], f"{stage} finished before the kill: {record}"
  assert record["problems"] == []
  assert record["torn_metrics"] == (stage == "train")


@pytest.mark.slow
def test_full_disk_fails_with_one_line_and_the_rerun_with_space_matches(setup, tmp_path):
  if not faults.namespaces_available(str(tmp_path)):
    pytest.skip("needs unprivileged user and mount namespaces (unshare -rm) for a tmpfs")
  record = faults.disk_trial(setup, "train", str(tmp_path / "trial"), fraction=0.5)
  assert record["problems"] == []
  assert record["exit_code"] == "1" and record["error"].startswith("Disk full: ")


def test_a_full_disk_is_recognised_in_python_and_tensorstore_errors():
  from univit_jax import main  # pylint: disable=import-outside-toplevel
  assert main._disk_full(OSError(errno.ENOSPC, "No space left on device"))
  # TensorStore (Orbax's array writes) raises ValueError carrying the OS message.
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing local file "x": Failed to write 8 '
                           "bytes: No space left on device [os_error_code='28']")
  assert main._disk_full(tensorstore)
  try:
    try:
      raise OSError(errno.ENOSPC, "full")
    except OSError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as e:
    assert main._disk_full(e)
  assert not main._disk_full(OSError(errno.EACCES, "Permission denied"))
  assert not main._disk_full(ValueError("bad value"))
