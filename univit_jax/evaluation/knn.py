"""Weighted k-nearest-neighbour probe on frozen features (as in DINO).

Features are L2-normalised; each query takes its k most cosine-similar training examples, and
each neighbour votes for its class with weight `exp(cosine / temperature)`. The class with the
largest total vote is the prediction.
"""

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

from univit_jax.evaluation import common
from univit_jax.evaluation import metrics


@functools.partial(jax.jit, static_argnames="k")
def _top_k(bank: jax.Array, queries: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Cosines `[Q, k]` (descending) and indices `[Q, k]` of each query's nearest bank rows.

  Args:
    bank: `[N, D]` unit-norm features.
    queries: `[Q, D]` unit-norm features.
    k: neighbours per query (at most N).
  """
  sims = jnp.dot(queries, bank.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(sims, k)


def _normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_neighbours(bank: np.ndarray, queries: np.ndarray, k: int,
                       chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """The `k` training rows most cosine-similar to each query, in chunks of `chunk` queries.

  Args:
    bank: `[N, D]` features (any norm).
    queries: `[Q, D]` features (any norm).
    k: neighbours per query; capped at N.
    chunk: queries per device call (the last chunk is padded, so one shape compiles).

  Returns:
    Cosines `[Q, k]` in descending order and bank indices `[Q, k]`.
  """
  bank, queries = jnp.asarray(_normalise(bank)), _normalise(queries)
  k = min(k, len(bank))
  chunk = min(chunk, len(queries))
  sims, index = [], []
  for start in range(0, len(queries), chunk):
    block = queries[start:start + chunk]
    padded = np.pad(block, ((0, chunk - len(block)), (0, 0)))
    block_sims, block_index = _top_k(bank, padded, k)
    sims.append(np.asarray(block_sims)[:len(block)])
    index.append(np.asarray(block_index)[:len(block)])
  return np.concatenate(sims), np.concatenate(index)


def vote(sims: np.ndarray, labels: np.ndarray, num_classes: int,
         temperature: float) -> np.ndarray:
  """Class scores `[Q, C]`: the sum of `exp(sims / temperature)` of the neighbours of each class.

  Args:
    sims: `[Q, k]` cosines of each query's neighbours.
    labels: int `[Q, k]` classes of those neighbours.
    num_classes: C.
    temperature: softness of the weights.
  """
  scores = np.zeros((len(sims), num_classes), np.float64)
  # Shifting by the row maximum keeps exp() finite at small temperatures; the argmax is unchanged.
  weights = np.exp((sims - sims.max(-1, keepdims=True)) / temperature)
  np.add.at(scores, (np.arange(len(sims))[:, None], labels), weights)
  return scores


def knn_probe(train: common.Split, test: common.TestLoader, *, ks: Sequence[int] = (10, 20),
              temperature: float = 0.07, num_classes: int | None = None,
              val_fraction: float = 0.2, seed: int = 0) -> common.ProbeResult:
  """Weighted k-NN classification with k chosen on a validation carve-out.

  Each k in `ks` classifies the validation part of `common.carve_validation(train, val_fraction,
  seed)` with the fit part as the neighbour bank; the most accurate k wins (ties go to the
  larger k). Only then is `test()` called, once, and classified with all of `train` as the bank.

  Args:
    train: `x [N, D]` features and int `y [N]` class ids.
    test: loader of the test split, in the same format.
    ks: candidate neighbour counts.
    temperature: vote weights are `exp(cosine / temperature)`.
    num_classes: C (default: largest training label + 1).
    val_fraction: fraction of `train` held out for selection.
    seed: seed of the validation carve-out.

  Returns:
    A `ProbeResult` with metric "accuracy", `selected={"k": ...}`, the curve "val_vs_k" as
    `[[k, accuracy], ...]`, and details "confusion" (`[C, C]` nested lists, row = true class),
    "num_classes" and "majority".

  Raises:
    ValueError: if `ks` is empty, or a test label is not below C.
  """
  if not ks:
    raise ValueError("knn_probe: empty ks")
  if num_classes is None:
    num_classes = int(np.max(train.y)) + 1
  fit, val = common.carve_validation(train, val_fraction, seed)
  sims, index = nearest_neighbours(fit.x, val.x, max(ks))
  neighbour_labels = np.asarray(fit.y)[index]
  curve = []
  for k in ks:
    scores = vote(sims[:, :k], neighbour_labels[:, :k], num_classes, temperature)
    curve.append([int(k), metrics.accuracy(val.y, scores.argmax(-1))])
  best_k, best_val = max(curve, key=lambda point: (point[1], point[0]))

  test_split = test()
  if np.max(test_split.y) >= num_classes:
    raise ValueError(f"knn_probe: test label {np.max(test_split.y)} >= {num_classes} classes; "
                     "pass num_classes")
  sims, index = nearest_neighbours(train.x, test_split.x, best_k)
  predictions = vote(sims, np.asarray(train.y)[index], num_classes, temperature).argmax(-1)
  return common.ProbeResult(
    metric="accuracy",
    value=metrics.accuracy(test_split.y, predictions),
    selected={"k": best_k},
    val_value=best_val,
    curves={"val_vs_k": curve},
    details={
      "confusion": metrics.confusion_matrix(test_split.y, predictions, num_classes).tolist(),
      "num_classes": num_classes,
      "majority": metrics.majority_rate(train.y, test_split.y),
    })
