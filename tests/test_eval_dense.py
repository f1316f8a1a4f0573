"""The dense probe: mIoU by hand, nearest upsampling, and a segmentation it should (not) learn."""

import json

import numpy as np
import pytest

from univit_jax.evaluation import common, dense, metrics

CLASSES, PATCH, DIM = 4, 4, 16


def test_miou_of_a_hand_computed_map():
  # Patch classes [[0, 1], [1, 2]] of one 2x2-patch image, each patch 2x2 pixels.
  predictions = dense.patch_to_pixels(np.array([[0, 1, 1, 2]]), (1, 2, 2), 2)
  np.testing.assert_array_equal(predictions[0, 0], [[0, 0, 1, 1],
                                                    [0, 0, 1, 1],
                                                    [1, 1, 2, 2],
                                                    [1, 1, 2, 2]])
  labels = np.array([[[[0, 0, 1, 1],
                       [0, 1, 1, 1],
                       [1, 1, 2, -1],
                       [1, 1, 0, 2]]]])
  value, per_class = metrics.miou(labels, predictions, num_classes=4)
  # Class 0: 3 shared of 4 predicted + 4 labelled; class 1: 8 of 8 + 9; class 2: 2 of 3 + 2
  # (the ignored pixel does not count); class 3 appears nowhere.
  np.testing.assert_allclose(per_class[:3], [3 / 5, 8 / 9, 2 / 3])
  assert np.isnan(per_class[3])
  assert value == pytest.approx((3 / 5 + 8 / 9 + 2 / 3) / 3)


def test_patch_to_pixels_keeps_frames_apart():
  classes = np.arange(2 * 2 * 3).reshape(1, -1)
  pixels = dense.patch_to_pixels(classes, (2, 2, 3), 2)
  assert pixels.shape == (1, 2, 4, 6)
  np.testing.assert_array_equal(pixels[0, 1, ::2, ::2], [[6, 7, 8], [9, 10, 11]])


def test_patch_targets_are_histograms_of_labelled_pixels():
  targets, weights = dense.patch_targets(np.array([[0, 0, 2, -1], [-1, -1, -1, -1]]), 3)
  np.testing.assert_allclose(targets, [[2 / 3, 0, 1 / 3], [0, 0, 0]])
  np.testing.assert_array_equal(weights, [1, 0])


def segmentation(n: int, grid: tuple[int, int, int], seed: int, informative: bool = True
                 ) -> common.Split:
  """Each patch has a class; its token is that class's centre (the same for every seed) plus noise
  and a shared offset when `informative`, else noise. A tenth of the pixels are unlabelled."""
  rng = np.random.default_rng(seed)
  t, gh, gw = grid
  patch_classes = rng.integers(CLASSES, size=(n, t * gh * gw))
  centres = 2.0 * np.random.default_rng(100).normal(size=(CLASSES, DIM))
  tokens = rng.normal(size=(n, t * gh * gw, DIM)) + 5.0
  if informative:
    tokens += centres[patch_classes]
  labels = dense.patch_to_pixels(patch_classes, grid, PATCH)
  labels[rng.random(labels.shape) < 0.1] = dense.IGNORE
  return common.Split(tokens.astype(np.float32), labels[:, 0] if t == 1 else labels)


PROBE = dict(num_classes=CLASSES, l2_grid=(1e-4, 1e-2), epochs=15, batch_size=128, lr=1e-2)


@pytest.mark.parametrize("grid", [(1, 4, 4), (2, 3, 3)])
def test_dense_probe_learns_patch_classes(grid):
  train, test = segmentation(40, grid, 0), segmentation(16, grid, 1)
  result = dense.dense_probe(train, lambda: test, grid=grid, **PROBE)
  assert result.metric == "miou"
  assert result.value > 0.9, result
  assert result.val_value > 0.9
  assert result.details["pixel_accuracy"] > 0.9
  assert len(result.details["per_class_iou"]) == CLASSES
  assert [l2 for l2, _ in result.curves["val_vs_l2"]] == list(PROBE["l2_grid"])
  assert len(result.curves["train_loss"]) == PROBE["epochs"]
  json.dumps(result.to_json())


def test_dense_probe_on_random_tokens_is_poor():
  grid = (1, 4, 4)
  train, test = segmentation(40, grid, 0, False), segmentation(16, grid, 1, False)
  result = dense.dense_probe(train, lambda: test, grid=grid, **PROBE)
  assert result.value < 0.4, result


def test_test_split_is_loaded_once_and_selection_ignores_its_labels():
  grid = (1, 4, 4)
  train, test = segmentation(20, grid, 2), segmentation(8, grid, 3)
  shuffled = common.Split(test.x, test.y[np.random.default_rng(0).permutation(len(test))])
  calls = []

  def loader(split):
    def load():
      calls.append(len(calls))
      return split
    return load

  kwargs = dict(PROBE, epochs=2)
  a = dense.dense_probe(train, loader(test), grid=grid, **kwargs)
  b = dense.dense_probe(train, loader(shuffled), grid=grid, **kwargs)
  assert calls == [0, 1]
  assert (a.selected, a.val_value, a.curves) == (b.selected, b.val_value, b.curves)


def test_labels_must_fit_the_grid_and_classes():
  train = segmentation(4, (1, 4, 4), 0)
  with pytest.raises(ValueError, match="square patches"):
    dense.dense_probe(train, lambda: train, grid=(1, 2, 8), num_classes=CLASSES)
  with pytest.raises(ValueError, match="outside"):
    dense.dense_probe(train, lambda: train, grid=(1, 4, 4), num_classes=2)
