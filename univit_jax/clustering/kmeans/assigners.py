"""Assignment backends: each row's nearest centroids by a screened JAX matmul or by ScaNN.

Each assigner maps unit rows x [n, D] to (ids int32 [n, k], cosines float32 [n, k]) sorted best
first, the cosines always float32 dot products with the current centroids, and says whether it
is `approximate` (then the Lloyd loop keeps a row's previous centroid as a candidate, so the
objective cannot drop). Which one a pass uses is the Lloyd loop's choice (`lloyd`, "Assignment
backends"); here is how each searches:

  * `MatmulAssigner`: brute force in two stages, a tiled JAX matmul screening tiles of
    centroids (in float32, or bfloat16 where the hardware multiplies it natively:
    `resolve_screen_dtype`) and NumPy scoring the chosen tiles exactly in float32.
  * `ScannAssigner`: ScaNN brute force, or a tree over the centroids with exact scoring of the
    searched leaves; trained once and upserted as centroids move, and serialized with the
    k-means checkpoint so that a resumed run searches the very same index.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from univit_jax import atomic, paths

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


@jax.jit
def _tile_maxima(x: jax.Array, tiles: jax.Array, pad: jax.Array) -> jax.Array:
  """Largest cosine of each row `x [B, D]` within each tile of centroids: `[B, n]`.

  The centroids come as tiles `[n, D, tile]` in the screening dtype (`pad [n, tile]` is -inf on
  padding columns) and are scanned, so each [B, tile] block of similarities stays in cache
  instead of a [B, K] matrix going through memory, and only its maximum leaves it: XLA's CPU
  backend fuses the matmul with a plain max, where an argmax, several maxima per tile or
  anything computed between the two ran 2.5-9x slower on the dev VM.
  """
  exact = tiles.dtype == jnp.float32
  xs = x.astype(tiles.dtype)

  def scan_tile(_, inputs):
    weights, bias = inputs
    sims = jnp.dot(xs, weights, precision=jax.lax.Precision.HIGHEST if exact else None,
                   preferred_element_type=jnp.float32) + bias
    return None, sims.max(axis=-1)

  _, maxima = jax.lax.scan(scan_tile, None, (tiles, pad), unroll=4)
  return maxima.T


class MatmulAssigner:
  """Nearest centroids by brute force over all of them, in two stages.

  1. JAX (any device): a tiled matmul gives each row's best cosine per tile of 128 consecutive
     centroids.
  2. Host: the rows are scored exactly (float32 NumPy) against the centroids of their best
     k tiles, where their top k lie (each of the top k sits in a tile whose maximum is at
     least its own cosine); ties go to the lowest id.

  The screening dtype only chooses the tiles. float32 screening is exact. bfloat16 screening
  (f32 accumulation; 1.5 TFLOP/s against 0.2 for float32 on the dev VM's AMX) chooses by
  cosines good to ~2e-4, so a centroid is missed only where another tile's best is within
  that of it: the gap to the second-best centroid was >= 0.019 for 99% of the benchmark's rows.
  """

  # Rows per step, and centroids per tile of the scan. Large row blocks amortise streaming the
  # tiles: bf16 [8192, 512] with one maximum per tile ran at ~1.5 TFLOP/s on the 2-core dev VM
  # and [2048, 512] at ~1.0. Tiles of 128 screen 5-15% slower than tiles of 512 but leave the
  # host stage k * 128 centroids to score per row instead of k * 512.
  _ROWS = 8192
  _TILE = 128

  def __init__(self, centroids: np.ndarray, dtype: jnp.dtype | str = "float32"):
    k, d = centroids.shape
    self.dtype = jnp.dtype(dtype)
    self.approximate = self.dtype != jnp.float32
    count = -(-k // self._TILE)
    padded = np.zeros((count * self._TILE, d), np.float32)
    padded[:k] = centroids
    self._centroids = padded[:k]
    self._tiles = jnp.asarray(padded.reshape(count, self._TILE, d).transpose(0, 2, 1),
                              self.dtype)
    self._pad = jnp.asarray(np.where(np.arange(count * self._TILE) < k, 0.0, -np.inf)
                            .astype(np.float32).reshape(count, self._TILE))

  def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # Every block is dispatched before the first is read back, so the device screens block
    # i + 1 while the host scores block i.
    maxima = [(rows, _tile_maxima(padded, self._tiles, self._pad))
              for rows, padded in _padded_blocks(x, self._ROWS)]
    ids, sims = [], []
    for rows, block_maxima in maxima:
      # One tile more than needed under float32 screening, so that rounding differences
      # between the two stages cannot drop a centroid at an exact tie.
      tiles = _top_columns(np.array(block_maxima)[:len(rows)],
                           k + 1 if not self.approximate else k)
      block_ids, block_sims = self._score_tiles(rows, tiles, k)
      ids.append(block_ids)
      sims.append(block_sims)
    if not ids:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    return np.concatenate(ids), np.concatenate(sims)

  def _score_tiles(self, x: np.ndarray, tiles: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 top-k (ids int32 [n, k], cosines [n, k], best first, ties to the lowest id)
    of each row of `x [n, D]` among the centroids of its tiles `[n, m]` (distinct, holding at
    least k centroids).

    One matmul per tile, over the rows that chose it. A row's k-th best cosine is at least the
    k-th largest of its tiles' maxima (they are k distinct centroids), so only the entries at or
    above that threshold are sorted: about k per row.
    """
    n, m = tiles.shape
    flat = tiles.ravel()  # entry i: row i // m
    order = np.argsort(flat, kind="stable")
    maxima = np.empty(n * m, np.float32)
    scored = []
    for part in np.split(order, np.flatnonzero(np.diff(flat[order])) + 1):
      if part.size:
        lo = int(flat[part[0]]) * self._TILE
        sims = x[part // m] @ self._centroids[lo:lo + self._TILE].T
        maxima[part] = sims.max(axis=1)
        scored.append((part, lo, sims))
    maxima = maxima.reshape(n, m)
    threshold = (np.partition(maxima, m - k, axis=1)[:, m - k] if m >= k
                 else np.full(n, -np.inf, np.float32))
    rows, ids, values = [], [], []
    for part, lo, sims in scored:
      entry, col = np.nonzero(sims >= threshold[part // m, None])
      rows.append(part[entry] // m)
      ids.append(lo + col)
      values.append(sims[entry, col])
    rows, ids, values = (np.concatenate(v) for v in (rows, ids, values))
    order = np.lexsort((ids, -values, rows))
    chosen = order[np.searchsorted(rows[order], np.arange(n))[:, None] + np.arange(k)]
    return ids[chosen].astype(np.int32), values[chosen]


def _padded_blocks(x: np.ndarray, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(rows, zero-padded copy) blocks of `x [n, D]` for a jitted kernel: blocks of `rows` rows,
  or one power-of-two block of 1,024 rows or more when n < rows. Few compiled shapes (each
  compiles once per process and centroid count), and small inputs are not padded to a full
  block."""
  block = min(rows, max(1024, 1 << max(0, x.shape[0] - 1).bit_length()))
  blocks = []
  for lo in range(0, x.shape[0], block):
    part = x[lo:lo + block]
    padded = np.zeros((block, x.shape[1]), np.float32)
    padded[:len(part)] = part
    blocks.append((part, padded))
  return blocks


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


def merge_candidates(x: np.ndarray, centroids: np.ndarray, ids: np.ndarray, sims: np.ndarray,
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
    """Serializes the index (with its current centroids) into a new `directory`, fsynced (ScaNN
    writes local files only: `paths.local_staging`)."""
    with paths.local_staging(directory) as local:
      self.searcher.serialize(local, relative_path=True)
    atomic.fsync_tree(directory)

  @classmethod
  def load(cls, directory: str, centroids: np.ndarray,
           tree_shape: tuple[int, int]) -> "ScannAssigner":
    """The index saved by `save`; `centroids` must be the ones it held then."""
    import scann  # pylint: disable=import-outside-toplevel
    with paths.local_copy(directory) as local:
      return cls(centroids, tree_shape, scann.scann_ops_pybind.load_searcher(local))

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
