"""The resumable state of a k-means run: committed after each iteration, loaded on a rerun.

With a `checkpoint_dir`, the state after each iteration (centroids, each row's assignment,
bound and candidate list, the serialized ScaNN index, histories) is committed atomically, so a
killed run continues from its last iteration and ends with the same centroids and labels as an
uninterrupted run.
Files: rows_it<i>_p<p>of<P>.npz per process (its `RowState`), scann_it<i>/ (the index, process
0), and state.npz, written by process 0 after every process wrote its rows: the commit point.
A state of another version (other inputs or parameters) or process count is not resumed.
"""

import dataclasses
import glob
import os
import shutil

import jax
import numpy as np

from univit_jax import atomic, collectives
from univit_jax.clustering.kmeans import assigners, bounds


def _rows_path(directory: str, iteration: int) -> str:
  return os.path.join(directory, f"rows_it{iteration:04d}_p{jax.process_index():03d}"
                      f"of{jax.process_count():03d}.npz")


def save(directory: str, state: dict, rows: bounds.RowState,
         index: assigners.ScannAssigner | None) -> None:
  """Commits the state after an iteration; `index` must already hold `state["centroids"]`."""
  iteration = int(state["iteration"])
  atomic.save_npz(_rows_path(directory, iteration), **dataclasses.asdict(rows))
  index_dir = f"scann_it{iteration:04d}" if index is not None else ""
  if jax.process_index() == 0 and index is not None:
    shutil.rmtree(os.path.join(directory, index_dir), ignore_errors=True)
    index.save(os.path.join(directory, index_dir))
  collectives.barrier(f"kmeans_assign_{iteration}")
  if jax.process_index() == 0:
    atomic.save_npz(os.path.join(directory, "state.npz"), index_dir=np.array(index_dir), **state)
  collectives.barrier(f"kmeans_state_{iteration}")
  keep = os.path.basename(_rows_path(directory, iteration))
  suffix = keep.split("_", 2)[2]
  for path in glob.glob(os.path.join(directory, f"rows_it*_{suffix}")):
    if os.path.basename(path) != keep:
      os.remove(path)
  if jax.process_index() == 0:
    for path in glob.glob(os.path.join(directory, "scann_it*")):
      if os.path.basename(path) != index_dir:
        shutil.rmtree(path)


def load(directory: str, version: str) -> tuple[dict, bounds.RowState] | None:
  """The state saved by `save` and this process's rows, or None where there is none of
  `version` for this process count."""
  path = os.path.join(directory, "state.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    state = {key: f[key] for key in f.files}
  if str(state["version"]) != version:
    return None
  rows_path = _rows_path(directory, int(state["iteration"]))
  if not os.path.exists(rows_path):
    return None
  with np.load(rows_path) as f:
    return state, bounds.RowState(**{key: f[key] for key in f.files})
