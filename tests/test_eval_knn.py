"""Weighted k-NN probe: separable blobs, chance on random labels, test split read once."""

import numpy as np

from univit_jax.evaluation import common
from univit_jax.evaluation import knn


def _blobs(num_classes, n, noise, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, 32))
  y = rng.integers(num_classes, size=n)
  x = (centres[y] + noise * rng.normal(size=(n, 32))).astype(np.float32)
  return common.Split(x[:n * 3 // 4], y[:n * 3 // 4]), common.Split(x[n * 3 // 4:], y[n * 3 // 4:])


def test_separable_blobs():
  train, test = _blobs(num_classes=8, n=2000, noise=0.2, seed=0)
  calls = []

  def load():
    calls.append(1)
    return test

  result = knn.knn_probe(train, load)
  assert calls == [1]
  assert result.metric == "accuracy" and result.value > 0.99 and result.val_value > 0.99
  assert result.selected["k"] in (10, 20)
  assert [point[0] for point in result.curves["val_vs_k"]] == [10, 20]
  assert np.array(result.details["confusion"]).sum() == len(test)


def test_random_labels_near_chance():
  train, test = _blobs(num_classes=4, n=2000, noise=0.2, seed=1)
  rng = np.random.default_rng(2)
  train = common.Split(train.x, rng.integers(4, size=len(train)))
  result = knn.knn_probe(train, lambda: test)
  assert abs(result.value - 0.25) < 0.06


def test_nearest_neighbours_and_vote():
  rng = np.random.default_rng(3)
  bank, queries = rng.normal(size=(300, 16)), rng.normal(size=(50, 16))
  sims, index = knn.nearest_neighbours(bank, queries, k=5, chunk=16)
  cosines = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
    bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(index, np.argsort(-cosines, axis=1)[:, :5])
  np.testing.assert_allclose(sims, np.take_along_axis(cosines, index, 1), atol=1e-5)
  # Two neighbours of class 1 outvote one closer neighbour of class 0.
  scores = knn.vote(np.array([[0.9, 0.88, 0.88]]), np.array([[0, 1, 1]]), 3, temperature=0.07)
  assert scores.argmax() == 1 and scores[0, 2] == 0
