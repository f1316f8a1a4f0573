"""Random-access record sources (grain `RandomAccessDataSource`s) and reading a clip from a record.

A source has `__len__` and `__getitem__(index) -> record`. A record is a dict holding one of
  `frames`: uint8 `[T0, H, W, C]` already in memory (TFDS, demo; an image is T0 = 1),
  `path` (str) and `kind` ("video" | "image"): a file, decoded later by `load_clip`,
  `data` (bytes) and `kind`: the content of such a file (ArrayRecord shards, `records`),
  `encoded_frames`: a tuple of encoded images, the frames of a clip in order (ArrayRecord shards),
plus `label` (int; -1 when unknown), `key` (str: the record's stable name; file and ArrayRecord
sources, whose `keys()` list them; the others are named by their index: `record_keys`) and, for
sources with boxes, `boxes` float32 `[R0, 4]` (ymin, xmin, ymax, xmax in [0, 1]), `box_labels` int
`[R0]` and optionally `box_mask` bool `[R0]`. Encoded records stay encoded so that indexing a source
never decodes; decoding happens in the grain workers, where a bad file becomes a `BadRecordError`
that the stream replaces by another record.

Source specs come from `config.data.sources` (one dict per named source, with a `type` in
`config_lib.SOURCE_TYPES`); `build_source` turns a spec (`config_lib.SourceSpec`) into a source.
"""

import csv
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import av
import numpy as np
from PIL import Image, ImageOps

from univit_jax import config_lib
from univit_jax.data import video

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The only formats PIL may decode (by content, whatever the extension): common photo formats,
# not the dozens of rarely used decoders PIL would otherwise try on an untrusted file.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# Images with more pixels are refused before decoding (8192 x 8192, 192 MiB as RGB), so a small
# file declaring a huge size (a decompression bomb) cannot exhaust a worker's memory.
MAX_IMAGE_PIXELS = 8192 * 8192
MANIFEST_COLUMNS = ("path", "label", "start", "end")


class BadRecordError(Exception):
  """A record that cannot be read (missing, truncated, undecodable or empty file)."""

  def __init__(self, where: str, reason: str):
    super().__init__(f"{where}: {reason}")
    self.where = where
    self.reason = reason


class SourceError(ValueError):
  """A source's records cannot be listed (a missing path, a rejected manifest, no matching files,
  no records): the user's data or paths need fixing; the message names them."""


class Source(Protocol):
  """What the streams need from a source (grain's `RandomAccessDataSource`)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


def names_records(source: Source) -> bool:
  """Whether `source` names its records (`keys()`: file and ArrayRecord sources) rather than
  numbering them (TFDS, demo): a name stays with its record when records are added, removed or
  reordered, an index does not."""
  return hasattr(source, "keys")


def record_keys(source: Source) -> list[str]:
  """Every record's key, in record order, read without decoding a record: the names of a source
  that names its records (`names_records`), else the records' indices as strings. The one place a
  record's key is decided: the converter stores it in each record, embeddings and cluster labels
  are keyed by it."""
  if names_records(source):
    return list(source.keys())
  return [str(i) for i in range(len(source))]


def build_source(spec: config_lib.SourceSpec) -> Source:
  """Constructs the source a spec describes (may read a manifest or open a TFDS dataset)."""
  options = dict(spec.options)
  if spec.type == "array_record":
    # Imported here: `records` builds on this module.
    from univit_jax.data import records  # pylint: disable=g-import-not-at-top
    return records.ArrayRecordSource(**options)
  if spec.type == "tfds":
    return TfdsSource(**options)
  if spec.type == "video_folder":
    return FileSource(read_entries(options["path"], "video"), "video")
  if spec.type == "image_folder":
    return FileSource(read_entries(options["path"], "image"), "image")
  # Imported here so the rest of the pipeline does not depend on the demo module.
  from univit_jax.data import demo  # pylint: disable=g-import-not-at-top
  kind, split = options.pop("kind"), options.pop("split")
  return demo.DemoSource(kind, split, **options)


@dataclasses.dataclass(frozen=True)
class FileEntry:
  """A file of a folder or manifest, and the window of it a video record covers (seconds).

  `key` names the record stably wherever the data is moved: the path relative to the folder or
  manifest, with a media fragment `#t=start,end` for a window (None: the path itself).
  """
  path: str
  label: int = -1
  start: float | None = None
  end: float | None = None
  key: str | None = None


def _entry_key(entry: FileEntry) -> str:
  return entry.path if entry.key is None else entry.key


class FileSource:
  """Records naming image or video files; `kind` is "image" or "video"."""

  def __init__(self, entries: Sequence[FileEntry], kind: str):
    if kind not in ("image", "video"):
      raise ValueError(f"file source kind {kind!r}: expected 'image' or 'video'")
    self._entries = tuple(entries)
    self._kind = kind

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> dict[str, Any]:
    e = self._entries[index]
    record = dict(path=e.path, kind=self._kind, label=e.label, key=_entry_key(e))
    if e.start is not None:
      record["start"] = e.start
    if e.end is not None:
      record["end"] = e.end
    return record

  def keys(self) -> list[str]:
    """Every record's key (`FileEntry.key`, else its path), in record order."""
    return [_entry_key(e) for e in self._entries]

  def content_key(self) -> str:
    """A digest of every entry's path and time span, in order: it changes when files are added,
    removed, renamed or reordered, even at the same count (the example ids then name other
    files; `pipeline.sources_fingerprint`)."""
    digest = hashlib.sha256()
    for e in self._entries:
      digest.update(f"{e.path}\0{e.start}\0{e.end}\n".encode())
    return digest.hexdigest()[:16]

  def __repr__(self) -> str:
    return f"FileSource({len(self)} {self._kind} files)"


def read_entries(path: str, kind: str) -> list[FileEntry]:
  """File entries from a manifest (.csv / .jsonl) or a class-per-folder directory tree.

  Manifest columns: `path` (required; relative paths are relative to the manifest's folder),
  `label` (int, or class names mapped to their index in sorted order), `start` / `end` (seconds,
  videos only). A directory tree `root/<class>/<file>` gives labels by sorted class folder; files
  directly under root get label -1. Keys (`FileEntry.key`) are the paths as the manifest gives
  them, or relative to the tree's root.

  Raises:
    SourceError: the path does not exist, the manifest has unknown or missing columns, or names
      missing files; the message lists the offending rows.
  """
  if os.path.isdir(path):
    return _scan_tree(path, VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS)
  if not os.path.isfile(path):
    raise SourceError(f"source path {path!r} is neither a manifest file nor a directory")
  rows = _read_manifest_rows(path)
  return _manifest_entries(path, rows, kind)


def _scan_tree(root: str, extensions: tuple[str, ...]) -> list[FileEntry]:
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  entries = [FileEntry(os.path.join(root, f), key=f) for f in sorted(os.listdir(root))
             if f.lower().endswith(extensions)]
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    for dirpath, dirnames, filenames in os.walk(folder):
      dirnames.sort()
      for f in sorted(filenames):
        if f.lower().endswith(extensions):
          file = os.path.join(dirpath, f)
          entries.append(FileEntry(file, label, key=os.path.relpath(file, root)))
  if not entries:
    raise SourceError(f"no files with extensions {extensions} under {root!r}")
  return entries


def _read_manifest_rows(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, row dict) pairs of a CSV (with header) or JSONL manifest."""
  if path.endswith(".jsonl"):
    rows = []
    with open(path) as f:
      for line_no, line in enumerate(f, start=1):
        if line.strip():
          try:
            rows.append((line_no, json.loads(line)))
          except json.JSONDecodeError as e:
            raise SourceError(f"manifest {path} line {line_no}: not JSON ({e})") from e
    return rows
  if path.endswith(".csv"):
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      return [(line_no, {k: v for k, v in row.items() if v not in ("", None)})
              for line_no, row in enumerate(reader, start=2)]
  raise SourceError(f"manifest {path!r}: expected a .csv or .jsonl file")


def _manifest_entries(
    path: str, rows: list[tuple[int, dict[str, Any]]], kind: str) -> list[FileEntry]:
  allowed = MANIFEST_COLUMNS if kind == "video" else ("path", "label")
  base = os.path.dirname(os.path.abspath(path))
  problems = []
  for line_no, row in rows:
    unknown = sorted(set(row) - set(allowed))
    if unknown:
      problems.append(f"line {line_no}: unknown columns {unknown} (allowed: {list(allowed)})")
    elif "path" not in row:
      problems.append(f"line {line_no}: no path")
    elif not os.path.isfile(os.path.join(base, str(row["path"]))):
      problems.append(f"line {line_no}: missing file {row['path']!r}")
  if not rows:
    problems.append("no rows")
  if problems:
    listed = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise SourceError(f"manifest {path} rejected ({len(problems)} bad rows):\n  {listed}{more}")
  labels = [row.get("label") for _, row in rows]
  names = sorted({str(v) for v in labels if v is not None and not _is_int(v)})
  index = {n: i for i, n in enumerate(names)}
  entries = []
  for (_, row), label in zip(rows, labels):
    if label is None:
      label = -1
    elif _is_int(label):
      label = int(label)
    else:
      label = index[str(label)]
    start = float(row["start"]) if "start" in row else None
    end = float(row["end"]) if "end" in row else None
    entries.append(FileEntry(os.path.join(base, str(row["path"])), label, start, end,
                             os.path.normpath(str(row["path"])) + _time_fragment(start, end)))
  return entries


def _time_fragment(start: float | None, end: float | None) -> str:
  """A window as a W3C media fragment (`#t=0.5,2`, `#t=,2`, `#t=0.5,`); "" for a whole file."""
  if start is None and end is None:
    return ""
  return f"#t={'' if start is None else f'{start:g}'},{'' if end is None else f'{end:g}'}"


def _is_int(value: Any) -> bool:
  try:
    return float(value) == int(float(value)) and not isinstance(value, bool)
  except (TypeError, ValueError):
    return False


class TfdsSource:
  """A TFDS dataset read through `tfds.data_source` (array_record; no TensorFlow needed).

  Some builders (coco/2017 among them) import TensorFlow in their code; for those, give
  `builder_dir`, the prepared dataset's version folder (e.g. `<data_dir>/coco/2017/1.1.0`): it
  is then read from its files alone (`tfds.builder_from_directory`), and `name` only names it.
  Records: `frames` `[1, H, W, C]` from `image_key`, `label` from `label_key` (-1 if absent),
  and, when `boxes_key` is given (e.g. "objects/bbox" for coco/2017), `boxes` and `box_labels`
  (`box_labels_key`, e.g. "objects/label"). Nested keys use "/".
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               builder_dir: str | None = None, image_key: str = "image",
               label_key: str | None = "label", boxes_key: str | None = None,
               box_labels_key: str | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if builder_dir:
      self._ds = tfds.builder_from_directory(builder_dir).as_data_source(split=split)
    else:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
    self._where = f"tfds:{name}/{split}"
    self._image_key, self._label_key = image_key, label_key
    self._boxes_key, self._box_labels_key = boxes_key, box_labels_key

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._ds[index]
    image = to_uint8_image(np.asarray(_lookup(example, self._image_key, self._where)),
                           f"{self._where} record {index}")
    label = None
    if self._label_key:
      label = _lookup(example, self._label_key, self._where, None)
    record = dict(frames=image[None], label=-1 if label is None else int(label))
    if self._boxes_key:
      boxes = np.asarray(_lookup(example, self._boxes_key, self._where), np.float32)
      record["boxes"] = boxes.reshape(-1, 4)
      record["box_labels"] = (
        np.asarray(_lookup(example, self._box_labels_key, self._where), np.int32)
        if self._box_labels_key else np.zeros(len(record["boxes"]), np.int32))
    return record

  def __repr__(self) -> str:
    return f"TfdsSource({self._where}, {len(self)} records)"


def _lookup(example: Mapping[str, Any], key: str, where: str, *default):
  value = example
  for part in key.split("/"):
    if not isinstance(value, Mapping) or part not in value:
      if default:
        return default[0]
      raise BadRecordError(where, f"no feature {key!r}")
    value = value[part]
  return value


def to_uint8_image(image: np.ndarray, where: str) -> np.ndarray:
  """An in-memory image `[H, W]` or `[H, W, C]` as uint8 `[H, W, C]`, converting only the dtypes
  whose pixel scale is unambiguous (as `tf.image.convert_image_dtype` reads them): bool (True is
  255), uint16 (full range, e.g. 16-bit PNGs) and floats in [0, 1].

  Raises:
    BadRecordError: naming `where` and the dtype for any other dtype (signed integers, whose scale
      is a guess) or for floats outside [0, 1] or not finite.
  """
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype == np.uint8:
    return image
  if image.dtype == np.bool_:
    return image.astype(np.uint8) * np.uint8(255)
  if image.dtype == np.uint16:
    return np.round(image * (255 / 65535)).astype(np.uint8)
  if np.issubdtype(image.dtype, np.floating):
    if image.size and not (np.isfinite(image).all() and 0 <= image.min() and image.max() <= 1):
      raise BadRecordError(where, f"{image.dtype} image with values outside [0, 1]")
    return np.round(image * 255).astype(np.uint8)
  raise BadRecordError(where, f"{image.dtype} image: expected uint8, uint16, bool or floats "
                       "in [0, 1]")


def read_image(media: str | bytes) -> np.ndarray:
  """Decodes an image file, or an image's encoded bytes, in one of IMAGE_FORMATS to uint8
  `[1, H, W, 3]` (EXIF-rotated; gray/alpha/palette -> RGB).

  Raises:
    BadRecordError: for an image in no allowed format, or of more than MAX_IMAGE_PIXELS pixels
      (checked from the header, before decoding). Truncated or corrupt images raise PIL's errors
      (`load_clip` names them).
  """
  where = media if isinstance(media, str) else "encoded image"
  try:
    opened = Image.open(io.BytesIO(media) if isinstance(media, bytes) else media,
                        formats=IMAGE_FORMATS)
  except Image.UnidentifiedImageError as e:
    raise BadRecordError(where, f"not an image in an allowed format {IMAGE_FORMATS}") from e
  with opened as image:
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
      raise BadRecordError(where, f"{width}x{height} image is above MAX_IMAGE_PIXELS="
                           f"{MAX_IMAGE_PIXELS}")
    image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"))[None]


def load_clip(
    record: Mapping[str, Any], num_frames: int, sampling: str, stride: int,
    rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
  """The T frames of a record that feed a T-frame bucket, and their frame mask.

  Returns:
    frames uint8 `[T, H, W, C]` and frame_mask bool `[T]` (False on frames repeated as padding).

  Only the sampled frames of encoded frames, and of a video only the window up to the last
  sampled frame, are decoded.

  Raises:
    BadRecordError: naming the file, the record's key (or "in-memory record") and why it could
      not be read.
  """
  if "frames" in record:
    frames = np.asarray(record["frames"])
    if frames.ndim != 4 or frames.shape[0] < 1:
      raise BadRecordError("in-memory record", f"frames of shape {frames.shape}, want [T,H,W,C]")
    indices, mask = video.sample_indices(frames.shape[0], num_frames, sampling, stride, rng)
    return frames[indices], mask
  where = str(record.get("path", record.get("key", "in-memory record")))
  try:
    if "encoded_frames" in record:
      encoded = tuple(record["encoded_frames"])
    else:
      media = record["path"] if "path" in record else record["data"]
      if record["kind"] == "video":
        return video.read_clip(media, num_frames, sampling, stride, rng,
                               record.get("start"), record.get("end"))
      encoded = (media,)
    indices, mask = video.sample_indices(len(encoded), num_frames, sampling, stride, rng)
    decoded = {i: read_image(encoded[i]) for i in sorted(set(indices.tolist()))}
    return np.concatenate([decoded[i] for i in indices.tolist()]), mask
  except BadRecordError as e:
    raise BadRecordError(where, e.reason) from e
  except (av.FFmpegError, OSError, ValueError, EOFError, Image.DecompressionBombError) as e:
    # PIL raises OSError for truncated files and UnidentifiedImageError (an OSError) for garbage.
    raise BadRecordError(where, f"{type(e).__name__}: {e}") from e
