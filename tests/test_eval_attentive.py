"""The attentive probe: it finds a label held by one token, and reads the test split once, last."""

import json

import numpy as np
import pytest

from univit_jax.evaluation import attentive, common, metrics

CLASSES, LENGTH, PADDING, DIM = 4, 12, 4, 32


def one_token_task(n: int, seed: int) -> common.Split:
  """Every token carries a class direction (dims 1..C) over noise; the label is the class of the
  one token marked by dim 0, at a random position. The last PADDING tokens are masked out and
  carry the marker with a wrong class, so attending to them would mislead."""
  rng = np.random.default_rng(seed)
  rows = np.arange(n)
  tokens = 0.3 * rng.normal(size=(n, LENGTH + PADDING, DIM)).astype(np.float32)
  distractors = rng.integers(CLASSES, size=(n, LENGTH + PADDING))
  tokens[rows[:, None], np.arange(LENGTH + PADDING), 1 + distractors] += 1.0
  labels = rng.integers(CLASSES, size=n)
  where = rng.integers(LENGTH, size=n)
  tokens[rows, where, 1:1 + CLASSES] = 0.0
  tokens[rows, where, 1 + labels] = 1.0
  tokens[rows, where, 0] += 3.0
  padding = np.arange(LENGTH, LENGTH + PADDING)
  tokens[:, padding, 1:1 + CLASSES] = 0.0
  tokens[rows[:, None], padding, 1 + (labels[:, None] + 1) % CLASSES] = 1.0
  tokens[:, padding, 0] += 3.0
  mask = np.arange(LENGTH + PADDING) < LENGTH
  return common.Split(tokens, labels, {"token_mask": np.broadcast_to(mask, (n, LENGTH + PADDING))})


@pytest.mark.slow
def test_attentive_probe_finds_the_labelled_token():
  train, test = one_token_task(384, 0), one_token_task(256, 1)
  valid = test.x[:, :LENGTH]
  mean_pooled = valid.mean(1)[:, 1:1 + CLASSES].argmax(-1)
  assert metrics.accuracy(test.y, mean_pooled) < 0.6

  result = attentive.attentive_probe(
    train, lambda: test, num_classes=CLASSES, epochs=15, batch_size=64, lr_grid=(3e-3,))
  assert result.metric == "accuracy"
  assert result.value > 0.9, result
  assert result.val_value > 0.9
  assert len(result.curves["train_loss"]) == 15
  assert result.curves["train_loss"][-1] < result.curves["train_loss"][0]
  assert np.sum(result.details["confusion"]) == len(test)
  assert 0 < result.details["majority"] < 0.5
  json.dumps(result.to_json())


def test_multilabel_probe_reports_mean_auc():
  train, test = one_token_task(384, 2), one_token_task(128, 3)
  onehot = lambda split: common.Split(split.x, np.eye(CLASSES)[split.y], split.extra)
  result = attentive.attentive_probe(
    onehot(train), lambda: onehot(test), multilabel=True, epochs=15, batch_size=64,
    lr_grid=(3e-3,))
  assert result.metric == "mean_auc"
  assert result.value > 0.9, result
  assert "confusion" not in result.details


def test_test_split_is_loaded_once_after_selection_and_refit(monkeypatch):
  train, test = one_token_task(96, 4), one_token_task(32, 5)
  events = []
  batches, accuracy = common.epoch_batches, metrics.accuracy

  def recording_batches(*args):
    events.append("epoch")
    return batches(*args)

  def recording_accuracy(*args):
    events.append("score")
    return accuracy(*args)

  def loader():
    events.append("test")
    return test

  monkeypatch.setattr(common, "epoch_batches", recording_batches)
  monkeypatch.setattr(metrics, "accuracy", recording_accuracy)
  attentive.attentive_probe(
    train, loader, num_classes=CLASSES, epochs=2, batch_size=32, lr_grid=(1e-3, 3e-3))
  select = ["epoch", "epoch", "score"]
  assert events == select + select + ["epoch", "epoch", "test", "score"]


def test_permuted_test_labels_change_no_selection():
  train, test = one_token_task(96, 6), one_token_task(64, 7)
  shuffled = common.Split(test.x, np.random.default_rng(0).permutation(test.y), test.extra)
  kwargs = dict(num_classes=CLASSES, epochs=2, batch_size=32, lr_grid=(1e-3, 1e-2))
  a = attentive.attentive_probe(train, lambda: test, **kwargs)
  b = attentive.attentive_probe(train, lambda: shuffled, **kwargs)
  assert a.selected == b.selected
  assert a.val_value == b.val_value
  assert a.curves == b.curves


def test_example_without_tokens_is_rejected():
  train = one_token_task(16, 8)
  mask = train.extra["token_mask"].copy()
  mask[3] = False
  with pytest.raises(ValueError, match="no valid token"):
    attentive.attentive_probe(
      common.Split(train.x, train.y, {"token_mask": mask}), lambda: train, epochs=1)
