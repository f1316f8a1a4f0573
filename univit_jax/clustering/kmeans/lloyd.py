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

Bounds (`bounds`): a row is searched only when Hamerly's bounds, with angles on the sphere as
the metric, cannot prove its centroid still nearest; once k-means settles, few rows are.

Candidate lists (`candidates`, `ClusterSpec.candidates`, on by default for "auto" at K <=
`brute_force_max_k`): where clusters overlap so heavily that the bounds skip few rows, the full
searches return each searched row's `candidates` nearest centroids, and the passes between them
(all but passes 0, 1, 4, 16, 64, ...) score each row only against its own list.

Assignment backends (`ClusterSpec.backend`):
  * "exact": brute force over all centroids in two stages (`assigners.MatmulAssigner`): a tiled
    JAX matmul finds each row's best tiles of centroids, NumPy scores those exactly in float32.
    Every pass searches: no candidate lists.
  * "auto": the same with the tile screening in `screen_dtype` ("auto": bfloat16 where the
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
objective and re-seed candidates are reduced with JAX collectives (`univit_jax.collectives`),
so every process holds the same centroids.

Resume (`checkpoint`): with a `checkpoint_dir`, the state after each iteration is committed
atomically; a rerun continues from it and ends with the same centroids and labels as an
uninterrupted run.

The package: `sources` (the rows and their blocks), `assigners` (the search backends), `bounds`
(the assignment pass), `candidates` (the lists and when full searches run), `checkpoint` (the
resumable state); this module is the loop itself, its spec (`ClusterSpec`), initialisation,
update step and result.
"""

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from univit_jax import collectives
from univit_jax.clustering.kmeans import assigners, bounds, checkpoint, sources
from univit_jax.clustering.kmeans import candidates as candidate_lists

INITS = ("kmeans++", "random")
BACKENDS = ("auto", "scann", "exact")
SCREEN_DTYPES = ("auto", "bfloat16", "float32")
# Default K at or below which "auto" assigns with the JAX matmul and "scann" by brute force.
BRUTE_FORCE_MAX_K = 65_536
# Most empty clusters re-seeded per iteration.
RESEED_POOL = 8192
# Default `ClusterSpec.candidates`: each row's nearest centroids kept between full searches.
CANDIDATES = 8
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
    candidates: m, the length of each row's candidate list under "auto" at K <=
      `brute_force_max_k` (`candidates`): full searches return each row's m nearest centroids,
      and the passes between them score rows against their own lists only. For data whose
      clusters overlap so much that the bounds skip few rows. 0 searches all centroids on
      every pass.
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
  candidates: int = CANDIDATES

  def validate(self, name: str) -> None:
    """Raises KMeansError naming bank `name` and the field for impossible values."""
    checks = (
      ("num_clusters", self.num_clusters >= 1), ("iterations", self.iterations >= 1),
      ("top_k", 1 <= self.top_k <= self.num_clusters), ("init", self.init in INITS),
      ("backend", self.backend in BACKENDS), ("block_rows", self.block_rows >= 1),
      ("num_leaves", self.num_leaves is None or self.num_leaves >= 2),
      ("leaves_to_search", self.leaves_to_search is None or self.leaves_to_search >= 1),
      ("screen_dtype", self.screen_dtype in SCREEN_DTYPES),
      ("candidates", isinstance(self.candidates, int) and not isinstance(self.candidates, bool)
       and self.candidates >= 0))
    for field, ok in checks:
      if not ok:
        raise KMeansError(
          f"bank {name!r}: cluster spec {field}={getattr(self, field)!r} is invalid "
          f"(num_clusters={self.num_clusters}, init in {INITS}, backend in {BACKENDS}, "
          f"screen_dtype in {SCREEN_DTYPES}, candidates >= 0)")

  def matmul_dtype(self) -> jnp.dtype:
    """Screening dtype of the matmul path: float32 for the "exact" backend."""
    return jnp.dtype(jnp.float32) if self.backend == "exact" else assigners.resolve_screen_dtype(
      self.screen_dtype)

  def uses_tree(self) -> bool:
    return self.backend != "exact" and self.num_clusters > self.brute_force_max_k

  def num_candidates(self) -> int:
    """Length of each row's candidate list (`candidates`): 0 where the lists are off."""
    if self.backend != "auto" or self.uses_tree():
      return 0
    return min(self.candidates, self.num_clusters)

  def tree_shape(self) -> tuple[int, int]:
    leaves = self.num_leaves or max(2, round(2 * math.sqrt(self.num_clusters)))
    return leaves, min(leaves, self.leaves_to_search or max(16, leaves // 32))


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


def initial_centroids(source: sources.RowSource, spec: ClusterSpec) -> np.ndarray:
  """float32 [K, D] unit centroids from rows of `source`; the same on every process."""
  rng = np.random.default_rng(spec.seed)
  k, n = spec.num_clusters, source.num_rows
  if spec.init == "random":
    return sources.normalize(source.gather(np.sort(rng.choice(n, size=k, replace=False))))
  sample_rows = np.sort(rng.choice(n, size=min(n, max(k, spec.init_sample)), replace=False))
  sample = sources.normalize(source.gather(sample_rows))
  trials = 2 + int(math.log(k))
  chosen = _kmeans_pp(jnp.asarray(sample), jax.random.key(spec.seed), k, trials)
  return sample[np.asarray(chosen)]


def _check_size(source: sources.RowSource, spec: ClusterSpec, name: str) -> None:
  spec.validate(name)
  if spec.num_clusters > source.num_rows:
    raise KMeansError(
      f"bank {name!r}: num_clusters={spec.num_clusters} is larger than the bank's "
      f"{source.num_rows} rows")


# The host stages' many small matmuls run in one BLAS thread: on a loaded machine OpenBLAS's
# workers wait for a core on every call (a [256, 256] x [256, 32] product took 8 ms with two
# threads and 47 us with one on the shared dev VM), and the device screen runs meanwhile.
@threadpoolctl.threadpool_limits.wrap(limits=1, user_api="blas")
def spherical_kmeans(source: sources.RowSource, spec: ClusterSpec, *, name: str = "features",
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
  start, stop = sources.shard_bounds(source.num_rows, jax.process_count(), jax.process_index())
  mean = None
  if spec.center:  # recomputed on resume: deterministic, and one pass of the ~20
    mean = sources.mean_row(source, spec.block_rows)
    source = sources.CenteredSource(source, mean)
  restored = checkpoint.load(checkpoint_dir, version) if checkpoint_dir else None
  scann_index = None
  if restored:
    state, rows = restored
    centroids = state["centroids"]
    iteration = int(state["iteration"])
    objective, seconds = ([float(v) for v in state[key]] for key in ("objective", "seconds"))
    empty, searched = ([int(v) for v in state[key]] for key in ("empty", "searched"))
    checked = state["checked"]
    if str(state["index_dir"]):
      scann_index = assigners.ScannAssigner.load(
        os.path.join(checkpoint_dir, str(state["index_dir"])), centroids, spec.tree_shape())
    log(f"{name}: resumed k-means at iteration {iteration}")
  else:
    centroids = (initial_centroids(source, spec) if init_centroids is None
                 else sources.normalize(init_centroids))
    rows = bounds.RowState.fresh(stop - start, spec.num_candidates())
    checked = np.zeros(0, np.int64)
    iteration, objective, empty, searched, seconds = 0, [], [], [], []

  for iteration in range(iteration, spec.iterations):
    t0 = time.perf_counter()
    from_candidates = spec.num_candidates() > 0 and not candidate_lists.full_search(iteration)
    if from_candidates:
      assigner = None
    elif iteration > 0 and spec.uses_tree():
      if scann_index is None:  # trained once, on the centroids after the first iteration
        scann_index = assigners.ScannAssigner(centroids, spec.tree_shape())
      assigner = scann_index
    elif spec.backend == "scann":
      assigner = assigners.ScannAssigner(centroids, None)
    else:
      assigner = assigners.MatmulAssigner(centroids, spec.matmul_dtype())
    # The first pass's lists (of the initial centroids) would all be replaced by the second's.
    list_length = spec.num_candidates() if iteration > 0 else 0
    sums, counts, total, num_searched, worst_sims, worst_rows = bounds.assign_pass(
      source, (start, stop), spec.block_rows, assigner, centroids, rows, checked, RESEED_POOL,
      list_length, from_candidates)
    sums, counts = collectives.sum_across_processes(sums), collectives.sum_across_processes(counts)
    objective.append(float(collectives.sum_across_processes(total)[0]) / source.num_rows)
    searched.append(int(collectives.sum_across_processes(num_searched)[0]))
    new_centroids = _update_centroids(source, centroids, sums, counts, worst_sims, worst_rows)
    empties = np.flatnonzero(counts == 0)
    empty.append(len(empties))
    checked = empties if len(empties) <= MAX_CHECKED else empties[:0]  # re-seeded: they jump
    rows.widen(bounds.angles_moved(centroids, new_centroids), checked)
    centroids = new_centroids
    seconds.append(time.perf_counter() - t0)
    log(f"{name}: iteration {iteration + 1}/{spec.iterations} objective {objective[-1]:.6f} "
        f"empty {empty[-1]} searched {searched[-1] / source.num_rows:.1%} "
        f"({seconds[-1]:.2f}s, {type(assigner).__name__ if assigner else 'candidate lists'})")
    if scann_index is not None:
      scann_index.update(centroids)
    if checkpoint_dir:
      checkpoint.save(checkpoint_dir, dict(
        version=np.array(version), iteration=np.array(iteration + 1), centroids=centroids,
        objective=np.array(objective), empty=np.array(empty), searched=np.array(searched),
        seconds=np.array(seconds), checked=checked), rows, scann_index)

  t0 = time.perf_counter()
  if spec.uses_tree() and not spec.exact_labels:
    final = scann_index or assigners.ScannAssigner(centroids, spec.tree_shape())
  elif spec.backend == "scann" and not spec.uses_tree():
    final = assigners.ScannAssigner(centroids, None)
  else:
    final = assigners.MatmulAssigner(centroids, spec.matmul_dtype())
  labels, similarities = [], []
  for lo, x in sources.blocks(source, start, stop, spec.block_rows):
    ids, sims = final.search(x, spec.top_k)
    if final.approximate and spec.iterations > 0:
      # The last assignment stays a candidate, so the top-1 label is never worse than it.
      prev = rows.assign[lo - start:lo - start + len(x)]
      ids, sims = assigners.merge_candidates(x, centroids, ids, sims, prev, spec.top_k)
    labels.append(ids)
    similarities.append(sims)
  labels = np.concatenate(labels) if labels else np.zeros((0, spec.top_k), np.int32)
  similarities = (np.concatenate(similarities) if similarities
                  else np.zeros((0, spec.top_k), np.float32))
  total = np.array([similarities[:, 0].astype(np.float64).sum()])
  objective.append(float(collectives.sum_across_processes(total)[0]) / source.num_rows)
  seconds.append(time.perf_counter() - t0)
  log(f"{name}: labels (top-{spec.top_k}) objective {objective[-1]:.6f} ({seconds[-1]:.2f}s)")
  return KMeansResult(centroids=centroids, labels=labels, similarities=similarities,
                      row_range=(start, stop), objective=objective, empty=empty,
                      searched=searched, seconds=seconds, mean=mean)


def _update_centroids(source: sources.RowSource, centroids: np.ndarray, sums: np.ndarray,
                      counts: np.ndarray, worst_sims: np.ndarray,
                      worst_rows: np.ndarray) -> np.ndarray:
  """Normalised sums; empty clusters moved onto the globally worst-served rows."""
  filled = counts > 0
  if filled.all():  # no copies of [K, D] float64 sums through a mask
    new = sources.normalize(sums)
  else:
    new = centroids.copy()
    new[filled] = sources.normalize(sums[filled])
  empties = np.flatnonzero(~filled)
  if empties.size:
    pool = min(RESEED_POOL, len(centroids))
    sims = collectives.gather_local(np.pad(worst_sims, (0, pool - len(worst_sims)),
                                            constant_values=np.inf))
    rows = collectives.gather_local(np.pad(worst_rows, (0, pool - len(worst_rows)),
                                            constant_values=-1))
    order = np.lexsort((rows, sims))
    seeds = rows[order][np.isfinite(sims[order])][:empties.size]
    new[empties[:len(seeds)]] = sources.normalize(source.gather(seeds))
  return new
