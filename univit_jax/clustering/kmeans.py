"""Spherical k-means over a streamed feature bank, with JAX matmul or ScaNN assignment.

Each iteration makes one pass over the rows (chunk by chunk, so N may exceed RAM):

1. assign every row to its nearest centroid by cosine (rows and centroids are unit vectors),
   searching only the rows whose bounds cannot prove their centroid still nearest (below);
2. accumulate per-cluster sums (float64) and counts, reduced across processes;
3. new centroid = normalised sum; empty clusters are re-seeded (below).

The objective is the mean cosine of a row to its assigned centroid. With exact assignment Lloyd's
steps never lower it. The approximate paths keep that guarantee too: each searched row's
previous centroid is always a candidate, so a row never moves to a worse centroid than the one it
had, and the update step can only raise the sum of cosines of a fixed assignment.

Bounds (Hamerly's algorithm, with angles on the sphere as the metric): a search returns a row's
two nearest centroids, and the angle to the second is a lower bound on the angle to every
centroid but its own. When the centroids move, the bound drops by the largest move among the
others. A row whose angle to its own centroid (computed exactly every pass) is within its bound
keeps that centroid unsearched. Once k-means settles, few rows are searched: on the benchmark's
data, 100%, 88%, 11%, then 0% of the rows over the first four iterations at K 65,536.

Assignment backends (`ClusterSpec.backend`):
  * "exact": brute force over all centroids in two stages (`MatmulAssigner`): a tiled JAX matmul
    finds each row's best groups of centroids, NumPy scores those exactly in float32.
  * "auto": the same with the group screening in `screen_dtype` ("auto": bfloat16 where the
    hardware multiplies it natively, 5-7x float32's rate on the dev VM's AMX); the chosen
    candidates are still scored in float32. For K > `brute_force_max_k` (default 65,536) the
    iterations after the first search a ScaNN tree, as "scann" does.
  * "scann": ScaNN. Brute force for K <= `brute_force_max_k`; above it a partitioned (tree) index
    over the centroids with exact (brute-force) scoring of the searched leaves (quantised AH
    scoring was slower at equal recall at K=16k, and its upserts cost 2 s per iteration at 65k).
    The first iteration is brute force (random initial centroids have no structure for a tree:
    recall is 0.4-0.75 there), and so, by default, is the final top-k labels pass
    (`ClusterSpec.exact_labels`). The tree is trained once, on the centroids after the first
    iteration; later iterations upsert the centroids that moved instead of rebuilding it.
    Searches go through `search_batched_parallel`. On the benchmark's data the bf16 matmul with
    bounds beat the tree at K 16,384 and 65,536 (benchmarks/kmeans.py, method "scann").

Empty clusters: after each pass the empty clusters (in index order) are moved onto the rows worst
served by the current centroids (lowest cosine to their assigned centroid, ties by row index), at
most `RESEED_POOL` per iteration; any beyond that keep their centroid and are retried on the next
pass. Re-seeding cannot lower the objective, since no row was assigned to an empty cluster.

Multi-process: process p of P assigns the contiguous rows [p*N/P, (p+1)*N/P); sums, counts,
objective and re-seed candidates are reduced with JAX collectives
(`multihost_utils.process_allgather`), so every process holds the same centroids.

Resume: with a `checkpoint_dir`, the state after each iteration (centroids, each row's assignment,
the serialized ScaNN index, histories) is committed atomically; a rerun continues from it and ends
with the same centroids and labels as an uninterrupted run.
"""

import dataclasses
import functools
import glob
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
from jax.experimental import multihost_utils

from univit_jax import atomic

INITS = ("kmeans++", "random")
BACKENDS = ("auto", "scann", "exact")
SCREEN_DTYPES = ("auto", "bfloat16", "float32")
# Default K at or below which "auto" assigns with the JAX matmul and "scann" by brute force.
BRUTE_FORCE_MAX_K = 65_536
# Most empty clusters re-seeded per iteration.
RESEED_POOL = 8192
# Most re-seeded centroids scored against every row on the next pass (instead of widening every
# row's bound by their jump).
MAX_CHECKED = 1024


class KMeansError(ValueError):
  """Invalid clustering input or parameters; the message names the bank."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """How to cluster one bank.

  Attributes:
    num_clusters: K, the number of centroids.
    iterations: Lloyd iterations (assignment + update passes).
    top_k: nearest centroids stored per row, sorted by cosine (the multi-label positives).
    init: "kmeans++" (greedy, on a sample of `init_sample` rows; cost O(K log K * sample * D))
      or "random" (K distinct rows).
    backend: "auto", "scann" or "exact" (see module docstring).
    seed: seeds the initialisation.
    num_leaves: leaves of the ScaNN tree over the centroids (default about 2 sqrt(K)).
    leaves_to_search: leaves searched per row (default num_leaves // 32, at least 16; top-1
      recall measured on the benchmark's clustered data: 0.990 at K=16k (N=50k) and 0.99995 at
      K=65k (N=200k) for one search, >= 0.99999 once the previous assignment is a candidate).
    init_sample: rows sampled for k-means++ (at least K).
    block_rows: rows assigned per step (bounds host memory).
    brute_force_max_k: at or below this K, "auto" and "exact" assign by the matmul and "scann"
      by ScaNN's brute force; above it "auto" and "scann" use the ScaNN tree.
    exact_labels: the final top-k labels by brute force over all centroids (the matmul, or
      ScaNN's brute force) rather than the tree. The tree finds the nearest centroid reliably
      (top-1 recall >= 0.997 in benchmarks/kmeans.py) but ranks 2..k far less so: beyond a
      row's own cluster the cosines are near ties, and only ~30-60% of the exact top-10 were
      found at K=16k.
    screen_dtype: dtype in which the matmul path of "auto" and "scann" screens candidates:
      "auto" (bfloat16 on accelerators and on CPUs with bf16 units, else float32), "bfloat16"
      or "float32". Candidates are always re-scored in float32; "exact" screens in float32.
    center: cluster the rows minus their mean (then re-normalised). A young teacher's features
      can share one large component (every row within a few degrees of the mean direction, a
      k-means objective of ~0.99); centred, they are clustered by what tells them apart. The
      centroids, cosines and objective then live in the centred space, and the result carries
      the mean (`KMeansResult.mean`) to map new rows there.
  """
  num_clusters: int
  iterations: int = 20
  top_k: int = 10
  init: str = "kmeans++"
  backend: str = "auto"
  seed: int = 0
  num_leaves: int | None = None
  leaves_to_search: int | None = None
  init_sample: int = 65_536
  block_rows: int = 16_384
  brute_force_max_k: int = BRUTE_FORCE_MAX_K
  exact_labels: bool = True
  screen_dtype: str = "auto"
  center: bool = False

  def validate(self, name: str) -> None:
    """Raises KMeansError naming bank `name` and the field for impossible values."""
    checks = (
      ("num_clusters", self.num_clusters >= 1), ("iterations", self.iterations >= 1),
      ("top_k", 1 <= self.top_k <= self.num_clusters), ("init", self.init in INITS),
      ("backend", self.backend in BACKENDS), ("block_rows", self.block_rows >= 1),
      ("num_leaves", self.num_leaves is None or self.num_leaves >= 2),
      ("leaves_to_search", self.leaves_to_search is None or self.leaves_to_search >= 1),
      ("screen_dtype", self.screen_dtype in SCREEN_DTYPES))
    for field, ok in checks:
      if not ok:
        raise KMeansError(
          f"bank {name!r}: cluster spec {field}={getattr(self, field)!r} is invalid "
          f"(num_clusters={self.num_clusters}, init in {INITS}, backend in {BACKENDS}, "
          f"screen_dtype in {SCREEN_DTYPES})")

  def matmul_dtype(self) -> jnp.dtype:
    """Screening dtype of the matmul path: float32 for the "exact" backend."""
    return jnp.dtype(jnp.float32) if self.backend == "exact" else resolve_screen_dtype(
      self.screen_dtype)

  def uses_tree(self) -> bool:
    return self.backend != "exact" and self.num_clusters > self.brute_force_max_k

  def tree_shape(self) -> tuple[int, int]:
    leaves = self.num_leaves or max(2, round(2 * math.sqrt(self.num_clusters)))
    return leaves, min(leaves, self.leaves_to_search or max(16, leaves // 32))


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
  for _, x in _blocks(source, start, stop, block_rows):
    total += x.astype(np.float64).sum(axis=0)
  return (_sum_across_processes(total) / source.num_rows).astype(np.float32)


@dataclasses.dataclass
class KMeansResult:
  """Outcome of `spherical_kmeans` as seen by this process.

  Attributes:
    centroids: float32 [K, D] unit centroids (identical on every process).
    labels: int32 [n_local, top_k] nearest centroids of this process's rows, best first.
    similarities: float32 [n_local, top_k] their cosines.
    row_range: (start, stop) global rows of this process.
    objective: mean cosine to the assigned centroid, per pass (iterations + the final pass).
    empty: empty clusters per iteration (before re-seeding).
    searched: rows searched per iteration (all processes); the others kept their centroid
      because their bounds proved it still nearest.
    seconds: wall time per pass.
    mean: float32 [D] the mean subtracted from the rows (`ClusterSpec.center`), else None.
  """
  centroids: np.ndarray
  labels: np.ndarray
  similarities: np.ndarray
  row_range: tuple[int, int]
  objective: list[float]
  empty: list[int]
  searched: list[int]
  seconds: list[float]
  mean: np.ndarray | None = None


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


def _blocks(source: RowSource, start: int, stop: int,
            size: int) -> Iterator[tuple[int, np.ndarray]]:
  """(first global row, normalised features) blocks of at most `size` rows over [start, stop)."""
  for lo in range(start, stop, size):
    hi = min(stop, lo + size)
    x = np.concatenate(list(source.rows(lo, hi))).astype(np.float32, copy=False)  # a new array
    x /= _row_norms(x)  # in place: one copy less than normalize
    yield lo, x


# ---------------------------------------------------------------------------------------------
# Assignment backends. Each maps unit rows x [n, D] to (ids int32 [n, k], cosines float32 [n, k])
# sorted best first; the cosines are always float32 dot products with the current centroids.

_GROUP = 128  # columns per group of the two-stage max / top-k


@functools.cache
def _cpu_has_bf16_units() -> bool:
  """Whether this x86 CPU multiplies bf16 natively (AMX or AVX512-BF16; Linux only)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return False
  return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_screen_dtype(name: str) -> jnp.dtype:
  """The dtype that "auto" means here: bfloat16 on accelerators and on CPUs with bf16 units
  (~6x float32's matmul rate on the dev VM's AMX), else float32 (emulated bf16 is slower)."""
  if name == "auto":
    fast = jax.default_backend() != "cpu" or _cpu_has_bf16_units()
    name = "bfloat16" if fast else "float32"
  return jnp.dtype(name)


@functools.partial(jax.jit, static_argnames="group")
def _group_maxima(x: jax.Array, tiles: jax.Array, pad: jax.Array, group: int) -> jax.Array:
  """Largest cosine of each row `x [B, D]` within each `group` consecutive centroids: `[B, G]`.

  The centroids come as tiles `[n, D, tile]` in the screening dtype (`pad [n, tile]` is -inf on
  padding columns) and are scanned, so each [B, tile] block of similarities stays in cache
  instead of a [B, K] matrix going through memory, and only its group maxima leave it: a max
  costs little next to the matmul, where XLA's CPU argmax or top_k over a long row costs more.
  """
  b, (count, _, tile) = x.shape[0], tiles.shape
  exact = tiles.dtype == jnp.float32
  xs = x.astype(tiles.dtype)

  def scan_tile(_, inputs):
    weights, bias = inputs
    sims = jnp.dot(xs, weights, precision=jax.lax.Precision.HIGHEST if exact else None,
                   preferred_element_type=jnp.float32) + bias
    return None, sims.reshape(b, tile // group, group).max(axis=-1)

  _, maxima = jax.lax.scan(scan_tile, None, (tiles, pad), unroll=4)
  return maxima.transpose(1, 0, 2).reshape(b, count * tile // group)


class MatmulAssigner:
  """Nearest centroids by brute force over all of them, in two stages.

  1. JAX (any device): a tiled matmul gives each row's best cosine per group of consecutive
     centroids (a whole tile of 512 for k <= 2 at large K, else 128).
  2. Host: the rows are scored exactly (float32 NumPy) against the centroids of their best
     k groups, where their top k lie (each of the top k sits in a group whose maximum is at
     least its own cosine); ties go to the lowest id.

  The screening dtype only chooses the groups. float32 screening is exact. bfloat16 screening
  (f32 accumulation; 1.5 TFLOP/s against 0.2 for float32 on the dev VM's AMX) chooses by
  cosines good to ~2e-4, so a centroid is missed only where another group's best is within
  that of it: the gap to the second-best centroid was >= 0.019 for 99% of the benchmark's rows.
  """

  # Rows per step, and centroids per tile of the scan. Large row blocks amortise streaming the
  # tiles: bf16 [8192, 512] with one maximum per tile ran at ~1.5 TFLOP/s on the 2-core dev VM,
  # [2048, 512] at ~1.0, and [8192, 512] with 4 group maxima per tile at ~1.05.
  _ROWS = 8192
  _TILE = 512
  _WHOLE_TILES_MIN_K = 16_384

  def __init__(self, centroids: np.ndarray, dtype: jnp.dtype | str = "float32"):
    k, d = centroids.shape
    self.dtype = jnp.dtype(dtype)
    self.approximate = self.dtype != jnp.float32
    tile = min(self._TILE, -(-k // _GROUP) * _GROUP)
    count = -(-k // tile)
    self._padded = np.zeros((count * tile, d), np.float32)
    self._padded[:k] = centroids
    self._num_centroids = k
    self._tiles = jnp.asarray(self._padded.reshape(count, tile, d).transpose(0, 2, 1), self.dtype)
    self._pad = jnp.asarray(np.where(np.arange(count * tile) < k, 0.0, -np.inf)
                            .astype(np.float32).reshape(count, tile))

  def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    # Power-of-two blocks of 1,024 rows or more: few compiled shapes (each compiles once per
    # process and K), and small inputs are not padded to a full block.
    block = min(self._ROWS, max(1024, 1 << max(0, n - 1).bit_length()))
    padded = np.zeros((-(-n // block) * block, x.shape[1]), np.float32)
    padded[:n] = x
    tile = self._tiles.shape[-1]
    # Whole tiles as groups are fastest to screen but cost the host stage m * 512 centroids
    # per row: worth it only where the screen dominates (large K) and k is small.
    group = tile if k <= 2 and self._num_centroids >= self._WHOLE_TILES_MIN_K else _GROUP
    maxima = np.concatenate([
      np.asarray(_group_maxima(padded[lo:lo + block], self._tiles, self._pad, group))
      for lo in range(0, padded.shape[0], block)])[:n]
    # One group more than needed under float32 screening, so that rounding differences between
    # the two stages cannot drop a centroid at an exact tie.
    groups = _top_columns(maxima, k + 1 if not self.approximate else k)
    return self._score_groups(x, groups, group, k)

  def _score_groups(self, x: np.ndarray, groups: np.ndarray, size: int,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row of `x [n, D]` among the centroids of its groups `[n, m]` (of
    `size` consecutive centroids each): one matmul per group over the rows that chose it."""
    n, m = groups.shape
    kk = min(k, size)
    flat = groups.ravel()  # entry i: row i // m
    cand_ids = np.empty((n * m, kk), np.int64)
    cand_sims = np.empty((n * m, kk), np.float32)
    order = np.argsort(flat, kind="stable")
    for part in np.split(order, np.flatnonzero(np.diff(flat[order])) + 1):
      lo = int(flat[part[0]]) * size
      sims = x[part // m] @ self._padded[lo:lo + size].T
      sims[:, max(0, self._num_centroids - lo):] = -np.inf
      best = _top_columns(sims, kk)
      cand_ids[part] = lo + best
      cand_sims[part] = np.take_along_axis(sims, best, 1)
    cand_ids, cand_sims = cand_ids.reshape(n, m * kk), cand_sims.reshape(n, m * kk)
    order = np.lexsort((cand_ids, -cand_sims), axis=1)[:, :k]
    return (np.take_along_axis(cand_ids, order, 1).astype(np.int32),
            np.take_along_axis(cand_sims, order, 1))


def _top_columns(values: np.ndarray, k: int) -> np.ndarray:
  """Columns of the k largest entries of each row of `values [n, c]`, in no particular order;
  of equal entries the lowest columns (so that ties go to the lowest centroid id)."""
  if k >= values.shape[1]:
    return np.broadcast_to(np.arange(values.shape[1]), values.shape)
  best = np.argmax(values, axis=1)
  if k == 1:
    return best[:, None]
  if k == 2:  # two argmax passes beat argpartition
    rows = np.arange(len(values))
    first = values[rows, best]
    values[rows, best] = -np.inf
    second = np.argmax(values, axis=1)
    values[rows, best] = first
    return np.stack([best, second], axis=1)
  best = np.argpartition(-values, k - 1, axis=1)[:, :k]
  chosen = np.take_along_axis(values, best, 1)
  kth = chosen.min(axis=1, keepdims=True)
  # argpartition picks arbitrarily among entries equal to the k-th: redo those rows stably.
  ties = (values == kth).sum(axis=1) > (chosen == kth).sum(axis=1)
  if ties.any():
    best[ties] = np.argsort(-values[ties], axis=1, kind="stable")[:, :k]
  return best


def _merge_candidates(x: np.ndarray, centroids: np.ndarray, ids: np.ndarray, sims: np.ndarray,
                      extra: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-k of candidates ids/sims [n, c] (best first) plus one more id per row, extra [n].

  The extra id is scored exactly and dropped where it is already among the candidates.
  """
  extra_sims = np.einsum("nd,nd->n", x, centroids[extra])
  extra_sims = np.where((ids == extra[:, None]).any(axis=1), -np.inf, extra_sims)
  ids = np.concatenate([ids, extra[:, None]], axis=1)
  sims = np.concatenate([sims, extra_sims[:, None]], axis=1)
  order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)


class ScannAssigner:
  """Nearest centroids by ScaNN: brute force, or a tree (`tree_shape` = (leaves, searched)).

  The tree's partitions are trained once; `update` upserts only the centroids that changed, so
  the index always scores the current centroids exactly (brute-force leaf scoring: the returned
  cosines are float32 dot products with the current centroids). Where upserted centroids land
  depends on the history of upserts, so checkpoints serialize the index (`save` / `load`) rather
  than rebuild it: a resumed run then searches the very same index.
  """

  approximate = True

  def __init__(self, centroids: np.ndarray, tree_shape: tuple[int, int] | None,
               searcher=None):
    import scann  # pylint: disable=import-outside-toplevel  # heavy; only this backend needs it
    self.tree_shape = tree_shape
    self.centroids = np.array(centroids, dtype=np.float32)
    self._exact = None
    if searcher is None:
      builder = scann.scann_ops_pybind.builder(self.centroids, 1, "dot_product")
      if tree_shape is not None:
        leaves, search = tree_shape
        # k-means++ seeding of the partitioner: with ScaNN's random init the tree differs from
        # run to run, and so would the labels of a resumed or multi-process run.
        builder = builder.tree(num_leaves=leaves, num_leaves_to_search=search,
                               training_sample_size=len(self.centroids), spherical=True,
                               random_init=False)
      searcher = builder.score_brute_force().build()
    self.searcher = searcher  # scann_ops_pybind.ScannSearcher (built without docids)

  def save(self, directory: str) -> None:
    """Serializes the index (with its current centroids) into a new `directory`, fsynced."""
    os.makedirs(directory)
    self.searcher.serialize(directory, relative_path=True)
    atomic.fsync_tree(directory)

  @classmethod
  def load(cls, directory: str, centroids: np.ndarray,
           tree_shape: tuple[int, int]) -> "ScannAssigner":
    """The index saved by `save`; `centroids` must be the ones it held then."""
    import scann  # pylint: disable=import-outside-toplevel
    return cls(centroids, tree_shape, scann.scann_ops_pybind.load_searcher(directory))

  def update(self, centroids: np.ndarray) -> None:
    changed = np.flatnonzero((centroids != self.centroids).any(axis=1))
    if changed.size:
      # The pybind searcher's upsert takes row indices (the wrapper's needs docids).
      self.searcher.searcher.upsert(changed.tolist(), np.ascontiguousarray(centroids[changed]),
                                    1024)
      self.centroids = np.array(centroids, dtype=np.float32)
      self._exact = None

  def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    leaves = self.tree_shape[1] if self.tree_shape else None
    ids, sims = self.searcher.search_batched_parallel(
      np.ascontiguousarray(x), final_num_neighbors=k, leaves_to_search=leaves, batch_size=256)
    ids = ids.astype(np.int32)
    # Searched leaves holding fewer than k centroids leave NaN slots: search those rows exactly.
    short = np.isnan(sims).any(axis=1)
    if short.any():
      if self._exact is None:
        self._exact = MatmulAssigner(self.centroids)
      ids[short], sims[short] = self._exact.search(x[short], k)
    return ids, sims


# ---------------------------------------------------------------------------------------------
# Initialisation.


@functools.partial(jax.jit, static_argnames=("k", "trials"))
def _kmeans_pp(x: jax.Array, key: jax.Array, k: int, trials: int) -> jax.Array:
  """Greedy k-means++ seeding on unit rows x [S, D]; returns k row indices.

  Each step draws `trials` candidates with probability proportional to their squared chord
  distance 2 - 2 cos to the nearest chosen row and keeps the one that lowers the total distance
  most (greedy k-means++, as in scikit-learn: far fewer merged clusters than plain k-means++).
  """
  first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, x.shape[0])

  def chord(rows):
    cos = jnp.dot(x, x[rows].T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(2.0 - 2.0 * cos, 0.0)

  def body(i, state):
    chosen, dist = state
    logits = jnp.where(dist.sum() > 0, jnp.log(dist), 0.0)
    candidates = jax.random.categorical(jax.random.fold_in(key, i), logits, shape=(trials,))
    new = jnp.minimum(dist[:, None], chord(candidates))
    best = jnp.argmin(new.sum(axis=0))
    return chosen.at[i].set(candidates[best]), new[:, best]

  chosen = jnp.zeros((k,), jnp.int32).at[0].set(first)
  chosen, _ = jax.lax.fori_loop(1, k, body, (chosen, chord(first[None])[:, 0]))
  return chosen


def initial_centroids(source: RowSource, spec: ClusterSpec) -> np.ndarray:
  """float32 [K, D] unit centroids from rows of `source`; the same on every process."""
  rng = np.random.default_rng(spec.seed)
  k, n = spec.num_clusters, source.num_rows
  if spec.init == "random":
    return normalize(source.gather(np.sort(rng.choice(n, size=k, replace=False))))
  sample_rows = np.sort(rng.choice(n, size=min(n, max(k, spec.init_sample)), replace=False))
  sample = normalize(source.gather(sample_rows))
  trials = 2 + int(math.log(k))
  chosen = _kmeans_pp(jnp.asarray(sample), jax.random.key(spec.seed), k, trials)
  return sample[np.asarray(chosen)]


# ---------------------------------------------------------------------------------------------
# Cross-process reduction.


def _sum_across_processes(x: np.ndarray) -> np.ndarray:
  """Sum over processes of a float64 or integer array, the same on every process.

  float64 is sent as a float32 (high, low) pair, since JAX runs without x64 by default.
  """
  if jax.process_count() == 1:
    return x
  if x.dtype == np.float64:
    high = x.astype(np.float32)
    low = (x - high).astype(np.float32)
    parts = np.asarray(multihost_utils.process_allgather(np.stack([high, low])), np.float64)
    return parts.sum(axis=(0, 1))
  return np.asarray(multihost_utils.process_allgather(x.astype(np.int32))).astype(x.dtype).sum(0)


def _gather_across_processes(x: np.ndarray) -> np.ndarray:
  """Concatenation over processes along axis 0 (every process passes the same shape)."""
  if jax.process_count() == 1:
    return x
  return np.concatenate(list(np.asarray(multihost_utils.process_allgather(x))))


def barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# Checkpoints: state.npz (written by process 0, after every process wrote its assignments).


def _rows_path(directory: str, iteration: int) -> str:
  return os.path.join(directory, f"rows_it{iteration:04d}_p{jax.process_index():03d}"
                      f"of{jax.process_count():03d}.npz")


def _save_checkpoint(directory: str, state: dict, rows: "RowState",
                     index: ScannAssigner | None) -> None:
  """Commits the state after an iteration; `index` must already hold `state["centroids"]`."""
  iteration = int(state["iteration"])
  atomic.save_npz(_rows_path(directory, iteration), **dataclasses.asdict(rows))
  index_dir = f"scann_it{iteration:04d}" if index is not None else ""
  if jax.process_index() == 0 and index is not None:
    shutil.rmtree(os.path.join(directory, index_dir), ignore_errors=True)
    index.save(os.path.join(directory, index_dir))
  barrier(f"kmeans_assign_{iteration}")
  if jax.process_index() == 0:
    atomic.save_npz(os.path.join(directory, "state.npz"), index_dir=np.array(index_dir), **state)
  barrier(f"kmeans_state_{iteration}")
  keep = os.path.basename(_rows_path(directory, iteration))
  suffix = keep.split("_", 2)[2]
  for path in glob.glob(os.path.join(directory, f"rows_it*_{suffix}")):
    if os.path.basename(path) != keep:
      os.remove(path)
  if jax.process_index() == 0:
    for path in glob.glob(os.path.join(directory, "scann_it*")):
      if os.path.basename(path) != index_dir:
        shutil.rmtree(path)


def _load_checkpoint(directory: str, version: str) -> tuple[dict, "RowState"] | None:
  path = os.path.join(directory, "state.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    state = {key: f[key] for key in f.files}
  if str(state["version"]) != version:
    return None
  rows_path = _rows_path(directory, int(state["iteration"]))
  if not os.path.exists(rows_path):
    return None
  with np.load(rows_path) as f:
    return state, RowState(**{key: f[key] for key in f.files})


# ---------------------------------------------------------------------------------------------


def _check_size(source: RowSource, spec: ClusterSpec, name: str) -> None:
  spec.validate(name)
  if spec.num_clusters > source.num_rows:
    raise KMeansError(
      f"bank {name!r}: num_clusters={spec.num_clusters} is larger than the bank's "
      f"{source.num_rows} rows")


def spherical_kmeans(source: RowSource, spec: ClusterSpec, *, name: str = "features",
                     checkpoint_dir: str | None = None, version: str = "",
                     init_centroids: np.ndarray | None = None,
                     log: Callable[[str], None] = print) -> KMeansResult:
  """Clusters the unit-normalised rows of `source` and labels them with their top-k centroids.

  Args:
    source: the rows (every process sees all of them; each assigns its own shard).
    spec: K, iterations, top-k, init, backend, seed.
    name: bank name, for messages.
    checkpoint_dir: where to checkpoint after each iteration and resume from; None disables.
    version: identifies the inputs and parameters; a checkpoint of another version is ignored.
    init_centroids: [K, D] starting centroids instead of `spec.init` (comparisons, benchmarks;
      in the centred space when `spec.center`).
    log: receives one progress line per pass.

  Returns:
    The centroids and this process's labels (see `KMeansResult`).

  Raises:
    KMeansError: for K larger than N or an invalid spec, naming the bank.
  """
  _check_size(source, spec, name)
  start, stop = shard_bounds(source.num_rows, jax.process_count(), jax.process_index())
  mean = None
  if spec.center:  # recomputed on resume: deterministic, and one pass of the ~20
    mean = mean_row(source, spec.block_rows)
    source = CenteredSource(source, mean)
  restored = _load_checkpoint(checkpoint_dir, version) if checkpoint_dir else None
  scann_index = None
  if restored:
    state, rows = restored
    centroids = state["centroids"]
    iteration = int(state["iteration"])
    objective, seconds = ([float(v) for v in state[key]] for key in ("objective", "seconds"))
    empty, searched = ([int(v) for v in state[key]] for key in ("empty", "searched"))
    checked = state["checked"]
    if str(state["index_dir"]):
      scann_index = ScannAssigner.load(os.path.join(checkpoint_dir, str(state["index_dir"])),
                                       centroids, spec.tree_shape())
    log(f"{name}: resumed k-means at iteration {iteration}")
  else:
    centroids = (initial_centroids(source, spec) if init_centroids is None
                 else normalize(init_centroids))
    rows = RowState.fresh(stop - start)
    checked = np.zeros(0, np.int64)
    iteration, objective, empty, searched, seconds = 0, [], [], [], []

  for iteration in range(iteration, spec.iterations):
    t0 = time.perf_counter()
    if iteration > 0 and spec.uses_tree():
      if scann_index is None:  # trained once, on the centroids after the first iteration
        scann_index = ScannAssigner(centroids, spec.tree_shape())
      assigner = scann_index
    elif spec.backend == "scann":
      assigner = ScannAssigner(centroids, None)
    else:
      assigner = MatmulAssigner(centroids, spec.matmul_dtype())
    sums, counts, total, num_searched, worst_sims, worst_rows = _assign_pass(
      source, (start, stop), spec.block_rows, assigner, centroids, rows, checked)
    sums, counts = _sum_across_processes(sums), _sum_across_processes(counts)
    objective.append(float(_sum_across_processes(total)[0]) / source.num_rows)
    searched.append(int(_sum_across_processes(num_searched)[0]))
    new_centroids = _update_centroids(source, centroids, sums, counts, worst_sims, worst_rows)
    empties = np.flatnonzero(counts == 0)
    empty.append(len(empties))
    checked = empties if len(empties) <= MAX_CHECKED else empties[:0]  # re-seeded: they jump
    rows.widen(_angles_moved(centroids, new_centroids), checked)
    centroids = new_centroids
    seconds.append(time.perf_counter() - t0)
    log(f"{name}: iteration {iteration + 1}/{spec.iterations} objective {objective[-1]:.6f} "
        f"empty {empty[-1]} searched {searched[-1] / source.num_rows:.1%} "
        f"({seconds[-1]:.2f}s, {type(assigner).__name__})")
    if scann_index is not None:
      scann_index.update(centroids)
    if checkpoint_dir:
      _save_checkpoint(checkpoint_dir, dict(
        version=np.array(version), iteration=np.array(iteration + 1), centroids=centroids,
        objective=np.array(objective), empty=np.array(empty), searched=np.array(searched),
        seconds=np.array(seconds), checked=checked), rows, scann_index)

  t0 = time.perf_counter()
  if spec.uses_tree() and not spec.exact_labels:
    final = scann_index or ScannAssigner(centroids, spec.tree_shape())
  elif spec.backend == "scann" and not spec.uses_tree():
    final = ScannAssigner(centroids, None)
  else:
    final = MatmulAssigner(centroids, spec.matmul_dtype())
  labels, similarities = [], []
  for lo, x in _blocks(source, start, stop, spec.block_rows):
    ids, sims = final.search(x, spec.top_k)
    if final.approximate and spec.iterations > 0:
      # The last assignment stays a candidate, so the top-1 label is never worse than it.
      prev = rows.assign[lo - start:lo - start + len(x)]
      ids, sims = _merge_candidates(x, centroids, ids, sims, prev, spec.top_k)
    labels.append(ids)
    similarities.append(sims)
  labels = np.concatenate(labels) if labels else np.zeros((0, spec.top_k), np.int32)
  similarities = (np.concatenate(similarities) if similarities
                  else np.zeros((0, spec.top_k), np.float32))
  total = np.array([similarities[:, 0].astype(np.float64).sum()])
  objective.append(float(_sum_across_processes(total)[0]) / source.num_rows)
  seconds.append(time.perf_counter() - t0)
  log(f"{name}: labels (top-{spec.top_k}) objective {objective[-1]:.6f} ({seconds[-1]:.2f}s)")
  return KMeansResult(centroids=centroids, labels=labels, similarities=similarities,
                      row_range=(start, stop), objective=objective, empty=empty,
                      searched=searched, seconds=seconds, mean=mean)


# Slack on float32 cosines (rounding of 256-D dot products is ~1e-6) before they become bounds.
_COS_SLACK = 1e-5


def _angle(cosines: np.ndarray) -> np.ndarray:
  return np.arccos(np.clip(cosines, -1.0, 1.0)).astype(np.float32)


def _angles_moved(old: np.ndarray, new: np.ndarray) -> np.ndarray:
  """Angle in radians between each old and new unit centroid, [K] (via the chord: accurate for
  the tiny moves of late iterations, where arccos of a float32 cosine is not)."""
  diff = new - old  # float32 differences of nearby unit vectors are exact (Sterbenz)
  chord = np.sqrt(np.einsum("kd,kd->k", diff, diff, dtype=np.float64))
  return 2.0 * np.arcsin(np.minimum(chord / 2.0, 1.0))


@dataclasses.dataclass
class RowState:
  """What the k-means loop keeps per local row between passes (checkpointed with it).

  Attributes:
    assign: int32 [n] current centroid (-1 before the first pass).
    lower: float32 [n] Hamerly's bound: at most the angle (radians) from the row to any centroid
      but its own. A row whose angle to its own centroid is at most `lower` keeps it without a
      search. Exact search makes it a true bound; approximate search, a bound over the
      centroids it scored.
  """
  assign: np.ndarray
  lower: np.ndarray

  @classmethod
  def fresh(cls, n: int) -> "RowState":
    return cls(np.full(n, -1, np.int32), np.zeros(n, np.float32))

  def widen(self, moved: np.ndarray, checked: np.ndarray) -> None:
    """Lowers the bounds after the centroids moved by `moved` [K] radians: no other centroid
    came closer to a row than the largest move among them (triangle inequality on the sphere).
    The `checked` centroids (re-seeded ones, which jump) are left out: the next pass scores
    them against every row instead."""
    moved = moved.copy()
    moved[checked] = 0.0
    if moved.size < 2:
      return
    second, first = np.argsort(moved)[-2:]
    step = np.where(self.assign == first, moved[second], moved[first])
    self.lower = np.maximum(self.lower - step, 0.0).astype(np.float32)


def _assign_pass(source: RowSource, row_range: tuple[int, int], block_rows: int, assigner,
                 centroids: np.ndarray, rows: RowState, checked: np.ndarray):
  """One Lloyd assignment pass over this process's rows; updates `rows` in place.

  A row is searched only when its bounds cannot prove its centroid still nearest (every row on
  the first pass). The `checked` centroids, which `rows.widen` left out, tighten every bound
  first. With an approximate assigner a searched row keeps its previous centroid
  unless the search found a better one (so the objective cannot drop).

  Returns:
    (sums float64 [K, D], counts int64 [K], total cosine float64 [1], rows searched int64 [1],
    and the cosines and global rows of the (up to RESEED_POOL) worst-served rows, worst first)
    of this process.
  """
  k, dim = centroids.shape
  start, stop = row_range
  sums, counts = np.zeros((k, dim), np.float64), np.zeros(k, np.int64)
  total, num_searched = np.zeros(1, np.float64), np.zeros(1, np.int64)
  worst_sims, worst_rows = np.zeros(0, np.float32), np.zeros(0, np.int64)
  for lo, x in _blocks(source, start, stop, block_rows):
    local = slice(lo - start, lo - start + len(x))
    ids, lower = rows.assign[local], rows.lower[local]
    assigned = ids >= 0
    if assigned.all():  # every pass but the first: no masked copy of x
      sims = np.einsum("nd,nd->n", x, centroids[ids])
    else:
      sims = np.full(len(x), -np.inf, np.float32)
      sims[assigned] = np.einsum("nd,nd->n", x[assigned], centroids[ids[assigned]])
    if checked.size:  # re-seeded centroids, none of them a row's own (they had no rows)
      lower = np.minimum(lower, _angle((x @ centroids[checked].T).max(axis=1) + _COS_SLACK))
    search = ~assigned | (_angle(sims - _COS_SLACK) > lower)
    if search.any():
      found, found_sims = assigner.search(x[search], min(2, k))
      if k == 1:
        found, found_sims = np.pad(found, ((0, 0), (0, 1))), np.pad(
          found_sims, ((0, 0), (0, 1)), constant_values=-np.inf)
      prev, prev_sims = ids[search], sims[search]
      keep = (prev_sims > found_sims[:, 0]) if assigner.approximate else np.zeros_like(prev, bool)
      # The best cosine among the other candidates bounds every other centroid's from above.
      runner_up = np.where(keep, np.where(found[:, 0] == prev, found_sims[:, 1], found_sims[:, 0]),
                           np.maximum(found_sims[:, 1], np.where(
                             (prev >= 0) & (prev != found[:, 0]), prev_sims, -np.inf)))
      ids = ids.copy()
      ids[search] = np.where(keep, prev, found[:, 0])
      sims[search] = np.where(keep, prev_sims, found_sims[:, 0])
      lower = lower.copy()
      lower[search] = _angle(runner_up + _COS_SLACK)
      num_searched += int(search.sum())
    rows.assign[local], rows.lower[local] = ids, lower
    sums_of, block_sums = _cluster_sums(x, ids)
    sums[sums_of] += block_sums
    counts += np.bincount(ids, minlength=k)
    total += sims.astype(np.float64).sum()
    worst_sims = np.concatenate([worst_sims, sims])
    worst_rows = np.concatenate([worst_rows, np.arange(lo, lo + len(x))])
    keep_worst = np.lexsort((worst_rows, worst_sims))[:min(RESEED_POOL, k)]
    worst_sims, worst_rows = worst_sims[keep_worst], worst_rows[keep_worst]
  return sums, counts, total, num_searched, worst_sims, worst_rows


def _cluster_sums(x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(clusters present in ids, float64 [len(clusters), D] sums of their rows of x).

  A sparse one-hot [clusters, n] times x: one pass over x, ~20x faster than np.add.reduceat.
  Summing in float64 makes the result independent of how rows are split into blocks and
  processes (to float32 precision), so one process and several give the same centroids.
  """
  order = np.argsort(ids, kind="stable")
  clusters, first = np.unique(ids[order], return_index=True)
  onehot = scipy.sparse.csr_matrix(
    (np.ones(len(ids), np.float64), order, np.append(first, len(ids))),
    shape=(len(clusters), len(ids)))
  return clusters, onehot @ x.astype(np.float64)


def _update_centroids(source: RowSource, centroids: np.ndarray, sums: np.ndarray,
                      counts: np.ndarray, worst_sims: np.ndarray,
                      worst_rows: np.ndarray) -> np.ndarray:
  """Normalised sums; empty clusters moved onto the globally worst-served rows."""
  filled = counts > 0
  if filled.all():  # no copies of [K, D] float64 sums through a mask
    new = normalize(sums)
  else:
    new = centroids.copy()
    new[filled] = normalize(sums[filled])
  empties = np.flatnonzero(~filled)
  if empties.size:
    pool = min(RESEED_POOL, len(centroids))
    sims = _gather_across_processes(np.pad(worst_sims, (0, pool - len(worst_sims)),
                                           constant_values=np.inf))
    rows = _gather_across_processes(np.pad(worst_rows, (0, pool - len(worst_rows)),
                                           constant_values=-1))
    order = np.lexsort((rows, sims))
    seeds = rows[order][np.isfinite(sims[order])][:empties.size]
    new[empties[:len(seeds)]] = normalize(source.gather(seeds))
  return new
