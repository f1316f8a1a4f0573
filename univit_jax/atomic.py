"""Atomic file writes: readers see either the old file or the complete new one, never a part.

The files another stage reads whole (features, centroids, labels, stats, an export's
`config.json` and completion marker, reports, `training.png`) go through here: the bytes go to a
temporary file in the destination folder, are fsynced, and `os.replace` swaps it in; the folder
is fsynced too so the rename itself survives a crash.

Not everything is one file: an export's `params/` is written by Orbax, and the export folder is
made atomic by a rename of the whole folder (`checkpointing.save_export`). `metrics.jsonl` is
appended line by line, which is not atomic; it is rewritten through here on resume, which drops
a line torn by a kill (`train.logs`).
"""

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np


def _fsync_dir(directory: str) -> None:
  fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file that replaces `path` when the block exits without error."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_dir(directory)


def fsync_tree(directory: str) -> None:
  """fsyncs every file under `directory` and the directories themselves (for files written by
  libraries that do not sync, before a commit record points at them)."""
  for root, _, files in os.walk(directory):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(root)
  _fsync_dir(os.path.dirname(os.path.abspath(directory)))


def replace_dir(src: str, dst: str) -> None:
  """Moves the finished folder `src` to `dst`, replacing any folder there.

  Readers of `dst` see the old folder, for a moment no folder, or the new one; never a mix. The
  old `dst` is first renamed aside (a rename is atomic; deleting a tree is not, and a kill
  midway would leave part of it) and deleted after the swap.
  """
  parent = os.path.dirname(os.path.abspath(dst))
  aside = os.path.join(parent, f".{os.path.basename(dst)}.old")
  shutil.rmtree(aside, ignore_errors=True)
  if os.path.exists(dst):
    os.replace(dst, aside)
  os.replace(src, dst)
  _fsync_dir(parent)
  shutil.rmtree(aside, ignore_errors=True)


def write_bytes(path: str, data: bytes) -> None:
  with open_atomic(path, "wb") as f:
    f.write(data)


def save_npy(path: str, array: np.ndarray) -> None:
  """Writes `array` as a .npy file atomically (loadable with `np.load(path, mmap_mode="r")`)."""
  with open_atomic(path, "wb") as f:
    np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def save_npz(path: str, **arrays: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def write_json(path: str, obj: Any) -> None:
  write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())
