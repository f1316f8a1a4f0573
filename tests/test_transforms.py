"""NumPy transforms: one geometry per clip, boxes moved with the pixels, deterministic eval."""

import numpy as np
import pytest

from univit_jax.data import transforms
from univit_jax.run_config import data_config


def _clip(num_frames=3, height=24, width=32):
  """Frames whose pixels encode (frame, row, column), so geometry can be checked."""
  t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
  return np.stack([t * 40, y * 8, x * 7], -1).astype(np.uint8)


def test_to_rgb():
  assert transforms.to_rgb(np.zeros((2, 4, 4), np.uint8)).shape == (2, 4, 4, 3)
  assert transforms.to_rgb(np.zeros((1, 4, 4, 4), np.uint8)).shape == (1, 4, 4, 3)
  with pytest.raises(ValueError, match="uint8"):
    transforms.to_rgb(np.zeros((1, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="shape"):
    transforms.to_rgb(np.zeros((1, 4, 4, 2), np.uint8))


def test_same_crop_and_flip_on_every_frame():
  cfg = data_config.TransformConfig(16, color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1))
  clip = _clip()
  out, _, _ = transforms.apply(clip, np.zeros((0, 4)), np.zeros(0, bool), cfg,
                               np.random.default_rng(3))
  assert out.shape == (3, 16, 16, 3) and out.dtype == np.float32
  # Rows and columns (channels 1 and 2) are identical across frames; time (channel 0) differs.
  np.testing.assert_allclose(out[0, ..., 1:], out[2, ..., 1:])
  assert (out[1, ..., 0] > out[0, ..., 0]).all()


def test_eval_transform_is_deterministic_centre_square():
  cfg = data_config.TransformConfig(12, augment=False, mean=(0, 0, 0), std=(1, 1, 1))
  clip = _clip(1, 24, 36)
  boxes = np.array([[0.0, 0.0, 0.5, 0.2], [0.25, 0.25, 0.75, 0.75]], np.float32)
  out, b, m = transforms.apply(clip, boxes, np.ones(2, bool), cfg, None)
  out2, _, _ = transforms.apply(clip, boxes, np.ones(2, bool), cfg, None)
  np.testing.assert_array_equal(out, out2)
  # The centre 24x24 square: columns 6..29, resized to 12.
  assert abs(out[0, 0, 0, 2] * 255 / 7 - 6.5) < 1.0
  # The first box lies in the cut-off left margin; the second is re-expressed in the square.
  assert m.tolist() == [False, True]
  np.testing.assert_allclose(b[1], [0.25, 0.125, 0.75, 0.875], atol=1e-6)


def test_crop_and_flip_move_boxes_with_pixels():
  boxes = np.array([[0.1, 0.1, 0.3, 0.4], [0, 0, 0, 0]], np.float32)
  mask = np.array([True, False])
  moved, m = transforms.crop_boxes(boxes, mask, (0, 0, 50, 50), 100, 100)
  np.testing.assert_allclose(moved[0], [0.2, 0.2, 0.6, 0.8])
  assert m.tolist() == [True, False]
  _, m = transforms.crop_boxes(boxes, mask, (25, 35, 50, 50), 100, 100)
  assert not m.any()  # less than a quarter of the box remains
  flipped = transforms.flip_boxes(boxes, mask)
  np.testing.assert_allclose(flipped[0], [0.1, 0.6, 0.3, 0.9])
  np.testing.assert_array_equal(flipped[1], 0)


def test_random_crop_stays_inside_and_respects_scale():
  rng = np.random.default_rng(0)
  for _ in range(50):
    top, left, h, w = transforms.sample_crop(rng, 40, 60, (0.3, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
    assert 0.25 * 2400 <= h * w <= 2400


def test_color_jitter_and_normalize():
  frames = np.full((2, 4, 4, 3), 0.5, np.float32)
  out = transforms.color_jitter(frames, np.random.default_rng(0), 0.4)
  assert out.min() >= 0 and out.max() <= 1 and not np.allclose(out, frames)
  np.testing.assert_allclose(out[0], out[1])
  norm = transforms.normalize(np.full((1, 1, 1, 3), 255, np.uint8), (0.5,) * 3, (0.25,) * 3)
  np.testing.assert_allclose(norm, 2.0)
