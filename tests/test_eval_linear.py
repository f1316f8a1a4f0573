"""Linear probe: agreement with scikit-learn, test split read once after selection, multilabel."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from univit_jax.evaluation import common
from univit_jax.evaluation import linear


@pytest.fixture(scope="module")
def digits():
  """Noisy 8x8 digits (64 features, 10 classes): 1200 train, 597 test."""
  x, y = load_digits(return_X_y=True)
  rng = np.random.default_rng(0)
  x = (x + rng.normal(0, 2, x.shape)).astype(np.float32)
  order = rng.permutation(len(x))
  return common.Split(x[order[:1200]], y[order[:1200]]), common.Split(x[order[1200:]],
                                                                      y[order[1200:]])


def _standardise(train_x, x):
  mean, std = train_x.mean(0), train_x.std(0)
  return (x - mean) / np.where(std > 0, std, 1)


def test_matches_sklearn(digits):
  train, test = digits
  result = linear.linear_probe(train, lambda: test)
  l2 = result.selected["l2"]
  assert result.metric == "accuracy"
  assert l2 in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
  assert [point[0] for point in result.curves["val_vs_l2"]] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
  assert result.val_value == max(point[1] for point in result.curves["val_vs_l2"])

  sklearn = LogisticRegression(C=1 / (l2 * len(train)), max_iter=2000, tol=1e-8)
  sklearn.fit(_standardise(train.x, train.x), train.y)
  sklearn_accuracy = sklearn.score(_standardise(train.x, test.x), test.y)
  assert result.value > 0.9
  assert abs(result.value - sklearn_accuracy) <= 0.01, (result.value, sklearn_accuracy)

  confusion = np.array(result.details["confusion"])
  assert confusion.shape == (10, 10) and confusion.sum() == len(test)
  assert np.trace(confusion) == round(result.value * len(test))
  assert result.details["num_classes"] == 10
  assert 0.05 < result.details["majority"] < 0.15
  assert result.to_json()  # plain lists and numbers only


def test_fit_logistic_reaches_sklearn_solution(digits):
  train, _ = digits
  l2 = 1e-3
  w, b = linear.fit_logistic(train.x, train.y, l2, num_classes=10)
  z = _standardise(train.x, train.x)
  sklearn = LogisticRegression(C=1 / (l2 * len(train)), max_iter=5000, tol=1e-10).fit(z, train.y)
  # Ours acts on raw features; map back to the standardised ones sklearn saw.
  std = train.x.std(0)
  w_standardised = w * np.where(std > 0, std, 1)[:, None]
  np.testing.assert_allclose(w_standardised, sklearn.coef_.T,
                             atol=2e-3 * np.abs(sklearn.coef_).max())
  scores = linear.predict_scores((w, b), train.x)
  # Softmax is shift-invariant: compare logits up to a per-example constant.
  sk_scores = sklearn.decision_function(z)
  np.testing.assert_allclose(scores - scores.mean(1, keepdims=True),
                             sk_scores - sk_scores.mean(1, keepdims=True), atol=2e-2)


def test_test_split_read_once_after_selection(digits, monkeypatch):
  train, test = digits
  events = []
  fit_logistic = linear.fit_logistic

  def recording_fit(*args, **kwargs):
    events.append("fit")
    return fit_logistic(*args, **kwargs)

  def loader(split):
    def load():
      events.append("test")
      return split
    return load

  monkeypatch.setattr(linear, "fit_logistic", recording_fit)
  grid = (1e-4, 1e-2)
  baseline = linear.linear_probe(train, loader(test), l2_grid=grid)
  assert events == ["fit"] * (len(grid) + 1) + ["test"]

  rng = np.random.default_rng(1)
  changed_tests = [common.Split(test.x, rng.permutation(test.y)),
                   common.Split(rng.normal(size=test.x.shape).astype(np.float32), test.y)]
  for changed in changed_tests:
    result = linear.linear_probe(train, loader(changed), l2_grid=grid)
    assert result.selected == baseline.selected
    assert result.val_value == baseline.val_value
    assert result.curves == baseline.curves
  assert events.count("test") == 3


def test_rejects_unseen_test_class(digits):
  train, test = digits
  test = common.Split(test.x, np.where(test.y == 9, 10, test.y))
  with pytest.raises(ValueError, match="num_classes"):
    linear.linear_probe(train, lambda: test, l2_grid=(1e-2,))


def _multilabel(signal, seed):
  rng = np.random.default_rng(seed)
  y = (rng.random((1000, 5)) < 0.3).astype(np.int32)
  x = rng.normal(size=(1000, 12)).astype(np.float32)
  x[:, :5] += signal * y
  return common.Split(x[:700], y[:700]), common.Split(x[700:], y[700:])


def test_multilabel_signal_and_chance():
  train, test = _multilabel(signal=2.0, seed=0)
  result = linear.linear_probe(train, lambda: test, multilabel=True, l2_grid=(1e-4, 1e-2))
  assert result.metric == "mean_auc"
  assert result.value > 0.9 and result.val_value > 0.9
  assert len(result.details["per_class_auc"]) == 5
  assert np.mean(result.details["per_class_auc"]) == pytest.approx(result.value)

  train, test = _multilabel(signal=0.0, seed=1)
  result = linear.linear_probe(train, lambda: test, multilabel=True, l2_grid=(1e-4, 1e-2))
  assert abs(result.value - 0.5) < 0.07
