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
import os

import jax
import numpy as np

from univit_jax import atomic, collectives, paths
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
  folder = paths.path(directory)
  if jax.process_index() == 0 and index is not None:
    if (folder / index_dir).exists():
      (folder / index_dir).rmtree()
    index.save(os.path.join(directory, index_dir))
  collectives.barrier(f"kmeans_assign_{iteration}")
  if jax.process_index() == 0:
    atomic.save_npz(os.path.join(directory, "state.npz"), index_dir=np.array(index_dir), **state)
  collectives.barrier(f"kmeans_state_{iteration}")
  keep = os.path.basename(_rows_path(directory, iteration))
  suffix = keep.split("_", 2)[2]
  for path in folder.glob(f"rows_it*_{suffix}"):
    if path.name != keep:
      path.unlink()
  if jax.process_index() == 0:
    for path in folder.glob("scann_it*"):
      if path.name != index_dir:
        path.rmtree()


def load(directory: str, version: str) -> tuple[dict, bounds.RowState] | None:
  """The state saved by `save` and this process's rows, or None where there is none of
  `version` for this process count."""
  path = os.path.join(directory, "state.npz")
  if not paths.path(path).exists():
    return None
  state = paths.load_npz(path)
  if str(state["version"]) != version:
    return None
  rows_path = _rows_path(directory, int(state["iteration"]))
  if not paths.path(rows_path).exists():
    return None
  return state, bounds.RowState(**paths.load_npz(rows_path))
