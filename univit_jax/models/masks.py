"""Which tokens belong to a temporal segment or to a box: shared by the encoder and clustering.

Tokens are ordered frame-major, then row, then column (see `positions.grid_positions`), so a
per-frame mask `[..., T]` becomes a token mask by repeating each frame's entry over its patches.
"""

import jax.numpy as jnp
import numpy as np


def segment_frame_masks(num_frames: int, num_segments: int) -> np.ndarray:
  """Frames of each of `num_segments` ordered, equal segments of a clip: `[g, T]` bool.

  Segment s covers frames [floor(s T / g), floor((s + 1) T / g)). With fewer frames than
  segments (T < g), segment s holds the single frame floor(s T / g), so frames are shared and
  every segment is non-empty.
  """
  if num_frames < 1 or num_segments < 1:
    raise ValueError(f"num_frames={num_frames} and num_segments={num_segments} must be >= 1")
  masks = np.zeros((num_segments, num_frames), bool)
  for s in range(num_segments):
    start = s * num_frames // num_segments
    end = max(start + 1, (s + 1) * num_frames // num_segments)
    masks[s, start:end] = True
  return masks


def frames_to_tokens(frame_mask: jnp.ndarray, tokens_per_frame: int) -> jnp.ndarray:
  """Repeats a per-frame mask `[..., T]` to a per-token mask `[..., T * tokens_per_frame]`."""
  return jnp.repeat(frame_mask, tokens_per_frame, axis=-1)


def box_patch_masks(boxes: jnp.ndarray, grid_h: int, grid_w: int) -> jnp.ndarray:
  """Patches of one frame whose centre lies inside each box: `[..., R, grid_h * grid_w]` bool.

  Args:
    boxes: `[..., R, 4]` as (ymin, xmin, ymax, xmax), normalised to [0, 1] (the TFDS convention).
    grid_h: patch rows per frame.
    grid_w: patch columns per frame.

  A box too small to contain any patch centre gets the patch that contains its centre, so every
  box pools at least one token.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  cy = (jnp.arange(grid_h, dtype=jnp.float32) + 0.5) / grid_h
  cx = (jnp.arange(grid_w, dtype=jnp.float32) + 0.5) / grid_w
  ymin, xmin, ymax, xmax = (boxes[..., i, None] for i in range(4))
  inside_y = (cy >= ymin) & (cy <= ymax)  # [..., R, gh]
  inside_x = (cx >= xmin) & (cx <= xmax)  # [..., R, gw]
  inside = (inside_y[..., :, None] & inside_x[..., None, :]).reshape(*boxes.shape[:-1], -1)
  row = jnp.clip(jnp.floor((ymin + ymax) / 2 * grid_h), 0, grid_h - 1).astype(jnp.int32)
  col = jnp.clip(jnp.floor((xmin + xmax) / 2 * grid_w), 0, grid_w - 1).astype(jnp.int32)
  centre = jnp.arange(grid_h * grid_w) == (row * grid_w + col)
  return jnp.where(inside.any(axis=-1, keepdims=True), inside, centre)
