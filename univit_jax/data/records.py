"""The sharded record format for data at scale: ArrayRecord shards of encoded examples.

A converted dataset is a folder (local or `gs://`) written by `python -m univit_jax.data.convert`:
  data-00000-of-000NN.array_record ...  the records, in source order, `records_per_shard` each
                                        (default RECORDS_PER_SHARD; the last shard holds the
                                        rest); group size 1, so any record is read by itself
                                        (random access)
  keys.txt                              every record's key, one per line, in record order
  plan.json                             what is being converted (written first; `convert`)
  manifest.json                         written last: the dataset is complete when it exists
Readers open only datasets with a manifest. `manifest.json` holds `format` ("univit-array-record"),
`version` (FORMAT_VERSION), `kind` ("image" | "video"), `source` (the `data.sources` entry it was
converted from), `content` (that source's content digest, if it lists its files), `records`,
`records_per_shard`, `shards` (per shard: `file` and `records`), `keys_file` and `keys_sha256`
(the SHA-256 of keys.txt: the keys' order).

Each record is one example, a msgpack map (keys sorted, so the same example gives the same bytes):
  version     int, FORMAT_VERSION (1)
  key         str, the example's stable name, unique in the dataset: a file's path relative to
              its folder or manifest (`#t=start,end` for a video window), else the index of the
              example in the source it was converted from
  label       int, -1 when unknown
  and exactly one of
  image       bytes: one encoded image, as read from its file (any `sources.IMAGE_FORMATS`) or
              PNG-encoded from a source that holds pixels (TFDS, demo)
  video       bytes: one encoded video file (any container PyAV reads), with optional `start` and
              `end` floats (seconds) for a window of it
  frames      list of bytes: a clip held as pixels, one PNG per frame, in order
  and optionally
  boxes       list of [ymin, xmin, ymax, xmax] floats in [0, 1]
  box_labels  list of int, one per box
  box_mask    list of bool, one per box

Nothing is decoded on reading a record: `ArrayRecordSource` yields the encoded media as
`sources` records (`data` + `kind`, or `encoded_frames`), and `sources.load_clip` decodes them in
the grain workers with the same format allow-list and memory bounds as files; an undecodable
record becomes a `BadRecordError` naming its key. A version this reader does not know is refused
when the dataset is opened. A new field that old readers may ignore keeps the version; any other
change takes a new one, and this reader then names the version it found.
"""

import io
import json
from collections.abc import Mapping
from typing import Any

import grain
import msgpack
import numpy as np
from PIL import Image

from univit_jax import paths
from univit_jax.data import sources

FORMAT = "univit-array-record"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
KEYS = "keys.txt"
# ArrayRecord writer options: group size 1 lets grain read one record without its neighbours.
WRITER_OPTIONS = "group_size:1"
RECORDS_PER_SHARD = 1024
# Where array_record's reader finds shards itself: local files, and `gs://` through its own GCS
# reader (google-cloud-cpp); no fsspec, so any other scheme needs a local mount.
READABLE_SCHEMES = (None, "gs")


def shard_name(shard: int, num_shards: int) -> str:
  return f"data-{shard:05d}-of-{num_shards:05d}.array_record"


def _png(frame: np.ndarray) -> bytes:
  """One uint8 `[H, W, C]` frame (C = 1, 3 or 4) as PNG bytes (lossless)."""
  frame = np.asarray(frame)
  buffer = io.BytesIO()
  Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(buffer, format="PNG")
  return buffer.getvalue()


def encode(record: Mapping[str, Any], key: str) -> bytes:
  """A record of a source (any `sources` record form) as the bytes of one stored record named
  `key` (its `sources.record_keys` entry).

  A file's bytes are copied, not decoded: a corrupt file stays a bad record, counted when read.

  Raises:
    OSError: a file that cannot be read.
  """
  out: dict[str, Any] = dict(version=FORMAT_VERSION, key=key,
                             label=int(record.get("label", -1)))
  if "frames" in record:
    frames = np.asarray(record["frames"])
    if len(frames) == 1:
      out["image"] = _png(frames[0])
    else:
      out["frames"] = [_png(frame) for frame in frames]
  elif "encoded_frames" in record:
    out["frames"] = list(record["encoded_frames"])
  else:
    media = (paths.path(record["path"]).read_bytes() if "path" in record
             else bytes(record["data"]))
    out[record["kind"]] = media
    out.update({k: float(record[k]) for k in ("start", "end") if k in record})
  if "boxes" in record:
    boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    out["boxes"] = boxes.tolist()
    out["box_labels"] = np.asarray(record.get("box_labels", np.zeros(len(boxes))),
                                   np.int64).tolist()
    if "box_mask" in record:
      out["box_mask"] = np.asarray(record["box_mask"], bool).tolist()
  return msgpack.packb(dict(sorted(out.items())), use_bin_type=True)


def decode(data: bytes) -> dict[str, Any]:
  """A stored record as a `sources` record (media still encoded).

  Raises:
    ValueError: bytes that are not a record of FORMAT_VERSION.
  """
  try:
    stored = msgpack.unpackb(data, raw=False)
  except (msgpack.UnpackException, ValueError) as e:
    raise ValueError(f"not a {FORMAT} record ({type(e).__name__}: {e})") from e
  if not isinstance(stored, dict) or stored.get("version") != FORMAT_VERSION:
    raise ValueError(f"not a {FORMAT} record of version {FORMAT_VERSION}")
  record: dict[str, Any] = dict(key=str(stored["key"]), label=int(stored["label"]))
  if "frames" in stored:
    record["encoded_frames"] = tuple(stored["frames"])
  else:
    kind = "image" if "image" in stored else "video"
    record.update(data=stored[kind], kind=kind)
    record.update({k: stored[k] for k in ("start", "end") if k in stored})
  if "boxes" in stored:
    record["boxes"] = np.asarray(stored["boxes"], np.float32).reshape(-1, 4)
    record["box_labels"] = np.asarray(stored["box_labels"], np.int32)
    if "box_mask" in stored:
      record["box_mask"] = np.asarray(stored["box_mask"], bool)
  return record


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of the converted dataset in folder `path`.

  Raises:
    sources.SourceError: no manifest (not a converted dataset, or its conversion has not
      finished), or one of another format or version.
  """
  file = paths.path(path) / MANIFEST
  if not file.exists():
    raise sources.SourceError(
      f"{path}: no {MANIFEST}, so not a complete converted dataset (python -m "
      f"univit_jax.data.convert --out={path} ... writes it last)")
  manifest = json.loads(file.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
    raise sources.SourceError(
      f"{file}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
      f"reader knows {FORMAT!r} version {FORMAT_VERSION}")
  return manifest


class ArrayRecordSource:
  """The records of a converted dataset (a grain random-access source, picklable for workers).

  Shards are opened lazily by grain's `ArrayRecordDataSource` from the manifest's record counts,
  so opening a dataset of many shards costs one listing of the folder, not one open per shard.
  array_record reads the shards itself (READABLE_SCHEMES): a `gs://` shard by ranged reads, never
  copied whole.
  """

  def __init__(self, path: str, kind: str):
    """Opens the dataset in folder `path`, whose records must be of `kind` ("image" | "video").

    Raises:
      sources.SourceError: a scheme array_record cannot read, no complete dataset there
        (`read_manifest`), records of another kind, or shards named in the manifest that are
        missing.
    """
    if paths.scheme(path) not in READABLE_SCHEMES:
      raise sources.SourceError(
        f"{path}: array_record reads shards from local paths and gs:// only, not "
        f"{paths.scheme(path)}://; copy the dataset there or mount it locally")
    manifest = read_manifest(path)
    if manifest["kind"] != kind:
      raise sources.SourceError(
        f"{path} holds {manifest['kind']} records, not {kind} ones (the source's `kind`)")
    folder = paths.path(path)
    present = {p.name for p in folder.glob("data-*.array_record")}
    missing = [s["file"] for s in manifest["shards"] if s["file"] not in present]
    if missing:
      raise sources.SourceError(f"{path}: {len(missing)} shards of {MANIFEST} are missing, "
                                f"e.g. {missing[:3]}")
    self._path, self._kind = path, kind
    self._content = manifest["keys_sha256"][:16]
    # `file[start:end]` names the records of a shard without opening it.
    self._records = grain.sources.ArrayRecordDataSource(
      [f"{folder / s['file']}[0:{s['records']}]" for s in manifest["shards"]])

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode(self._records[index])

  def keys(self) -> list[str]:
    """Every record's key, in record order, from the dataset's keys file (no record is read)."""
    return (paths.path(self._path) / KEYS).read_text().splitlines()

  def content_key(self) -> str:
    """A digest of the records' keys in order (`pipeline.sources_fingerprint`)."""
    return self._content

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self._path}, {len(self)} {self._kind} records)"
