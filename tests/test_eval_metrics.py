"""Probe metrics against scikit-learn and hand-computed cases."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from univit_jax.evaluation import metrics


def test_nmi_matches_sklearn_and_is_label_invariant():
  rng = np.random.default_rng(0)
  for classes, clusters in [(2, 2), (5, 3), (4, 9)]:
    true = rng.integers(classes, size=300)
    pred = np.where(rng.random(300) < 0.6, true % clusters, rng.integers(clusters, size=300))
    np.testing.assert_allclose(metrics.nmi(true, pred),
                               sk_metrics.normalized_mutual_info_score(true, pred), atol=1e-12)
  true = np.array([0, 0, 1, 1, 2, 2])
  assert metrics.nmi(true, np.array([7, 7, 3, 3, 5, 5])) == pytest.approx(1.0)
  assert metrics.nmi(np.array(["a", "a", "b", "b"]), np.array([1, 2, 1, 2])) == 0.0
  assert metrics.nmi(np.zeros(5), np.ones(5)) == 1.0
  assert metrics.nmi(np.zeros(4), np.arange(4)) == 0.0


def test_nmi_hand_case():
  # true [0, 0, 1, 1], pred [0, 0, 0, 1]: H(true) = ln 2, H(pred) = -(3/4 ln 3/4 + 1/4 ln 1/4),
  # I = H(true) - H(true | pred) = ln 2 - 3/4 * H(2/3, 1/3).
  h_true = np.log(2)
  h_pred = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  mutual = np.log(2) + 0.75 * (2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
  assert metrics.nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(
    mutual / ((h_true + h_pred) / 2))


def test_purity():
  # Cluster 0 holds true {0, 0, 1}, cluster 1 holds {1, 2}, cluster 2 holds {2}: 2 + 1 + 1 of 6.
  true = np.array([0, 0, 1, 1, 2, 2])
  pred = np.array([0, 0, 0, 1, 1, 2])
  assert metrics.purity(true, pred) == pytest.approx(4 / 6)
  assert metrics.purity(true, np.arange(6)) == 1.0
  assert metrics.purity(true, np.zeros(6)) == pytest.approx(2 / 6)
  rng = np.random.default_rng(1)
  true, pred = rng.integers(5, size=200), rng.integers(7, size=200)
  table = sk_metrics.cluster.contingency_matrix(true, pred)
  assert metrics.purity(true, pred) == pytest.approx(table.max(0).sum() / 200)


def test_roc_auc_and_mean_auc_match_sklearn():
  rng = np.random.default_rng(2)
  targets = rng.integers(2, size=(500, 4))
  scores = targets * rng.normal(0.7, 1, (500, 4)) + rng.normal(size=(500, 4))
  scores[:, 3] = np.round(scores[:, 3])  # many ties
  for c in range(4):
    assert metrics.roc_auc(targets[:, c], scores[:, c]) == pytest.approx(
      sk_metrics.roc_auc_score(targets[:, c], scores[:, c]), abs=1e-12)
  assert metrics.mean_auc(targets, scores) == pytest.approx(
    sk_metrics.roc_auc_score(targets, scores, average="macro"), abs=1e-12)
  # A class with a single outcome is left out of the mean.
  targets[:, 0] = 1
  assert metrics.mean_auc(targets, scores) == pytest.approx(
    sk_metrics.roc_auc_score(targets[:, 1:], scores[:, 1:], average="macro"), abs=1e-12)
  with pytest.raises(ValueError):
    metrics.roc_auc(np.ones(3), np.arange(3))


def test_confusion_matrix():
  labels = np.array([0, 0, 1, 2, 2, 2])
  predictions = np.array([0, 1, 1, 2, 0, 2])
  expected = [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, predictions, 3), expected)
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, predictions, 3),
                                sk_metrics.confusion_matrix(labels, predictions))


def test_miou_hand_case():
  labels = np.array([[0, 0, 1],
                     [1, 2, -1]])
  predictions = np.array([[0, 1, 1],
                          [3, 0, 0]])
  # The -1 pixel is ignored. Class 0: labelled {00, 01}, predicted {00, 11} -> 1/3.
  # Class 1: labelled {02, 10}, predicted {01, 02} -> 1/3. Class 2: labelled {11} only -> 0.
  # Class 3: predicted {10} only -> 0. Class 4: absent from both -> left out.
  value, per_class = metrics.miou(labels, predictions, num_classes=5)
  np.testing.assert_allclose(per_class[:4], [1 / 3, 1 / 3, 0, 0])
  assert np.isnan(per_class[4])
  assert value == pytest.approx(1 / 6)
