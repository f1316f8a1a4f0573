"""Where files live: every file the package reads or writes is named through here (etils `epath`).

A path is a local one or a URI: `gs://bucket/run`, or `<scheme>://...` of any filesystem fsspec
knows (its built-in list, or one registered with `fsspec.register_implementation`). epath maps
gs, s3, az and hf itself; any other scheme is mapped here, the first time `path` sees it, to
its fsspec filesystem, so `epath.Path` (ours, Orbax's, grain's, JAX's cache) resolves it too.

Local files keep what POSIX gives: arrays are memory-mapped, and `atomic` commits by rename and
fsync. An object store has neither: arrays are read into memory (`load_npy`), and a commit is a
single-object put or a marker written last (`atomic`, docs/storage.md).

  paths.check(workdir, "--workdir")           # at start-up: its scheme has a filesystem here
  features = paths.load_npy(f"{workdir}/features/object/chunk_00000.npy", mmap=True)
  if paths.path(f"{workdir}/clusters").exists(): ...
"""

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator

import fsspec
import numpy as np
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

# The schemes epath maps to a backend itself (etils/epath/gpath.py, `_URI_PREFIXES`).
_EPATH_SCHEMES = frozenset(("gs", "s3", "az", "hf"))
# The schemes `path` has registered with epath, whose registry is global to the process.
_registered: set[str] = set()


class StorageError(ValueError):
  """A path whose scheme has no filesystem here; the message names the path and what to
  install."""


def scheme(path: str | os.PathLike) -> str | None:
  """The URI scheme of `path` ("gs" for `gs://b/x`), or None for a local path."""
  head, sep, _ = os.fspath(path).partition("://")
  return head if sep and "/" not in head else None


def is_local(path: str | os.PathLike) -> bool:
  return scheme(path) is None


class _FsspecBackend(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
  """epath's fsspec backend, for the filesystem of any scheme (epath's own picks gs, s3, az
  or hf by name and serves every other path as a local file)."""

  def fs(self, path: str | os.PathLike) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(scheme(path))


_BACKEND = _FsspecBackend()


def _rooted(parts: tuple) -> tuple:
  """`scheme://rest` as epath keeps URIs inside a path: `/scheme/rest`."""
  full = "/".join(os.fspath(p) for p in parts)
  name = scheme(full)
  return (f"/{name}/{full.split('://', 1)[1]}",) if name else parts


class _SchemePath(gpath.PosixGPath):
  """An epath path of a scheme epath does not map itself, served by `_FsspecBackend`; it keeps
  the URI as epath keeps `gs://` ones (`/scheme/...` inside, `scheme://...` as text)."""

  if sys.version_info < (3, 12):
    def __new__(cls, *parts):
      return super().__new__(cls, *_rooted(parts))
  else:
    def __init__(self, *parts):
      super().__init__(*_rooted(parts))

  @property
  def _uri_scheme(self) -> str | None:
    return self.parts[1] if len(self.parts) > 1 and self.parts[0] == "/" else None

  @property
  def _backend(self) -> epath_backend.Backend:
    return _BACKEND


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an `epath.Path`; a scheme epath does not know is registered with it first."""
  name = scheme(p)
  if name and name not in _EPATH_SCHEMES and name not in _registered:
    epath.register_path_cls(f"{name}://")(_SchemePath)
    _registered.add(name)
  return epath.Path(p)


def absolute(p: str | os.PathLike) -> str:
  """`p` made absolute if local (`os.path.abspath`); a URI is already absolute."""
  return os.path.abspath(p) if is_local(p) else os.fspath(p)


def check(p: str | os.PathLike, what: str) -> None:
  """Refuses a URI whose scheme has no filesystem installed, before any stage writes there.

  Raises:
    StorageError: naming `what` (e.g. "--workdir"), `p` and the package to install (fsspec's
      own words, e.g. "Install gcsfs to access Google Storage").
  """
  name = scheme(p)
  if name is None:
    return
  try:
    fsspec.get_filesystem_class(name)
  except (ImportError, ValueError) as e:
    raise StorageError(f"{what}={os.fspath(p)}: no filesystem for {name}:// here ({e})") from None
  path(p)


def load_npy(p: str | os.PathLike, mmap: bool = False) -> np.ndarray:
  """A `.npy` array: memory-mapped read-only with `mmap` on a local path; otherwise read whole
  into memory (an object store cannot be mapped)."""
  if is_local(p):
    return np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
  with path(p).open("rb") as f:
    return np.load(io.BytesIO(f.read()), allow_pickle=False)


def load_npz(p: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every array of a `.npz` file, read into memory."""
  with path(p).open("rb") as f, np.load(f, allow_pickle=False) as npz:
    return {key: npz[key] for key in npz.files}


@contextlib.contextmanager
def local_copy(p: str | os.PathLike) -> Iterator[str]:
  """A local folder holding the files of folder `p`, for libraries that read only local files:
  `p` itself when local, else a temporary download."""
  if is_local(p):
    yield os.fspath(p)
    return
  with tempfile.TemporaryDirectory() as tmp:
    for file in path(p).iterdir():
      (epath.Path(tmp) / file.name).write_bytes(file.read_bytes())
    yield tmp


@contextlib.contextmanager
def local_staging(p: str | os.PathLike) -> Iterator[str]:
  """A new local folder for libraries that write only local files, whose files end up in the
  folder `p`: `p` itself when local, else a temporary folder uploaded file by file when the
  block exits without error."""
  if is_local(p):
    os.makedirs(p)
    yield os.fspath(p)
    return
  with tempfile.TemporaryDirectory() as tmp:
    yield tmp
    for file in epath.Path(tmp).iterdir():
      (path(p) / file.name).write_bytes(file.read_bytes())
