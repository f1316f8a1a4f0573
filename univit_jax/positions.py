"""Explicit (t, h, w) positions of patch tokens, which U-RoPE rotates by (`models/rope.py`).

The data pipeline builds them for every batch (`data/streams.py`) and the encoder for inputs
given without them (`models/vit.py`); this module imports nothing from univit_jax, so both may
import it (tests/test_imports.py).

Time lives on a virtual grid of `virtual_frames` steps (0 .. virtual_frames - 1): a clip of T
frames spans the whole grid whatever T is, so 2-, 8- and 16-frame clips share one temporal axis
and an image sits at t = 0. Rows and columns are patch indices.
"""

import numpy as np


def frame_times(num_frames: int, virtual_frames: int = 64) -> np.ndarray:
  """Time positions `[T]` of T evenly spaced frames on the virtual grid; an image is t = 0."""
  if num_frames < 1:
    raise ValueError(f"num_frames={num_frames} must be >= 1")
  if num_frames == 1:
    return np.zeros(1, np.float32)
  return np.linspace(0.0, virtual_frames - 1, num_frames, dtype=np.float32)


def grid_positions(times: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
  """(t, h, w) positions `[..., T * grid_h * grid_w, 3]` of the patches of frames at `times`.

  Tokens are ordered frame-major, then row, then column, as the patch embedding flattens them.

  Args:
    times: `[..., T]` time position of each frame on the virtual grid.
    grid_h: patch rows per frame.
    grid_w: patch columns per frame.
  """
  times = np.asarray(times, np.float32)
  lead, num_frames = times.shape[:-1], times.shape[-1]
  t = np.broadcast_to(times[..., :, None, None], (*lead, num_frames, grid_h, grid_w))
  h = np.broadcast_to(np.arange(grid_h, dtype=np.float32)[:, None], t.shape)
  w = np.broadcast_to(np.arange(grid_w, dtype=np.float32)[None, :], t.shape)
  return np.stack([t, h, w], axis=-1).reshape(*lead, num_frames * grid_h * grid_w, 3)
