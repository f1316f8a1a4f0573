"""Chunked on-disk feature store: one bank of teacher features per clustering granularity.

Layout of a bank (`workdir/features/<bank>/`):

  meta.json            {"bank", "dim", "teacher", "inputs", "chunks": [{"name", "rows"}...],
                        "complete"}; `inputs`: what the features were made from (the data
                        sources, the extract settings: `extract.feature_inputs`)
  chunk_00000.npy      float32 [n_0, D] features
  chunk_00000.ids.npy  int64 [n_0, 2] (sample id, sub-index: segment or region; 0 if none)
  ...

and, shared by the banks, `workdir/features/keys.npy`: bytes [number of examples], the stable key
of every sample id (`pipeline.example_keys`) for the data the features were extracted from. Ids
are positions in that data; the keys say which records they were, so the cluster stage can label
records by key (`BankReader.keys`) and training attach labels to the same records after the data
changed.

A bank can hold more rows than fit in RAM: the writer appends one chunk at a time and the reader
memory-maps chunks (on an object store, which cannot be mapped, it reads one chunk at a time
into memory and keeps only the last: `paths.load_npy`). Every file is written atomically
(`atomic`: locally by rename, on an object store by one put), and a chunk only becomes part of
the bank when its entry is committed to meta.json, which happens after both of its files are on
disk. A killed writer therefore leaves at worst orphan chunk files that the resumed writer
overwrites; it never leaves a chunk that a reader could see half-written. One writer per bank.
A bank is reused (resumed, or kept when complete) only for the inputs it records
(`check_inputs`).
"""

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from univit_jax import atomic, paths, provenance

FORMAT_VERSION = 1
KEYS_FILE = "keys.npy"
# Rows with an L2 norm at or below this cannot be put on the sphere.
MIN_NORM = 1e-12


class FeatureStoreError(ValueError):
  """A bank is missing, inconsistent or holds invalid features; the message names bank and file."""


def bank_dir(workdir: str, bank: str) -> str:
  return os.path.join(workdir, "features", bank)


def keys_path(workdir: str) -> str:
  return os.path.join(workdir, "features", KEYS_FILE)


def write_keys(workdir: str, keys: np.ndarray) -> None:
  """Writes (atomically) the store's sample id -> record key table, bytes [number of examples]
  (`pipeline.example_keys`)."""
  atomic.save_npy(keys_path(workdir), np.asarray(keys, np.bytes_))


def chunk_name(index: int) -> str:
  return f"chunk_{index:05d}"


def validate_features(features: np.ndarray, dim: int, where: str) -> None:
  """Checks a [n, D] block: float rank-2, width `dim`, finite, no zero-norm row.

  Raises:
    FeatureStoreError: naming `where` (bank and file) and the first offending row.
  """
  if features.ndim != 2 or features.shape[1] != dim:
    raise FeatureStoreError(f"{where}: features have shape {features.shape}, expected [n, {dim}]")
  finite = np.isfinite(features).all(axis=1)
  if not finite.all():
    row = int(np.argmin(finite))
    raise FeatureStoreError(f"{where}: row {row} has NaN or Inf features")
  norms = np.linalg.norm(features.astype(np.float64), axis=1)
  if (norms <= MIN_NORM).any():
    row = int(np.argmax(norms <= MIN_NORM))
    raise FeatureStoreError(f"{where}: row {row} has zero norm; it cannot be clustered")


def _as_ids(ids: np.ndarray, rows: int, where: str) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim == 1:
    ids = np.stack([ids, np.zeros_like(ids)], axis=1)
  if ids.shape != (rows, 2) or not np.issubdtype(ids.dtype, np.integer):
    raise FeatureStoreError(
      f"{where}: ids must be integers of shape [{rows}] or [{rows}, 2], got {ids.dtype} "
      f"{ids.shape}")
  return ids.astype(np.int64)


def _read_meta(workdir: str, bank: str) -> dict:
  path = os.path.join(bank_dir(workdir, bank), "meta.json")
  if not paths.path(path).exists():
    raise FeatureStoreError(f"bank {bank!r}: no feature bank at {path} (run --mode=extract first)")
  try:
    return json.loads(paths.path(path).read_text())
  except json.JSONDecodeError as e:
    raise FeatureStoreError(f"bank {bank!r}: {path} is not valid JSON: {e}") from e


def check_inputs(workdir: str, bank: str, inputs: Mapping[str, Any]) -> None:
  """Refuses a bank in `workdir` (complete or not) made from other `inputs` than these.

  Raises:
    FeatureStoreError: naming the folder and each input that differs (`provenance.differences`).
  """
  if not paths.path(os.path.join(bank_dir(workdir, bank), "meta.json")).exists():
    return
  changed = provenance.differences(_read_meta(workdir, bank).get("inputs"), inputs)
  if changed:
    features = os.path.join(workdir, "features")
    raise FeatureStoreError(
      f"the features in {bank_dir(workdir, bank)} were extracted from other inputs than the "
      f"config now gives: {'; '.join(changed)}. Use a new workdir, or delete {features} (and "
      "the clusters/ and checkpoints/ made from it) to extract again")


class BankWriter:
  """Appends feature chunks to a bank; reopening an unfinished bank resumes it.

  Chunks are addressed by index so a resumed extraction can ask `has_chunk(i)` and skip the work;
  writing a chunk that is already committed is a no-op.
  """

  def __init__(self, workdir: str, bank: str, dim: int, teacher: str,
               inputs: Mapping[str, Any] | None = None):
    """Opens (or creates) the bank; `inputs` (JSON) is recorded in a new bank's meta.json, and
    must be checked against an existing one's first (`check_inputs`)."""
    self.bank, self.dim, self.teacher = bank, int(dim), str(teacher)
    self.directory = bank_dir(workdir, bank)
    self._meta_path = os.path.join(self.directory, "meta.json")
    if paths.path(self._meta_path).exists():
      meta = _read_meta(workdir, bank)
      if meta["dim"] != self.dim or meta["teacher"] != self.teacher:
        raise FeatureStoreError(
          f"bank {bank!r}: {self._meta_path} holds dim={meta['dim']} teacher={meta['teacher']!r}, "
          f"but this writer has dim={self.dim} teacher={self.teacher!r}; use a new workdir or "
          "delete the bank")
      self._meta = meta
    else:
      self._meta = dict(format=FORMAT_VERSION, bank=bank, dim=self.dim, teacher=self.teacher,
                        inputs=inputs, chunks=[], complete=False)
      atomic.write_json(self._meta_path, self._meta)

  @property
  def complete(self) -> bool:
    return bool(self._meta["complete"])

  def has_chunk(self, index: int) -> bool:
    return any(c["name"] == chunk_name(index) for c in self._meta["chunks"])

  def write_chunk(self, index: int, features: np.ndarray, ids: np.ndarray) -> bool:
    """Commits chunk `index`: features [n, D] and ids [n] or [n, 2] (sample id, sub-index).

    Returns:
      False if the chunk was already committed (nothing is written), True otherwise.

    Raises:
      FeatureStoreError: naming bank and file, for a wrong width, NaN/Inf or zero-norm rows,
        malformed ids, or a bank already marked complete.
    """
    if self.has_chunk(index):
      return False
    name = chunk_name(index)
    where = f"bank {self.bank!r}, {os.path.join(self.directory, name + '.npy')}"
    if self.complete:
      raise FeatureStoreError(f"{where}: the bank is already complete")
    features = np.asarray(features, dtype=np.float32)
    validate_features(features, self.dim, where)
    ids = _as_ids(ids, features.shape[0], where)
    atomic.save_npy(os.path.join(self.directory, name + ".npy"), features)
    atomic.save_npy(os.path.join(self.directory, name + ".ids.npy"), ids)
    chunks = sorted(self._meta["chunks"] + [dict(name=name, rows=int(features.shape[0]))],
                    key=lambda c: c["name"])
    self._meta = dict(self._meta, chunks=chunks)
    atomic.write_json(self._meta_path, self._meta)
    return True

  def finish(self) -> None:
    """Marks the bank complete, so readers (the cluster stage) accept it.

    Raises:
      FeatureStoreError: if the bank is empty or its chunk indices have gaps.
    """
    names = [c["name"] for c in self._meta["chunks"]]
    expected = [chunk_name(i) for i in range(len(names))]
    if not names or names != expected:
      missing = sorted(set(expected) - set(names)) or ["chunk_00000"]
      raise FeatureStoreError(
        f"bank {self.bank!r}, {self._meta_path}: cannot finish, missing chunks {missing[:5]}")
    self._meta = dict(self._meta, complete=True)
    atomic.write_json(self._meta_path, self._meta)


class BankReader:
  """Reads a bank chunk by chunk (memory-mapped; from an object store, one chunk in memory at a
  time), in the order rows are labelled.

  Rows are numbered globally in chunk order; `labels.npy` of the cluster stage follows this order.
  """

  def __init__(self, workdir: str, bank: str, require_complete: bool = True):
    self.bank, self.workdir = bank, workdir
    self.directory = bank_dir(workdir, bank)
    meta = _read_meta(workdir, bank)
    self.meta_path = os.path.join(self.directory, "meta.json")
    if require_complete and not meta.get("complete"):
      raise FeatureStoreError(
        f"bank {bank!r}: {self.meta_path} is not marked complete (extraction unfinished or "
        "killed); rerun --mode=extract to resume it")
    self.meta = meta
    self.dim = int(meta["dim"])
    self.teacher = str(meta["teacher"])
    self.chunk_names = [c["name"] for c in meta["chunks"]]
    self.chunk_rows = np.array([c["rows"] for c in meta["chunks"]], dtype=np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(self.chunk_rows)])
    self.num_rows = int(self.offsets[-1])
    self._mapped = paths.is_local(self.directory)
    self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _path(self, index: int, suffix: str) -> str:
    return os.path.join(self.directory, self.chunk_names[index] + suffix)

  def chunk(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `index` as (features float32 [n, D] memory-mapped, ids int64 [n, 2]); from an
    object store read into memory, dropping the chunk read before.

    Raises:
      FeatureStoreError: naming the file, if it is missing or its shape disagrees with meta.json.
    """
    if index not in self._cache:
      path, ids_path = self._path(index, ".npy"), self._path(index, ".ids.npy")
      where = f"bank {self.bank!r}, {path}"
      try:
        features = paths.load_npy(path, mmap=True)
        ids = paths.load_npy(ids_path, mmap=True)
      except (OSError, ValueError) as e:
        raise FeatureStoreError(f"{where}: cannot read chunk: {e}") from e
      rows = int(self.chunk_rows[index])
      if features.ndim != 2 or features.shape[1] != self.dim:
        raise FeatureStoreError(
          f"{where}: features have shape {features.shape} but the bank's dim is {self.dim} "
          f"({self.meta_path}); chunks have mismatched dims")
      if features.shape[0] != rows or ids.shape != (rows, 2) or features.dtype != np.float32:
        raise FeatureStoreError(
          f"{where}: holds {features.dtype} {features.shape} and ids {ids.shape}, but "
          f"{self.meta_path} records {rows} float32 rows")
      if not self._mapped:
        self._cache.clear()
      self._cache[index] = (features, ids)
    return self._cache[index]

  def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for index in range(len(self.chunk_names)):
      yield self.chunk(index)

  def ids(self) -> np.ndarray:
    """All ids in row order, int64 [N, 2]."""
    return np.concatenate([ids for _, ids in self.chunks()]) if self.chunk_names else (
      np.zeros((0, 2), np.int64))

  def keys(self) -> np.ndarray:
    """The record key of every row, in row order: bytes [N] (the store's `keys.npy` at each
    row's sample id).

    Raises:
      FeatureStoreError: no keys.npy (features extracted by an older version: rerun
        --mode=extract, which writes it for the same data), or a sample id it does not cover.
    """
    path = keys_path(self.workdir)
    try:
      table = paths.load_npy(path, mmap=True)
    except (OSError, ValueError) as e:
      raise FeatureStoreError(
        f"bank {self.bank!r}: cannot read the record keys {path} ({e}); rerun --mode=extract "
        "with the same data to write them") from e
    ids = self.ids()[:, 0]
    if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
      raise FeatureStoreError(
        f"bank {self.bank!r}: sample ids up to {int(ids.max())} in {self.directory}, but {path} "
        f"names {len(table)} records")
    return np.asarray(table[ids])

  def rows(self, start: int, stop: int) -> Iterator[np.ndarray]:
    """Features of global rows [start, stop) as pieces (memory-mapped locally), at most one per
    chunk."""
    for index in range(len(self.chunk_names)):
      lo, hi = max(start, self.offsets[index]), min(stop, self.offsets[index + 1])
      if lo < hi:
        features, _ = self.chunk(index)
        yield features[lo - self.offsets[index]:hi - self.offsets[index]]

  def gather(self, rows: np.ndarray) -> np.ndarray:
    """Features of the given global row indices, float32 [len(rows), D]."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), self.dim), np.float32)
    chunk_of = np.searchsorted(self.offsets, rows, side="right") - 1
    for index in np.unique(chunk_of):
      mask = chunk_of == index
      features, _ = self.chunk(int(index))
      out[mask] = features[rows[mask] - self.offsets[index]]
    return out

  def check(self) -> None:
    """Validates every chunk (shape, finite, non-zero norm); one streaming pass.

    Raises:
      FeatureStoreError: naming bank and file of the first invalid chunk.
    """
    if not self.num_rows:
      raise FeatureStoreError(f"bank {self.bank!r}: {self.meta_path} lists no rows")
    for index in range(len(self.chunk_names)):
      features, _ = self.chunk(index)
      validate_features(features, self.dim, f"bank {self.bank!r}, {self._path(index, '.npy')}")
