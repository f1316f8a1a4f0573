"""U-RoPE: unified 3D rotary position embedding over (t, h, w), as pure functions.

A head of dimension D has P = D / 2 rotary pairs. Pair j rotates channels (j, j + P) (the
half-split layout of RoFormer / GPT-NeoX) by the angle `pos[axis[j]] * freq[j]`, so the map is a
true rotation: norms are preserved and q . k depends only on the position offset.

The pairs are shared out over the axes (t, h, w) in the ratio `split` (default 4:6:6: with
P = 32, time gets 8 pairs and each spatial axis 12). Which pairs and which frequencies each axis
gets is the allocation `mode`:

  temporal_low  one spectrum theta_j = base^(-j / P) (j = 0 is the fastest); time takes the
                n_t lowest frequencies (the paper's "low frequencies for temporal structure"),
                h and w alternate over the high band so both see fine and coarse scales
                (VideoRoPE's LTA layout). The default.
  per_axis      each axis gets its own full spectrum base^(-i / n_a), i < n_a; pairs laid out
                [t | h | w] (OneVision-Encoder's split, with a correct rotation).
  chunked       one spectrum sliced in order: t the n_t fastest, then h, then w (Qwen2-VL M-RoPE).
  interleaved   one spectrum; the axes are spread evenly over all pairs, each in proportion to
                its share (Qwen3-VL's round robin, generalised to unequal shares).

Time must be visible. With base 1e4 and a 64-step grid, `temporal_low` turns time's fastest pair
by at most 0.063 rad across a whole clip (adjacent frames of a 16-frame clip: 0.004 rad, below
bfloat16 resolution), so the encoder could not tell frame order from rotation. `temporal_span`
(the config's `model.rope.temporal_span`, default pi) scales the temporal frequencies together
so that the slowest temporal pair turns that many radians across the grid, unless the fastest
would then pass 1 rad per grid step: with head dim 32 (the demo), `temporal_low` and `chunked`
then turn 0.05-0.28 rad per grid step (adjacent frames of a 16-frame clip 0.21-1.2 rad apart);
`per_axis` and `interleaved` give time a full spectrum whose fastest pair already turns 1 rad
per step, so they stay as they are. Per unit of its own coordinate time still takes the
spectrum's lowest frequencies in `temporal_low`; the span chooses that unit. 0 keeps the
unscaled (earlier) behaviour.

Positions are explicit float (t, h, w) per token (`univit_jax/positions.py` builds them), time on
a virtual grid of `virtual_frames` steps. Padded tokens get angle 0, i.e. the identity rotation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from univit_jax import specs

AXES = ("t", "h", "w")


def _spread(counts: tuple[int, ...]) -> np.ndarray:
  """Orders axis ids so that each axis is spread evenly, axis a appearing counts[a] times.

  At each slot, the axis furthest behind its proportional quota is chosen (lowest id on ties).
  """
  length = sum(counts)
  used = np.zeros(len(counts))
  order = []
  for i in range(length):
    deficit = np.asarray(counts) * (i + 1) / length - used
    a = int(np.argmax(deficit))
    order.append(a)
    used[a] += 1
  return np.asarray(order, np.int32)


@functools.lru_cache(maxsize=None)
def _table(head_dim: int, mode: str, base: float, split: tuple[int, int, int],
           temporal_span: float, virtual_frames: int):
  n_t, n_h, n_w = specs.rope_axis_pairs(head_dim, split)
  pairs = head_dim // 2
  spectrum = base ** (-np.arange(pairs) / pairs)
  if mode == "per_axis":
    axes = np.repeat(np.arange(3, dtype=np.int32), (n_t, n_h, n_w))
    freqs = np.concatenate([base ** (-np.arange(n) / n) for n in (n_t, n_h, n_w)])
  elif mode == "chunked":
    axes = np.repeat(np.arange(3, dtype=np.int32), (n_t, n_h, n_w))
    freqs = spectrum
  elif mode == "temporal_low":
    axes = np.concatenate([1 + _spread((n_h, n_w)), np.zeros(n_t, np.int32)])
    freqs = spectrum
  elif mode == "interleaved":
    axes = _spread((n_t, n_h, n_w))
    freqs = spectrum
  else:
    raise ValueError(f"rope mode={mode!r}: expected one of {specs.ROPE_ALLOCATIONS}")
  if temporal_span:
    time = axes == 0
    freqs = freqs.copy()
    freqs[time] *= min(temporal_span / ((virtual_frames - 1) * freqs[time].min()),
                       1.0 / freqs[time].max())
  freqs.setflags(write=False)
  axes.setflags(write=False)
  return freqs, axes


def rope_table(
    head_dim: int, mode: str = "temporal_low", base: float = 10_000.0,
    split: tuple[int, int, int] = (4, 6, 6), temporal_span: float = 0.0,
    virtual_frames: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Per-pair frequencies `[P]` (float64) and the axis each pair reads `[P]` (0=t, 1=h, 2=w).

  With `temporal_span` > 0 the temporal frequencies are scaled up together (their ratios kept)
  until the slowest temporal pair turns `temporal_span` radians across the virtual time grid
  (`virtual_frames - 1` steps), or the fastest turns 1 rad per grid step (the fastest spatial
  rate), whichever comes first; 0 leaves them as the mode gives them.
  """
  return _table(int(head_dim), mode, float(base), tuple(int(s) for s in split),
                float(temporal_span), int(virtual_frames))


def rope_angles(
    positions: jnp.ndarray, head_dim: int, mode: str = "temporal_low",
    base: float = 10_000.0, split: tuple[int, int, int] = (4, 6, 6),
    token_mask: jnp.ndarray | None = None, temporal_span: float = 0.0,
    virtual_frames: int = 64) -> jnp.ndarray:
  """Rotation angles `[..., N, P]` (float32) for positions `[..., N, 3]`; 0 where masked out.

  `temporal_span` and `virtual_frames` as in `rope_table`.
  """
  freqs, axes = rope_table(head_dim, mode, base, split, temporal_span, virtual_frames)
  positions = jnp.asarray(positions, jnp.float32)
  angles = jnp.take(positions, axes, axis=-1) * jnp.asarray(freqs, jnp.float32)
  if token_mask is not None:
    angles = jnp.where(token_mask[..., None], angles, 0.0)
  return angles


def _materialized(x: jnp.ndarray) -> jnp.ndarray:
  """`x` unchanged, computed once as an array: its product with the identity over the last axis.

  XLA fuses elementwise producers into each consumer, so without this the cosines and sines
  are evaluated again for every rotated element (per head and half, in every layer and in the
  backward pass); a dot is never fused into its consumers. (`jax.lax.optimization_barrier` does
  not do this on XLA:CPU, which removes barriers before fusion.) The product is exact.
  """
  eye = jnp.eye(x.shape[-1], dtype=x.dtype)
  return jnp.einsum("...p,pq->...q", x, eye, precision=jax.lax.Precision.HIGHEST)


def rotation(angles: jnp.ndarray, dtype: jnp.dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(cos, sin) of `angles [B, N, P]`, each `[B, N, 1, P]` in `dtype`, made once per forward pass.

  Computed in float32 and cast just before use. Made once and kept (`_materialized`): a fused
  cosine and sine per rotated element were about a tenth of the demo's train step on CPU.
  """
  angles = jnp.asarray(angles, jnp.float32)[..., None, :]
  return (_materialized(jnp.cos(angles)).astype(dtype),
          _materialized(jnp.sin(angles)).astype(dtype))


def rotate(x: jnp.ndarray, cos_sin: tuple[jnp.ndarray, jnp.ndarray]) -> jnp.ndarray:
  """Rotates `x [B, N, heads, D]` by `rotation`'s (cos, sin) (half-split pairs (j, j + D/2))."""
  cos, sin = cos_sin
  pairs = x.shape[-1] // 2
  x1, x2 = x[..., :pairs], x[..., pairs:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def apply_rope(x: jnp.ndarray, angles: jnp.ndarray) -> jnp.ndarray:
  """Rotates `x [B, N, heads, D]` by `angles [B, N, D / 2]`: `rotate` by `rotation(angles)`.
  A model rotating several projections by the same angles makes the rotation once."""
  return rotate(x, rotation(angles, x.dtype))
