"""Fakes for tests: a tiny in-memory source with the demo record shape (`FakeSource`), and a
local object store (`ObjectStore`, `GcsServer`, `install`; see below)."""

import http.server
import io
import json
import os
import sys
import tempfile
import threading
import types
import urllib.parse

import fsspec
import numpy as np
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class FakeSource:
  """`n` records: `frames` uint8 [num_frames, size, size, 3] whose pixels encode the index.

  Every pixel of record i equals i % 256, so an example can be traced back to its record; with
  `boxes`, records carry 4 boxes (2 valid) like the demo data.
  """

  def __init__(self, n: int, num_frames: int = 1, size: int = 16, boxes: bool = False):
    self.n, self.num_frames, self.size, self.boxes = n, num_frames, size, boxes

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.n:
      raise IndexError(index)
    frames = np.full((self.num_frames, self.size, self.size, 3), index % 256, np.uint8)
    record = dict(id=np.int64(index), frames=frames, label=np.int32(index % 7))
    if self.boxes:
      record.update(
        boxes=np.array([[0.1, 0.1, 0.6, 0.6], [0.2, 0.3, 0.9, 0.8], [0, 0, 0, 0], [0, 0, 0, 0]],
                       np.float32),
        box_labels=np.array([index % 5, 1, 0, 0], np.int32),
        box_mask=np.array([True, True, False, False]))
    return record


# ---------------------------------------------------------------------------------------------
# A local object store: `fakegcs://`, `gs://` and `gcs://` paths, for tests of the storage layer
# (univit_jax/paths.py, atomic.py) and of whole runs in a remote workdir.
#
# Two views of one folder (`root/<bucket>/<object name>`):
#   `ObjectStore`   an fsspec filesystem (what epath, hence the package, grain and Orbax's
#                   metadata use) that behaves as an object store: a file appears whole when
#                   closed (one put), there is no append and no rename, folders are not made
#                   and vanish with their last object.
#   `GcsServer`     the part of the GCS JSON API that TensorStore's `gcs` driver and
#                   array_record's GCS reader (google-cloud-cpp) speak (upload, read with ranges
#                   and generation conditions, list, delete), so that Orbax's arrays and
#                   ArrayRecord shards reach the same folder through the real `gs://` code path.
# `install` wires both in (fsspec's registry, TensorStore's and google-cloud-cpp's environment
# variables for an emulator, a stand-in for google-cloud-storage, which Orbax asks whether a
# bucket has a hierarchical namespace before deleting old steps); `python -m fake_store_main`
# runs `univit_jax.main` with them installed.

FAKE_SCHEMES = ("fakegcs", "gs", "gcs")
ROOT_ENV = "UNIVIT_FAKE_STORE_ROOT"
URL_ENV = "TENSORSTORE_GCS_HTTP_URL"
# google-cloud-cpp's emulator endpoint (no credentials then): array_record's `gs://` reader.
EMULATOR_ENV = "CLOUD_STORAGE_EMULATOR_ENDPOINT"


def _put(path: str, data: bytes) -> None:
  """Writes an object whole: readers see the old bytes or the new, as with an object put."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".put-")
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


class _Upload(io.BytesIO):
  """A file being written: nothing is visible until it is closed, then all of it."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def close(self) -> None:
    if not self.closed:
      _put(self._path, self.getvalue())
    super().close()


class ObjectStore(DirFileSystem):
  """An fsspec filesystem over `root` with an object store's semantics (see above)."""

  protocol = FAKE_SCHEMES
  root = ""  # set by `install`

  def __init__(self, *args, finalize_on_close: bool | None = None, **kwargs):
    del args, finalize_on_close  # epath passes gcsfs's options
    super().__init__(path=self.root, fs=LocalFileSystem(), **kwargs)

  def open(self, path, mode="rb", **kwargs):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"{path}: an object store has no append ({mode!r})")
    if "w" in mode:
      upload = _Upload(self._join(path))
      return upload if "b" in mode else io.TextIOWrapper(upload, encoding="utf-8")
    return super().open(path, mode, **kwargs)

  def mkdir(self, path, *args, **kwargs) -> None:
    del path, args, kwargs  # folders are not objects

  def makedirs(self, path, exist_ok=False) -> None:
    del path, exist_ok

  def mv(self, *args, **kwargs):
    raise NotImplementedError("an object store has no rename")

  rename = mv

  def rm(self, path, *args, **kwargs) -> None:
    super().rm(path, *args, **kwargs)
    for one in [path] if isinstance(path, str) else path:  # a folder goes with its last object
      folder = os.path.dirname(self._join(one.rstrip("/")))
      while folder.startswith(self.root + os.sep) and not os.listdir(folder):
        os.rmdir(folder)
        folder = os.path.dirname(folder)


def _generation(st: os.stat_result) -> str:
  """An object's generation: every put makes a new file (`_put`), so inode and time change."""
  return str(((st.st_ino << 24) ^ st.st_mtime_ns) % (1 << 62) + 1)


class _GcsHandler(http.server.BaseHTTPRequestHandler):
  """The requests TensorStore's `gcs` driver and array_record's GCS reader make, served from
  `server.root`."""

  protocol_version = "HTTP/1.1"

  def log_message(self, *args) -> None:
    del args

  def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
    self.send_response(code)
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _json(self, code: int, obj: dict) -> None:
    self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

  def _object(self, bucket: str, name: str) -> tuple[str, os.stat_result | None]:
    path = os.path.join(self.server.root, bucket, name)
    try:
      return path, os.stat(path)
    except FileNotFoundError:
      return path, None

  def _resource(self, bucket: str, name: str, st: os.stat_result) -> dict:
    return dict(kind="storage#object", bucket=bucket, name=name, size=str(st.st_size),
                generation=_generation(st), metageneration="1")

  def _unmet(self, query: dict, st: os.stat_result | None) -> int | None:
    """The status for failed `ifGeneration(Not)Match` conditions (0: the object is absent)."""
    generation = _generation(st) if st else "0"
    if "ifGenerationMatch" in query and query["ifGenerationMatch"] != generation:
      return 412
    if "ifGenerationNotMatch" in query and query["ifGenerationNotMatch"] == generation:
      return 304
    return None

  def _parse(self) -> tuple[list[str], dict]:
    url = urllib.parse.urlsplit(self.path)
    return url.path.split("/"), dict(urllib.parse.parse_qsl(url.query))

  def do_GET(self) -> None:  # pylint: disable=invalid-name
    parts, query = self._parse()  # /storage/v1/b/<bucket>/o[/<name>]
    bucket = parts[4]
    if len(parts) == 6:
      self._list(bucket, query)
      return
    name = urllib.parse.unquote("/".join(parts[6:]))
    path, st = self._object(bucket, name)
    if st is None:
      self._json(404, {"error": {"code": 404, "message": f"no object {name}"}})
      return
    unmet = self._unmet(query, st)
    if unmet:
      self._send(unmet, b"", {"x-goog-generation": _generation(st)})
      return
    if query.get("alt") != "media":
      self._json(200, self._resource(bucket, name, st))
      return
    with open(path, "rb") as f:
      data = f.read()
    headers = {"x-goog-generation": _generation(st), "Content-Type": "application/octet-stream"}
    if "Range" in self.headers:
      first, _, last = self.headers["Range"].split("=")[1].partition("-")
      if first:  # `bytes=first-[last]`
        first, last = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
      else:  # `bytes=-n`: the last n bytes (array_record's GCS reader reads the footer so)
        first, last = max(len(data) - int(last), 0), len(data) - 1
      headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
      self._send(206, data[first:last + 1], headers)
      return
    self._send(200, data, headers)

  def _list(self, bucket: str, query: dict) -> None:
    base, items = os.path.join(self.server.root, bucket), []
    for folder, _, files in os.walk(base):
      for file in files:
        name = os.path.relpath(os.path.join(folder, file), base)
        if (name.startswith(query.get("prefix", "")) and name >= query.get("startOffset", "")
            and ("endOffset" not in query or name < query["endOffset"])
            and not file.startswith(".put-")):
          items.append(self._resource(bucket, name, os.stat(os.path.join(folder, file))))
    self._json(200, dict(kind="storage#objects", items=sorted(items, key=lambda i: i["name"])))

  def do_POST(self) -> None:  # pylint: disable=invalid-name
    parts, query = self._parse()  # /upload/storage/v1/b/<bucket>/o?uploadType=media&name=...
    bucket, name = parts[5], query["name"]
    data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
    path, st = self._object(bucket, name)
    if self._unmet(query, st):
      self._json(412, {"error": {"code": 412, "message": "precondition failed"}})
      return
    _put(path, data)
    self._json(200, self._resource(bucket, name, os.stat(path)))

  def do_DELETE(self) -> None:  # pylint: disable=invalid-name
    parts, query = self._parse()
    bucket, name = parts[4], urllib.parse.unquote("/".join(parts[6:]))
    path, st = self._object(bucket, name)
    if st is None or self._unmet(query, st):
      self._json(404 if st is None else 412, {"error": {"code": 404 if st is None else 412}})
      return
    os.remove(path)
    self._send(204)


class GcsServer(http.server.ThreadingHTTPServer):
  """`_GcsHandler` on a free local port, serving in a daemon thread; `url` for TensorStore."""

  def __init__(self, root: str):
    super().__init__(("127.0.0.1", 0), _GcsHandler)
    self.root = root
    self.url = f"http://127.0.0.1:{self.server_address[1]}"
    threading.Thread(target=self.serve_forever, daemon=True).start()


class _Bucket:
  hierarchical_namespace_enabled = False


class _StorageClient:
  """google-cloud-storage's `Client`, as far as Orbax's deleter asks it (a flat bucket)."""

  def get_bucket(self, name: str) -> _Bucket:
    del name
    return _Bucket()


def install(root: str, url: str) -> None:
  """Serves `fakegcs://`, `gs://` and `gcs://` from `root` in this process: epath and fsspec
  through `ObjectStore`, TensorStore and array_record through the `GcsServer` at `url`. Once
  per process: epath and fsspec keep the filesystem they first made."""
  if ObjectStore.root and ObjectStore.root != root:
    raise RuntimeError(f"the fake object store already serves {ObjectStore.root}")
  ObjectStore.root = root
  for scheme in FAKE_SCHEMES:
    fsspec.register_implementation(scheme, ObjectStore, clobber=True)
  os.environ.update({ROOT_ENV: root, URL_ENV: url, EMULATOR_ENV: url,
                     "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake"})
  storage = types.ModuleType("google.cloud.storage")
  storage.Client = _StorageClient
  sys.modules["google.cloud.storage"] = storage


def subprocess_env(root: str, url: str) -> dict[str, str]:
  """What `python -m fake_store_main` needs to find the store (tests/ on the path)."""
  tests = os.path.dirname(os.path.abspath(__file__))
  return {ROOT_ENV: root, URL_ENV: url, EMULATOR_ENV: url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
          "PYTHONPATH": os.pathsep.join(filter(None, (tests, os.environ.get("PYTHONPATH"))))}
