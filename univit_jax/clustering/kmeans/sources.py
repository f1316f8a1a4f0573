"""The rows k-means clusters: the `RowSource` protocol, in-memory and centred sources, and
their reading in normalised blocks over one process's shard.

Spherical k-means works on unit rows, and the bank may not fit in memory, so every pass streams
the rows through `blocks` (normalised as they are read) over the contiguous shard of rows that
`shard_bounds` gives this process. `CenteredSource` serves `ClusterSpec.center`: the rows minus
their mean (`mean_row`, reduced across processes), which the k-means normalises again.
"""

from collections.abc import Iterator
from typing import Protocol

import jax
import numpy as np

from univit_jax import collectives


class RowSource(Protocol):
  """Rows to cluster, e.g. `store.BankReader`: global row numbering in a fixed order."""
  num_rows: int
  dim: int

  def rows(self, start: int, stop: int) -> Iterator[np.ndarray]:
    """Features of rows [start, stop) as consecutive [n_i, D] pieces."""

  def gather(self, rows: np.ndarray) -> np.ndarray:
    """Features of the given rows, [len(rows), D]."""


class ArraySource:
  """An in-memory [N, D] array as a `RowSource` (tests, benchmarks)."""

  def __init__(self, features: np.ndarray):
    self.features = np.asarray(features, dtype=np.float32)
    self.num_rows, self.dim = self.features.shape

  def rows(self, start: int, stop: int) -> Iterator[np.ndarray]:
    yield self.features[start:stop]

  def gather(self, rows: np.ndarray) -> np.ndarray:
    return self.features[rows]


class CenteredSource:
  """Rows of `source`, unit-normalised, minus `mean [D]` (k-means normalises them again). A row
  equal to the mean, which would have no direction left, is kept uncentred."""

  def __init__(self, source: RowSource, mean: np.ndarray):
    self.source, self.mean = source, np.asarray(mean, np.float32)
    self.num_rows, self.dim = source.num_rows, source.dim

  def _center(self, x: np.ndarray) -> np.ndarray:
    x = normalize(x)
    centred = x - self.mean
    flat = np.einsum("nd,nd->n", centred, centred) < 1e-12
    centred[flat] = x[flat]
    return centred

  def rows(self, start: int, stop: int) -> Iterator[np.ndarray]:
    for x in self.source.rows(start, stop):
      yield self._center(x)

  def gather(self, rows: np.ndarray) -> np.ndarray:
    return self._center(self.source.gather(rows))


def mean_row(source: RowSource, block_rows: int = 16_384) -> np.ndarray:
  """float32 [D] mean of the unit-normalised rows, summed in float64 over every process's shard
  (the same on every process, whatever the number of processes)."""
  start, stop = shard_bounds(source.num_rows, jax.process_count(), jax.process_index())
  total = np.zeros(source.dim, np.float64)
  for _, x in blocks(source, start, stop, block_rows):
    total += x.astype(np.float64).sum(axis=0)
  return (collectives.sum_across_processes(total) / source.num_rows).astype(np.float32)


def normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm, float32 (float64 input, e.g. centroid sums, is scaled in
  float64 and then rounded)."""
  x = np.asarray(x)
  x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
  return (x / _row_norms(x)).astype(np.float32, copy=False)


def _row_norms(x: np.ndarray) -> np.ndarray:
  """L2 norms of the rows of `x [n, D]` as `[n, 1]` (einsum: several times faster than
  np.linalg.norm here)."""
  return np.sqrt(np.einsum("nd,nd->n", x, x))[:, None]


def shard_bounds(num_rows: int, process_count: int, process_index: int) -> tuple[int, int]:
  """The contiguous global rows [start, stop) that process `process_index` assigns."""
  return (num_rows * process_index // process_count,
          num_rows * (process_index + 1) // process_count)


def blocks(source: RowSource, start: int, stop: int,
           size: int) -> Iterator[tuple[int, np.ndarray]]:
  """(first global row, normalised features) blocks of at most `size` rows over [start, stop)."""
  for lo in range(start, stop, size):
    hi = min(stop, lo + size)
    x = np.concatenate(list(source.rows(lo, hi))).astype(np.float32, copy=False)  # a new array
    x /= _row_norms(x)  # in place: one copy less than normalize
    yield lo, x
