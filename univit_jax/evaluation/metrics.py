"""Metrics of the probes, in NumPy: accuracy, mean ROC AUC, confusion matrix, mIoU, majority rate.

All take host arrays and return Python floats (or nested lists), so results serialise to JSON.
"""

import numpy as np


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  """Fraction of `predictions [N]` equal to `labels [N]`."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  if labels.shape != predictions.shape or not labels.size:
    raise ValueError(f"accuracy: labels {labels.shape} and predictions {predictions.shape}")
  return float(np.mean(labels == predictions))


def majority_rate(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
  """Accuracy on `test_labels` of always predicting the most frequent training label."""
  values, counts = np.unique(np.asarray(train_labels), return_counts=True)
  return float(np.mean(np.asarray(test_labels) == values[np.argmax(counts)]))


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve of binary `targets [N]` ranked by `scores [N]` (ties count 1/2).

  Raises:
    ValueError: if `targets` holds only one class.
  """
  targets = np.asarray(targets).astype(bool)
  positives, negatives = int(targets.sum()), int((~targets).sum())
  if not positives or not negatives:
    raise ValueError("roc_auc needs both positive and negative targets")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = np.asarray(scores)[order]
  ranks = np.empty(len(order), np.float64)
  # Mid-ranks of tied scores (1-based), so ties contribute one half.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  for start, count in zip(first, counts):
    ranks[order[start:start + count]] = start + (count + 1) / 2
  return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def mean_auc(targets: np.ndarray, scores: np.ndarray) -> float:
  """Mean ROC AUC over the classes (columns of `targets [N, C]`) that have both outcomes.

  Raises:
    ValueError: if no class has both positive and negative targets.
  """
  targets, scores = np.asarray(targets), np.asarray(scores)
  aucs = [roc_auc(targets[:, c], scores[:, c]) for c in range(targets.shape[1])
          if 0 < targets[:, c].sum() < len(targets)]
  if not aucs:
    raise ValueError("mean_auc: no class has both positive and negative targets")
  return float(np.mean(aucs))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """`[C, C]` int64 counts: row = true class, column = predicted class."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def miou(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
         ignore_index: int = -1) -> tuple[float, np.ndarray]:
  """Mean intersection over union of per-pixel class maps (any equal shapes).

  IoU of class c is |pred = c and label = c| / |pred = c or label = c| over the pixels whose label
  is not `ignore_index`; classes absent from both labels and predictions are left out of the mean.

  Returns:
    The mean IoU and the per-class IoU `[C]` (NaN for classes left out).
  """
  labels, predictions = np.asarray(labels).ravel(), np.asarray(predictions).ravel()
  keep = labels != ignore_index
  matrix = confusion_matrix(labels[keep], predictions[keep], num_classes)
  intersection = np.diag(matrix).astype(np.float64)
  union = matrix.sum(0) + matrix.sum(1) - intersection
  with np.errstate(invalid="ignore", divide="ignore"):
    per_class = np.where(union > 0, intersection / union, np.nan)
  if np.all(np.isnan(per_class)):
    raise ValueError("miou: no labelled pixel")
  return float(np.nanmean(per_class)), per_class


def _contingency(labels_true: np.ndarray,
                 labels_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The non-empty cells of the contingency table of two labellings `[N]`, kept sparse (a dense
  table of 1,000 classes by 65,536 clusters would take half a gigabyte).

  Returns:
    `(true [M], pred [M], count [M])`: dense indices (0..classes-1, 0..clusters-1) of the label
    values and the number of examples with that pair.
  """
  labels_true, labels_pred = np.asarray(labels_true).ravel(), np.asarray(labels_pred).ravel()
  if labels_true.shape != labels_pred.shape or not labels_true.size:
    raise ValueError(f"labels_true {labels_true.shape} and labels_pred {labels_pred.shape}")
  _, rows = np.unique(labels_true, return_inverse=True)
  _, cols = np.unique(labels_pred, return_inverse=True)
  width = int(cols.max()) + 1
  cells, counts = np.unique(rows.astype(np.int64) * width + cols, return_counts=True)
  return cells // width, cells % width, counts


def nmi(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
  """Normalised mutual information of two labellings `[N]` (any sortable label values).

  I(true; pred) / ((H(true) + H(pred)) / 2), natural logarithms (the arithmetic normalisation
  of scikit-learn's `normalized_mutual_info_score`); 1.0 when both labellings are constant.
  """
  rows, cols, counts = _contingency(labels_true, labels_pred)
  joint = counts / counts.sum()
  p_true, p_pred = np.bincount(rows, joint), np.bincount(cols, joint)
  if len(p_true) == len(p_pred) == 1:
    return 1.0
  mutual = float(np.sum(joint * np.log(joint / (p_true[rows] * p_pred[cols]))))
  normaliser = float(-np.sum(p_true * np.log(p_true)) - np.sum(p_pred * np.log(p_pred))) / 2
  return max(mutual, 0.0) / max(normaliser, np.finfo(np.float64).eps)


def purity(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
  """Fraction of examples `[N]` whose true label is the commonest of their predicted cluster."""
  _, cols, counts = _contingency(labels_true, labels_pred)
  largest = np.zeros(int(cols.max()) + 1, np.int64)
  np.maximum.at(largest, cols, counts)
  return float(largest.sum() / counts.sum())
