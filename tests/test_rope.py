"""U-RoPE: NumPy reference per mode, rotation properties, padding, the 4:6:6 allocation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from univit_jax import positions as positions_lib
from univit_jax import specs
from univit_jax.models import rope

HEAD_DIM = 64  # 32 pairs: t 8, h 12, w 12.
THETA = 10_000.0 ** (-np.arange(32) / 32)


def reference_table(mode):
  """Per-pair (frequency, axis) written out from the module's documentation, for head dim 64."""
  if mode == "per_axis":
    freqs = np.concatenate([10_000.0 ** (-np.arange(n) / n) for n in (8, 12, 12)])
    return freqs, np.array([0] * 8 + [1] * 12 + [2] * 12)
  if mode == "chunked":
    return THETA, np.array([0] * 8 + [1] * 12 + [2] * 12)
  if mode == "temporal_low":
    return THETA, np.array([1, 2] * 12 + [0] * 8)
  if mode == "interleaved":
    return THETA, np.array([1, 2, 0, 1, 2, 0, 1, 2] * 4)
  raise AssertionError(mode)


def reference_rope(x, positions, mode, mask=None):
  """Loops over tokens, heads and pairs, applying explicit 2x2 rotations in float64."""
  freqs, axes = reference_table(mode)
  out = np.array(x, np.float64)
  b, n, h, d = x.shape
  p = d // 2
  for bi in range(b):
    for ni in range(n):
      if mask is not None and not mask[bi, ni]:
        continue
      for j in range(p):
        a = positions[bi, ni, axes[j]] * freqs[j]
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        for hi in range(h):
          pair = np.array([x[bi, ni, hi, j], x[bi, ni, hi, j + p]], np.float64)
          out[bi, ni, hi, j], out[bi, ni, hi, j + p] = rot @ pair
  return out


def random_case(seed=0, b=2, n=6, h=2):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, n, h, HEAD_DIM)).astype(np.float32)
  positions = np.stack([rng.uniform(0, 63, (b, n)), rng.integers(0, 16, (b, n)),
                        rng.integers(0, 16, (b, n))], -1).astype(np.float32)
  return x, positions


def rotate(x, positions, mode, mask=None):
  angles = rope.rope_angles(positions, HEAD_DIM, mode, token_mask=mask)
  return np.asarray(rope.apply_rope(jnp.asarray(x), angles))


@pytest.mark.parametrize("mode", specs.ROPE_ALLOCATIONS)
def test_table_is_as_documented(mode):
  freqs, axes = rope.rope_table(HEAD_DIM, mode)
  ref_freqs, ref_axes = reference_table(mode)
  np.testing.assert_allclose(freqs, ref_freqs, rtol=1e-12)
  np.testing.assert_array_equal(axes, ref_axes)
  assert np.bincount(axes).tolist() == [8, 12, 12]


@pytest.mark.parametrize("mode", specs.ROPE_ALLOCATIONS)
def test_matches_numpy_reference(mode):
  x, positions = random_case()
  np.testing.assert_allclose(rotate(x, positions, mode), reference_rope(x, positions, mode),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", specs.ROPE_ALLOCATIONS)
def test_preserves_norms(mode):
  x, positions = random_case(1)
  y = rotate(x, positions, mode)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("mode", specs.ROPE_ALLOCATIONS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_scores_depend_only_on_position_offset(mode, axis):
  x, positions = random_case(2)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)  # scores are cosines, so 1e-5 is tight
  q, k = x[:, :3], x[:, 3:]
  pq, pk = positions[:, :3], positions[:, 3:]
  shift = np.zeros(3, np.float32)
  shift[axis] = 7.25

  def scores(pq, pk):
    return np.einsum("bqhd,bkhd->bhqk", rotate(q, pq, mode), rotate(k, pk, mode))

  np.testing.assert_allclose(scores(pq + shift, pk + shift), scores(pq, pk), atol=1e-5)


def test_offset_changes_scores():
  """The property above is not vacuous: moving only the keys changes the scores."""
  x, positions = random_case(3)
  q, k = x[:, :3], x[:, 3:]
  s0 = np.einsum("bqhd,bkhd->bhqk", rotate(q, positions[:, :3], "temporal_low"),
                 rotate(k, positions[:, 3:], "temporal_low"))
  s1 = np.einsum("bqhd,bkhd->bhqk", rotate(q, positions[:, :3], "temporal_low"),
                 rotate(k, positions[:, 3:] + 3.0, "temporal_low"))
  assert np.abs(s0 - s1).max() > 1e-2


@pytest.mark.parametrize("mode", specs.ROPE_ALLOCATIONS)
def test_padded_tokens_are_untouched(mode):
  x, positions = random_case(4)
  mask = np.array([[True, False, True, True, False, True]] * 2)
  y = rotate(x, positions, mode, jnp.asarray(mask))
  np.testing.assert_array_equal(y[~mask], x[~mask])
  np.testing.assert_allclose(y, reference_rope(x, positions, mode, mask), rtol=1e-5, atol=1e-4)


def test_bands():
  """temporal_low gives time the lowest frequencies; chunked the highest; per_axis the full range."""
  f, a = rope.rope_table(HEAD_DIM, "temporal_low")
  assert f[a == 0].max() < f[a != 0].min()
  f, a = rope.rope_table(HEAD_DIM, "chunked")
  assert f[a == 0].min() > f[a == 1].max() > f[a == 2].max()
  f, a = rope.rope_table(HEAD_DIM, "per_axis")
  for axis in range(3):
    assert f[a == axis].max() == 1.0 and f[a == axis].min() < 0.5e-3 ** (1 / 2)


def test_split_errors_name_the_problem():
  with pytest.raises(ValueError, match="head_dim=48 gives 24 rotary pairs"):
    specs.rope_axis_pairs(48)
  with pytest.raises(ValueError, match="rope mode='spiral'"):
    rope.rope_table(64, "spiral")
  assert specs.rope_axis_pairs(128) == (16, 24, 24)


def test_virtual_time_grid():
  np.testing.assert_array_equal(positions_lib.frame_times(1), [0.0])
  np.testing.assert_allclose(positions_lib.frame_times(2), [0.0, 63.0])
  np.testing.assert_allclose(positions_lib.frame_times(16)[[0, -1]], [0.0, 63.0])
  pos = positions_lib.grid_positions(positions_lib.frame_times(2), 2, 3)
  assert pos.shape == (12, 3)
  np.testing.assert_array_equal(pos[7], [63.0, 0.0, 1.0])


def test_jit_and_bfloat16():
  x, positions = random_case(5)
  fn = jax.jit(lambda x, p: rope.apply_rope(x, rope.rope_angles(p, HEAD_DIM)))
  y = fn(jnp.asarray(x, jnp.bfloat16), positions)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), rotate(x, positions, "temporal_low"),
                             atol=0.1)


@pytest.mark.parametrize("mode", specs.ROPE_ALLOCATIONS)
def test_temporal_span_makes_time_visible_and_keeps_rotations_relative(mode):
  plain, axes = rope.rope_table(HEAD_DIM, mode)
  freqs, same_axes = rope.rope_table(HEAD_DIM, mode, temporal_span=np.pi, virtual_frames=64)
  np.testing.assert_array_equal(axes, same_axes)
  time = axes == 0
  np.testing.assert_array_equal(freqs[~time], plain[~time])  # space untouched
  # Unscaled temporal_low turns time's fastest pair 0.063 rad across the whole grid; scaled, the
  # slowest turns pi (or the fastest 1 rad per step), and adjacent frames of a 16-frame clip
  # differ by at least 0.2 rad somewhere.
  assert freqs[time].max() <= 1.0 + 1e-12
  assert np.isclose(freqs[time].min() * 63, np.pi) or np.isclose(freqs[time].max(), 1.0)
  assert freqs[time].max() * 63 / 15 > 0.2
  np.testing.assert_allclose(freqs[time] / freqs[time].min(), plain[time] / plain[time].min())
  x, positions = random_case(6)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  q, k = x[:, :3], x[:, 3:]

  def scores(pq, pk):
    def rot(v, p):
      angles = rope.rope_angles(p, HEAD_DIM, mode, temporal_span=np.pi)
      return np.asarray(rope.apply_rope(jnp.asarray(v), angles))
    return np.einsum("bqhd,bkhd->bhqk", rot(q, pq), rot(k, pk))

  shift = np.array([5.5, 0.0, 0.0], np.float32)
  np.testing.assert_allclose(scores(positions[:, :3] + shift, positions[:, 3:] + shift),
                             scores(positions[:, :3], positions[:, 3:]), atol=1e-5)
