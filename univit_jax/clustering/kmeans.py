"""Spherical k-means over a streamed feature bank, with ScaNN or exact JAX assignment.

Each iteration makes one pass over the rows (chunk by chunk, so N may exceed RAM):

1. assign every row to its nearest centroid by cosine (rows and centroids are unit vectors);
2. accumulate per-cluster sums (float64) and counts, reduced across processes;
3. new centroid = normalised sum; empty clusters are re-seeded (below).

The objective is the mean cosine of a row to its assigned centroid. With exact assignment Lloyd's
steps never lower it. The approximate (ScaNN tree) path keeps that guarantee too: each row's
previous centroid is always a candidate, so a row never moves to a worse centroid than the one it
had, and the update step can only raise the sum of cosines of a fixed assignment.

Assignment backends (`ClusterSpec.backend`):
  * "exact": blocked JAX matmul + top-k, float32 at HIGHEST precision. Best for small K.
  * "scann": ScaNN. Brute force for K <= `brute_force_max_k`; above it a partitioned (tree) index
    over the centroids with exact (brute-force) scoring of the searched leaves (quantised AH
    scoring was slower at equal recall at K=16k). The first iteration is always exact (random
    initial centroids have no structure for a tree: recall is 0.4-0.75 there), and so, by
    default, is the final top-k labels pass (`ClusterSpec.exact_labels`). The tree is trained
    once, on the centroids after the first iteration; later iterations upsert the centroids that
    moved instead of rebuilding it. Searches go through `search_batched_parallel`.
  * "auto": exact JAX for K <= `brute_force_max_k` (default 4096), as "scann" above it (with the
    first iteration on the exact JAX path).

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
# Default K at or below which "auto" assigns with the exact JAX matmul and "scann" by brute force.
BRUTE_FORCE_MAX_K = 4096
# Most empty clusters re-seeded per iteration.
RESEED_POOL = 8192


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
    brute_force_max_k: at or below this K, "auto" assigns exactly and "scann" by brute force;
      above it both use the ScaNN tree.
    exact_labels: the final top-k labels by exact search (one exact pass over the rows, like
      the first iteration). The tree finds the nearest centroid reliably (top-1 recall >= 0.997
      in benchmarks/kmeans.py) but ranks 2..k far less so: beyond a row's own cluster the
      cosines are near ties, and only ~30-60% of the exact top-10 were found at K=16k.
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

  def validate(self, name: str) -> None:
    """Raises KMeansError naming bank `name` and the field for impossible values."""
    checks = (
      ("num_clusters", self.num_clusters >= 1), ("iterations", self.iterations >= 1),
      ("top_k", 1 <= self.top_k <= self.num_clusters), ("init", self.init in INITS),
      ("backend", self.backend in BACKENDS), ("block_rows", self.block_rows >= 1),
      ("num_leaves", self.num_leaves is None or self.num_leaves >= 2),
      ("leaves_to_search", self.leaves_to_search is None or self.leaves_to_search >= 1))
    for field, ok in checks:
      if not ok:
        raise KMeansError(
          f"bank {name!r}: cluster spec {field}={getattr(self, field)!r} is invalid "
          f"(num_clusters={self.num_clusters}, init in {INITS}, backend in {BACKENDS})")

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
    seconds: wall time per pass.
  """
  centroids: np.ndarray
  labels: np.ndarray
  similarities: np.ndarray
  row_range: tuple[int, int]
  objective: list[float]
  empty: list[int]
  seconds: list[float]


def normalize(x: np.ndarray) -> np.ndarray:
  """Rows scaled to unit L2 norm, float32 (float64 input, e.g. centroid sums, is scaled first)."""
  if np.asarray(x).dtype == np.float64:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
  x = np.asarray(x, dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def shard_bounds(num_rows: int, process_count: int, process_index: int) -> tuple[int, int]:
  """The contiguous global rows [start, stop) that process `process_index` assigns."""
  return (num_rows * process_index // process_count,
          num_rows * (process_index + 1) // process_count)


def _blocks(source: RowSource, start: int, stop: int,
            size: int) -> Iterator[tuple[int, np.ndarray]]:
  """(first global row, normalised features) blocks of at most `size` rows over [start, stop)."""
  for lo in range(start, stop, size):
    hi = min(stop, lo + size)
    yield lo, normalize(np.concatenate(list(source.rows(lo, hi))))


# ---------------------------------------------------------------------------------------------
# Assignment backends. Each maps unit rows x [n, D] to (ids int32 [n, k], cosines float32 [n, k])
# sorted best first.


@functools.partial(jax.jit, static_argnames="k")
def _exact_topk_block(x: jax.Array, centroids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  values, ids = jax.lax.top_k(jnp.dot(x, centroids.T, precision=jax.lax.Precision.HIGHEST), k)
  return values, ids.astype(jnp.int32)


_GROUP = 128  # columns per group of the two-stage argmax


@jax.jit
def _nearest_block(x: jax.Array, tiles: jax.Array, pad: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of each row `x [B, D]`: cosines `[B, 1]`, ids `[B, 1]`.

  The centroids come as tiles `[n, D, tile]` (`pad [n, tile]` is -inf on padding columns) and are
  scanned with a running best, so each [B, tile] block of similarities stays in cache instead of
  a [B, K] matrix going through memory. Within a tile the argmax is two-stage (max over groups
  of 128, then the argmax inside the best group): XLA's CPU argmax over a long row costs more
  than the matmul, a max does not. Ties resolve to the lowest id, as `jnp.argmax` does.
  """
  b, tile = x.shape[0], tiles.shape[-1]

  def scan_tile(carry, inputs):
    best, best_id = carry
    index, weights, bias = inputs
    sims = jnp.dot(x, weights, precision=jax.lax.Precision.HIGHEST) + bias
    groups = sims.reshape(b, tile // _GROUP, _GROUP)
    group_max = groups.max(axis=-1)
    group = jnp.argmax(group_max, axis=-1)
    inside = jnp.take_along_axis(groups, group[:, None, None], axis=1)[:, 0]
    value = group_max.max(axis=-1)
    ids = index * tile + group * _GROUP + jnp.argmax(inside, axis=-1)
    better = value > best
    return (jnp.where(better, value, best), jnp.where(better, ids, best_id)), None

  init = (jnp.full((b,), -jnp.inf, jnp.float32), jnp.zeros((b,), jnp.int32))
  (best, best_id), _ = jax.lax.scan(
    scan_tile, init, (jnp.arange(tiles.shape[0], dtype=jnp.int32), tiles, pad))
  return best[:, None], best_id[:, None]


class ExactAssigner:
  """Exact nearest centroids in JAX: a tiled scan for k = 1 (the assignment of every k-means
  iteration), a blocked matmul + top_k for the final top-k labels."""

  approximate = False
  # [1024, 2048] float32 similarity blocks (8 MiB, within L3): ~200 GFLOP/s on the 2-core dev VM
  # at K 16k-65k against ~110 for one [rows, K] block with a plain argmax.
  _TILE = 2048
  _ROWS = 1024

  def __init__(self, centroids: np.ndarray):
    k, d = centroids.shape
    self.centroids = jnp.asarray(centroids)
    self.block = int(min(4096, max(64, 2 ** 23 // k)))
    tile = min(self._TILE, -(-k // _GROUP) * _GROUP)
    count = -(-k // tile)
    padded = np.zeros((count * tile, d), np.float32)
    padded[:k] = centroids
    self._tiles = jnp.asarray(padded.reshape(count, tile, d).transpose(0, 2, 1))
    self._pad = jnp.asarray(np.where(np.arange(count * tile) < k, 0.0, -np.inf)
                            .astype(np.float32).reshape(count, tile))

  def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    block = self._ROWS if k == 1 else self.block
    padded = np.zeros((-(-n // block) * block, x.shape[1]), np.float32)
    padded[:n] = x
    ids, sims = [], []
    for lo in range(0, padded.shape[0], block):
      if k == 1:
        s, i = _nearest_block(padded[lo:lo + block], self._tiles, self._pad)
      else:
        s, i = _exact_topk_block(padded[lo:lo + block], self.centroids, k)
      sims.append(np.asarray(s))
      ids.append(np.asarray(i))
    return np.concatenate(ids)[:n], np.concatenate(sims)[:n]


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
        self._exact = ExactAssigner(self.centroids)
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


def _assign_path(directory: str, iteration: int) -> str:
  return os.path.join(directory, f"assign_it{iteration:04d}_p{jax.process_index():03d}"
                      f"of{jax.process_count():03d}.npy")


def _save_checkpoint(directory: str, state: dict, assign: np.ndarray,
                     index: ScannAssigner | None) -> None:
  """Commits the state after an iteration; `index` must already hold `state["centroids"]`."""
  iteration = int(state["iteration"])
  atomic.save_npy(_assign_path(directory, iteration), assign)
  index_dir = f"scann_it{iteration:04d}" if index is not None else ""
  if jax.process_index() == 0 and index is not None:
    shutil.rmtree(os.path.join(directory, index_dir), ignore_errors=True)
    index.save(os.path.join(directory, index_dir))
  barrier(f"kmeans_assign_{iteration}")
  if jax.process_index() == 0:
    atomic.save_npz(os.path.join(directory, "state.npz"), index_dir=np.array(index_dir), **state)
  barrier(f"kmeans_state_{iteration}")
  keep = os.path.basename(_assign_path(directory, iteration))
  suffix = keep.split("_", 2)[2]
  for path in glob.glob(os.path.join(directory, f"assign_it*_{suffix}")):
    if os.path.basename(path) != keep:
      os.remove(path)
  if jax.process_index() == 0:
    for path in glob.glob(os.path.join(directory, "scann_it*")):
      if os.path.basename(path) != index_dir:
        shutil.rmtree(path)


def _load_checkpoint(directory: str, version: str) -> tuple[dict, np.ndarray] | None:
  path = os.path.join(directory, "state.npz")
  if not os.path.exists(path):
    return None
  with np.load(path) as f:
    state = {key: f[key] for key in f.files}
  if str(state["version"]) != version:
    return None
  assign_path = _assign_path(directory, int(state["iteration"]))
  if not os.path.exists(assign_path):
    return None
  return state, np.load(assign_path)


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
    init_centroids: [K, D] starting centroids instead of `spec.init` (comparisons, benchmarks).
    log: receives one progress line per pass.

  Returns:
    The centroids and this process's labels (see `KMeansResult`).

  Raises:
    KMeansError: for K larger than N or an invalid spec, naming the bank.
  """
  _check_size(source, spec, name)
  start, stop = shard_bounds(source.num_rows, jax.process_count(), jax.process_index())
  restored = _load_checkpoint(checkpoint_dir, version) if checkpoint_dir else None
  scann_index = None
  if restored:
    state, assign = restored
    centroids = state["centroids"]
    iteration = int(state["iteration"])
    objective, seconds = ([float(v) for v in state[key]] for key in ("objective", "seconds"))
    empty = [int(v) for v in state["empty"]]
    if str(state["index_dir"]):
      scann_index = ScannAssigner.load(os.path.join(checkpoint_dir, str(state["index_dir"])),
                                       centroids, spec.tree_shape())
    log(f"{name}: resumed k-means at iteration {iteration}")
  else:
    centroids = (initial_centroids(source, spec) if init_centroids is None
                 else normalize(init_centroids))
    assign = np.full(stop - start, -1, np.int32)
    iteration, objective, empty, seconds = 0, [], [], []

  for iteration in range(iteration, spec.iterations):
    t0 = time.perf_counter()
    if iteration > 0 and spec.uses_tree():
      if scann_index is None:  # trained once, on the centroids after the first iteration
        scann_index = ScannAssigner(centroids, spec.tree_shape())
      assigner = scann_index
    elif spec.backend == "scann":
      assigner = ScannAssigner(centroids, None)
    else:
      assigner = ExactAssigner(centroids)
    sums, counts, total, worst_sims, worst_rows = _assign_pass(
      source, (start, stop), spec.block_rows, assigner, centroids, assign, iteration > 0)
    sums, counts = _sum_across_processes(sums), _sum_across_processes(counts)
    objective.append(float(_sum_across_processes(total)[0]) / source.num_rows)
    centroids = _update_centroids(source, centroids, sums, counts, worst_sims, worst_rows)
    empty.append(int((counts == 0).sum()))
    seconds.append(time.perf_counter() - t0)
    log(f"{name}: iteration {iteration + 1}/{spec.iterations} objective {objective[-1]:.6f} "
        f"empty {empty[-1]} ({seconds[-1]:.2f}s, {type(assigner).__name__})")
    if scann_index is not None:
      scann_index.update(centroids)
    if checkpoint_dir:
      _save_checkpoint(checkpoint_dir, dict(
        version=np.array(version), iteration=np.array(iteration + 1), centroids=centroids,
        objective=np.array(objective), empty=np.array(empty),
        seconds=np.array(seconds)), assign, scann_index)

  t0 = time.perf_counter()
  if spec.uses_tree() and not spec.exact_labels:
    final = scann_index or ScannAssigner(centroids, spec.tree_shape())
  elif spec.backend == "scann" and not spec.uses_tree():
    final = ScannAssigner(centroids, None)
  else:
    final = ExactAssigner(centroids)
  labels, similarities = [], []
  for lo, x in _blocks(source, start, stop, spec.block_rows):
    ids, sims = final.search(x, spec.top_k)
    if final.approximate and spec.iterations > 0:
      # The last assignment stays a candidate, so the top-1 label is never worse than it.
      prev = assign[lo - start:lo - start + len(x)]
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
                      row_range=(start, stop), objective=objective, empty=empty, seconds=seconds)


def _assign_pass(source: RowSource, row_range: tuple[int, int], block_rows: int, assigner,
                 centroids: np.ndarray, assign: np.ndarray, keep_previous: bool):
  """One Lloyd assignment pass over this process's rows; updates `assign` [n_local] in place.

  With an approximate assigner and `keep_previous`, a row keeps its previous centroid unless the
  search found a better one (so the objective cannot drop).

  Returns:
    (sums float64 [K, D], counts int64 [K], total cosine float64 [1], and the cosines and global
    rows of the (up to RESEED_POOL) worst-served rows, worst first) of this process.
  """
  k, dim = centroids.shape
  start, stop = row_range
  sums, counts = np.zeros((k, dim), np.float64), np.zeros(k, np.int64)
  total = np.zeros(1, np.float64)
  worst_sims, worst_rows = np.zeros(0, np.float32), np.zeros(0, np.int64)
  for lo, x in _blocks(source, start, stop, block_rows):
    ids, sims = assigner.search(x, 1)
    ids, sims = ids[:, 0], sims[:, 0]
    local = slice(lo - start, lo - start + len(x))
    if assigner.approximate and keep_previous:
      prev = assign[local]
      prev_sims = np.einsum("nd,nd->n", x, centroids[prev])
      better = prev_sims > sims
      ids, sims = np.where(better, prev, ids), np.where(better, prev_sims, sims)
    assign[local] = ids
    sums_of, block_sums = _cluster_sums(x, ids)
    sums[sums_of] += block_sums
    counts += np.bincount(ids, minlength=k)
    total += sims.astype(np.float64).sum()
    worst_sims = np.concatenate([worst_sims, sims])
    worst_rows = np.concatenate([worst_rows, np.arange(lo, lo + len(x))])
    keep = np.lexsort((worst_rows, worst_sims))[:min(RESEED_POOL, k)]
    worst_sims, worst_rows = worst_sims[keep], worst_rows[keep]
  return sums, counts, total, worst_sims, worst_rows


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
  new = centroids.copy()
  filled = counts > 0
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
