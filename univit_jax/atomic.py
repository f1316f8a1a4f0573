"""Atomic file writes: readers see either the old file or the complete new one, never a part.

The files another stage reads whole (features, centroids, labels, stats, an export's
`config.json` and completion marker, reports, `training.png`) go through here. On a local path
the bytes go to a temporary file in the destination folder, are fsynced, and `os.replace` swaps
it in; the folder is fsynced too so the rename itself survives a crash. On an object store
(`gs://`, any non-local scheme: `paths`) there is no rename, but an object put is atomic: the
bytes are gathered in memory and written by one put when the block succeeds. A library that
writes only to a local file name (ArrayRecord's writer: the shards of `data.convert`) gets one
from `local_file`, committed the same way.

Not everything is one file. A folder whose files must appear together (an export, `--mode=embed`
output) is built by `staging_dir` / `clear_staging` / `commit_dir`: locally in a sibling
`.<name>.partial` that is fsynced and renamed over the folder; on an object store in the folder
itself, emptied first starting with its marker (the file written last, which readers check), so
that readers see the old complete folder, none, or the new one. `metrics.jsonl` is appended line
by line, which is not atomic (`append_text`); it is rewritten through here on resume, which drops
a line torn by a kill (`train.logs`). Which files each stage writes and how each is committed:
docs/storage.md.
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

from univit_jax import paths


def _fsync(path: str) -> None:
  """fsyncs a file or a folder (a folder's entries: a rename in it) by name."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def open_atomic(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file that replaces `path` when the block exits without error (on an object
  store: a buffer written by one put then)."""
  if not paths.is_local(path):
    with _put_on_success(path, mode) as f:
      yield f
    return
  with local_file(path) as tmp, open(tmp, mode) as f:
    yield f


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
  """The name of a new local file, for a library that writes only to a file name (ArrayRecord's
  writer), that replaces `path` when the block exits without error.

  Locally it is a temporary `.<name>.<random>.tmp` beside `path`, fsynced and renamed over it
  (a kill leaves such a file behind, never a partial `path`); on an object store it is a file in
  the local temporary folder, uploaded by one put.
  """
  if not paths.is_local(path):
    with tempfile.TemporaryDirectory() as folder:
      tmp = os.path.join(folder, os.path.basename(path))
      yield tmp
      with open(tmp, "rb") as f:
        paths.path(path).write_bytes(f.read())
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    yield tmp
    _fsync(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync(directory)


@contextlib.contextmanager
def _put_on_success(path: str, mode: str) -> Iterator[IO]:
  """A buffer whose content is written to `path` by one put when the block exits without error."""
  buffer = io.BytesIO()
  if "b" in mode:
    yield buffer
  else:
    text = io.TextIOWrapper(buffer, encoding="utf-8", write_through=True)
    yield text
    text.flush()
  paths.path(path).write_bytes(buffer.getvalue())


def fsync_tree(directory: str) -> None:
  """fsyncs every file under `directory` and the directories themselves (for files written by
  libraries that do not sync, before a commit record points at them); nothing to do on an
  object store, where an object is durable once its put returns."""
  if not paths.is_local(directory):
    return
  for root, _, files in os.walk(directory):
    for name in files:
      _fsync(os.path.join(root, name))
    _fsync(root)
  _fsync(os.path.dirname(os.path.abspath(directory)))


def staging_dir(dst: str) -> str:
  """Where the folder `dst` is built before `commit_dir`: a sibling `.<name>.partial` on a local
  path; `dst` itself on an object store (no rename to move a folder into place)."""
  if not paths.is_local(dst):
    return dst
  dst = os.path.abspath(dst)
  return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.partial")


def clear_staging(dst: str, marker: str) -> None:
  """Empties `staging_dir(dst)` before a build: locally, what a kill mid-build left there; on an
  object store, the old `dst`, its `marker` first so that readers stop taking it as complete."""
  staging = paths.path(staging_dir(dst))
  if not paths.is_local(dst):
    (staging / marker).unlink(missing_ok=True)
  if staging.exists():
    staging.rmtree()


def commit_dir(dst: str, marker: str, content: bytes = b"") -> None:
  """Completes the folder built in `staging_dir(dst)` by writing its `marker` file last.

  Locally the staging folder is then fsynced and moved over `dst` (`_replace_dir`): readers of
  `dst` see the old folder, for a moment no folder, or the new one; never a mix. On an object
  store the marker's put is the commit: readers that check for it see a complete folder.
  """
  staging = staging_dir(dst)
  if not paths.is_local(dst):
    write_bytes(os.path.join(staging, marker), content)
    return
  fsync_tree(staging)
  write_bytes(os.path.join(staging, marker), content)
  _replace_dir(staging, dst)


def _replace_dir(src: str, dst: str) -> None:
  """Moves the finished local folder `src` to `dst`, replacing any folder there. The old `dst`
  is first renamed aside (a rename is atomic; deleting a tree is not, and a kill midway would
  leave part of it) and deleted after the swap."""
  parent = os.path.dirname(os.path.abspath(dst))
  aside = os.path.join(parent, f".{os.path.basename(dst)}.old")
  shutil.rmtree(aside, ignore_errors=True)
  if os.path.exists(dst):
    os.replace(dst, aside)
  os.replace(src, dst)
  _fsync(parent)
  shutil.rmtree(aside, ignore_errors=True)


def write_bytes(path: str, data: bytes) -> None:
  with open_atomic(path, "wb") as f:
    f.write(data)


def save_npy(path: str, array: np.ndarray) -> None:
  """Writes `array` as a .npy file atomically (loadable with `paths.load_npy(path, mmap=True)`)."""
  with open_atomic(path, "wb") as f:
    np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def save_npz(path: str, **arrays: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def append_text(path: str, text: str) -> None:
  """Appends `text` to the file `path` (created if missing). Not atomic: a kill mid-append may
  tear the last line locally. An object has no append, so there the file is read and written
  again by one put (each append costs the whole file)."""
  if paths.is_local(path):
    with open(path, "a") as f:
      f.write(text)
    return
  file = paths.path(path)
  file.write_text((file.read_text() if file.exists() else "") + text)


def json_bytes(obj: Any) -> bytes:
  """`obj` as the package writes JSON files: indented, keys sorted, other values as str."""
  return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def write_json(path: str, obj: Any) -> None:
  write_bytes(path, json_bytes(obj))
