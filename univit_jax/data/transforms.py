"""Frame transforms on NumPy arrays: one crop, flip and colour jitter per clip.

Every function takes a clip `[T, H, W, 3]` (an image is T = 1) and applies the same geometry and
colour change to each frame, so motion between frames is preserved. Boxes are `[R, 4]` float32
(ymin, xmin, ymax, xmax) in [0, 1] of the frame, with a `[R]` bool mask; geometric transforms
move them with the pixels and drop (mask out) boxes that leave the crop. Randomness comes only
from the `np.random.Generator` passed in, so a pipeline that seeds it per example is
deterministic. Resampling uses PIL's antialiased bilinear filter on uint8 frames.
"""

import numpy as np
from PIL import Image

from univit_jax.run_config import data_config

# A box survives a crop when at least this fraction of its area stays inside.
MIN_VISIBLE_FRACTION = 0.25


def to_rgb(frames: np.ndarray) -> np.ndarray:
  """Converts `[T, H, W]`, `[T, H, W, 1]`, `[T, H, W, 3]` or `[T, H, W, 4]` to uint8 RGB.

  Grayscale is repeated over the channels, alpha is dropped.

  Raises:
    ValueError: for any other shape or a non-uint8 dtype.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"frames must be uint8, got {frames.dtype}")
  if frames.ndim == 3:
    frames = frames[..., None]
  if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
    raise ValueError(f"frames must be [T, H, W, 1|3|4], got shape {frames.shape}")
  if frames.shape[-1] == 1:
    return np.repeat(frames, 3, axis=-1)
  return frames[..., :3]


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear (antialiased) resize of a uint8 clip `[T, H, W, 3]` to `[T, height, width, 3]`."""
  if frames.shape[1:3] == (height, width):
    return frames
  return np.stack([
    np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BILINEAR))
    for f in frames])


def sample_crop(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
    ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """A random crop window `(top, left, crop_h, crop_w)` in pixels (Inception-style).

  The area is uniform in `scale` times the frame area, the aspect ratio log-uniform in `ratio`;
  after 10 windows that do not fit, the largest centred window of a valid ratio is taken.
  """
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif aspect > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def center_square(height: int, width: int) -> tuple[int, int, int, int]:
  """The largest centred square window `(top, left, side, side)`: the evaluation crop."""
  side = min(height, width)
  return (height - side) // 2, (width - side) // 2, side, side


def crop_boxes(
    boxes: np.ndarray, box_mask: np.ndarray, window: tuple[int, int, int, int], height: int,
    width: int) -> tuple[np.ndarray, np.ndarray]:
  """Re-expresses boxes `[R, 4]` in the coordinates of a crop window of a `height x width` frame.

  Boxes are clipped to the window; those keeping less than MIN_VISIBLE_FRACTION of their area
  are masked out (and zeroed).
  """
  top, left, h, w = window
  offset = np.array([top / height, left / width] * 2, np.float32)
  size = np.array([h / height, w / width] * 2, np.float32)
  moved = (boxes - offset) / size
  clipped = np.clip(moved, 0.0, 1.0)
  def area(b):
    return np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
  visible = area(clipped) >= MIN_VISIBLE_FRACTION * np.maximum(area(moved), 1e-12)
  mask = box_mask & visible & (area(clipped) > 0)
  return np.where(mask[:, None], clipped, 0.0).astype(np.float32), mask


def flip_boxes(boxes: np.ndarray, box_mask: np.ndarray) -> np.ndarray:
  """Mirrors boxes `[R, 4]` left-right; padded (masked) boxes stay zero."""
  flipped = np.stack([boxes[:, 0], 1 - boxes[:, 3], boxes[:, 2], 1 - boxes[:, 1]], axis=-1)
  return np.where(box_mask[:, None], flipped, 0.0).astype(np.float32)


def color_jitter(frames: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Random brightness, contrast and saturation of a float clip `[T, H, W, 3]` in [0, 1].

  One factor of each kind for the whole clip; the result is clipped to [0, 1].
  """
  brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
  frames = frames * brightness
  gray = frames @ np.array([0.299, 0.587, 0.114], np.float32)
  frames = (frames - gray.mean()) * contrast + gray.mean()
  gray = (frames @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
  frames = (frames - gray) * saturation + gray
  return np.clip(frames, 0.0, 1.0).astype(np.float32)


def normalize(frames: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
  """`(frames / 255 - mean) / std` as float32 for uint8 frames, `(frames - mean) / std` else."""
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    frames = frames.astype(np.float32) / 255.0
  return ((frames - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(
    np.float32)


def apply(
    frames: np.ndarray, boxes: np.ndarray, box_mask: np.ndarray,
    cfg: data_config.TransformConfig, rng: np.random.Generator | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Crops, resizes, flips, jitters and normalises a clip and moves its boxes along.

  Args:
    frames: uint8 `[T, H, W, C]`, C in {1, 3, 4}; any size (small frames are upsampled).
    boxes: float32 `[R, 4]` normalised (ymin, xmin, ymax, xmax); R may be 0.
    box_mask: bool `[R]`.
    cfg: the transform settings; `cfg.augment` False gives the deterministic evaluation path
      (centre square, resize), which ignores `rng`.
    rng: randomness for augmentation.

  Returns:
    frames float32 `[T, S, S, 3]` normalised, boxes `[R, 4]`, box_mask `[R]`.
  """
  frames = to_rgb(frames)
  height, width = frames.shape[1:3]
  size = cfg.image_size
  if cfg.augment:
    window = sample_crop(rng, height, width, cfg.crop_scale, cfg.crop_ratio)
  else:
    window = center_square(height, width)
  top, left, h, w = window
  frames = resize(frames[:, top:top + h, left:left + w], size, size)
  boxes, box_mask = crop_boxes(boxes, box_mask, window, height, width)
  if cfg.augment and cfg.flip and rng.random() < 0.5:
    frames = frames[:, :, ::-1]
    boxes = flip_boxes(boxes, box_mask)
  if cfg.augment and cfg.color_jitter > 0:
    out = color_jitter(frames.astype(np.float32) / 255.0, rng, cfg.color_jitter)
  else:
    out = frames
  return normalize(out, cfg.mean, cfg.std), boxes, box_mask
