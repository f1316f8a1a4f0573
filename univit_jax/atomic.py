"""Atomic file writes: a reader sees the old file or the whole new one, never a partial one.

Each writer fills a temporary file in the destination's folder, fsyncs it, then renames it over
the destination (`os.replace` is atomic on POSIX within one file system).
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file that replaces `path` when the block exits without error."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  with open_atomic(path) as f:
    json.dump(obj, f, indent=1, default=str)


def save_npy(path: str, array: np.ndarray) -> None:
  with open_atomic(path, "wb") as f:
    np.save(f, array)
