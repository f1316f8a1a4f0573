"""The encoder: variable frame counts with one set of weights, padding, pooling, sharding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from univit_jax import config_lib, sharding
from univit_jax import positions as positions_lib
from univit_jax.models import vit

CFG = config_lib.ModelConfig(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=8)
SIZE = 16  # 2 x 2 patches per frame.


def make(cfg=CFG, seed=0):
  graphdef, params = vit.init_encoder(cfg, seed)
  return graphdef, params


@functools.partial(jax.jit, static_argnames=("graphdef", "segments", "activation_sharding"))
def apply(graphdef, params, frames, **kw):
  """The encoder's forward pass, jitted: one compile per input shape instead of eager dispatch
  of every operation."""
  return nnx.merge(graphdef, params)(frames, **kw)


def clip(t, b=2, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, t, SIZE, SIZE, 3))


@pytest.fixture(scope="module")
def model():
  return make()


@pytest.mark.slow
def test_all_frame_buckets_share_weights(model):
  graphdef, params = model
  for t in (1, 2, 4, 8, 16):
    embedding, aux = apply(graphdef, params, clip(t))
    assert embedding.shape == (2, 64) and embedding.dtype == jnp.float32
    assert aux["tokens"].shape == (2, t * 4, 64)
    assert np.isfinite(np.asarray(embedding)).all()


def test_image_equals_one_frame_clip(model):
  graphdef, params = model
  frames = clip(1)
  image, _ = apply(graphdef, params, frames[:, 0])
  one_frame, _ = apply(graphdef, params, frames)
  np.testing.assert_allclose(image, one_frame, rtol=1e-6, atol=1e-6)
  # The image as the only valid frame of a padded 4-frame clip, at t = 0.
  padded = jnp.concatenate([frames, clip(3, seed=1)], axis=1)
  positions = np.broadcast_to(positions_lib.grid_positions(np.zeros(4), 2, 2), (2, 16, 3))
  mask = jnp.array([[True, False, False, False]] * 2)
  in_clip, _ = apply(graphdef, params, padded, positions=positions, frame_mask=mask)
  np.testing.assert_allclose(in_clip, image, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("time_embedding,span,low,high", [
  ("none", 0.0, 0.0, 0.01),  # the earlier default: the first and last frame look the same
  ("none", np.pi, 0.02, 0.2),  # RoPE with a usable temporal span
  ("sincos", np.pi, 0.3, 2.0)])  # the default: the time embedding
@pytest.mark.slow
def test_tokens_carry_their_frame_time_from_initialisation(time_embedding, span, low, high):
  """A clip of one repeated frame: only time tells its frames apart. Unscaled RoPE alone left a
  fresh encoder's tokens nearly identical across frames (the demo could not learn order)."""
  cfg = dataclasses.replace(CFG, time_embedding=time_embedding,
                            rope=dataclasses.replace(CFG.rope, temporal_span=span))
  graphdef, params = make(cfg)
  _, aux = apply(graphdef, params, jnp.repeat(clip(1), 8, axis=1))
  tokens = np.asarray(aux["tokens"]).reshape(2, 8, 4, -1)
  gap = np.abs(tokens[:, 0] - tokens[:, -1]).max() / np.abs(tokens).max()
  assert low < gap < high


@pytest.mark.slow
def test_padding_frames_do_not_change_the_embedding(model):
  graphdef, params = model
  frames = clip(2)
  times = positions_lib.frame_times(2)
  short, _ = apply(graphdef, params, frames,
                   positions=np.broadcast_to(positions_lib.grid_positions(times, 2, 2), (2, 8, 3)))
  padded_times = np.concatenate([times, times])
  padded, _ = apply(
    graphdef, params, jnp.concatenate([frames, clip(2, seed=5)], axis=1),
    positions=np.broadcast_to(positions_lib.grid_positions(padded_times, 2, 2), (2, 16, 3)),
    frame_mask=jnp.array([[True, True, False, False]] * 2))
  np.testing.assert_allclose(padded, short, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_segment_and_region_pooling(model):
  graphdef, params = model
  frames = clip(8)
  whole = jnp.array([[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.4, 0.4]]] * 2)
  embedding, aux = apply(graphdef, params, frames, segments=(1, 2, 4, 8, 16), boxes=whole)
  assert {g: aux["segments"][g].shape for g in aux["segments"]} == {
    g: (2, g, 64) for g in (1, 2, 4, 8, 16)}
  assert bool(aux["segment_mask"][16].all())
  # One segment, or a box over the whole frame, pools exactly what the clip embedding pools.
  np.testing.assert_allclose(aux["segments"][1][:, 0], embedding, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["regions"][:, 0], embedding, rtol=1e-5, atol=1e-6)
  # Segments are ordered: swapping the two halves of the clip swaps the 2-segment embeddings.
  swapped = jnp.concatenate([frames[:, 4:], frames[:, :4]], axis=1)
  _, aux_swapped = apply(graphdef, params, swapped, segments=(2,))
  assert not np.allclose(aux_swapped["segments"][2], aux["segments"][2], atol=1e-4)


def test_running_mean_embedding_is_subtracted_from_every_pooled_output():
  """With `embedding_center` every pooled output of a T-frame clip loses the running mean of
  the updated length nearest T (segments: T / g frames); nothing before any update."""
  cfg = dataclasses.replace(CFG, embedding_center=True)
  lengths = vit.center_lengths(cfg)
  assert lengths == (1, 2, 4, 8, 16, 32, 64)  # rope.virtual_frames = 64
  assert [vit.center_index(lengths, t) for t in (1, 2, 3, 5, 6, 100)] == [0, 1, 2, 2, 3, 6]
  graphdef, params = make(cfg)
  frames, boxes = clip(8), jnp.array([[[0.0, 0.0, 1.0, 1.0]]] * 2)
  raw, raw_aux = apply(graphdef, params, frames, segments=(2, 4), boxes=boxes)
  raw_image, _ = apply(graphdef, params, frames[:, :1])
  model = nnx.merge(graphdef, params)
  np.testing.assert_array_equal(model.embedding_center[...], 0.0)
  centers = jax.random.normal(jax.random.key(1), (7, 64))
  model.embedding_center[...] = centers
  model.embedding_center_count[...] = jnp.array([3.0, 0, 1, 0, 0, 0, 0])  # 1 and 4 updated
  embedding, aux = apply(graphdef, nnx.state(model), frames, segments=(2, 4), boxes=boxes)
  np.testing.assert_allclose(embedding, raw - centers[2], atol=1e-5)  # 8 frames: nearest is 4
  np.testing.assert_allclose(aux["regions"], raw_aux["regions"] - centers[2], atol=1e-5)
  np.testing.assert_allclose(aux["segments"][2], raw_aux["segments"][2] - centers[2], atol=1e-5)
  # 2-frame segments: 1 and 4 frames are equally near; the shorter wins.
  np.testing.assert_allclose(aux["segments"][4], raw_aux["segments"][4] - centers[0], atol=1e-5)
  np.testing.assert_allclose(aux["tokens"], raw_aux["tokens"])
  image, _ = apply(graphdef, nnx.state(model), frames[:, :1])
  np.testing.assert_allclose(image, raw_image - centers[0], atol=1e-5)


def test_segment_masks_flag_padding_only_segments(model):
  graphdef, params = model
  mask = jnp.array([[True, True, False, False]] * 2)
  _, aux = apply(graphdef, params, clip(4), frame_mask=mask, segments=(2, 4))
  np.testing.assert_array_equal(aux["segment_mask"][2], [[True, False]] * 2)
  np.testing.assert_array_equal(aux["segment_mask"][4], [[True, True, False, False]] * 2)


def unstack(scan_params, list_params):
  """Copies scanned (stacked) block weights into the per-block layout of an unscanned model."""
  pure = nnx.to_pure_dict(scan_params)
  pure["blocks"] = {i: jax.tree.map(lambda a: a[i], pure["blocks"]) for i in range(CFG.depth)}
  nnx.replace_by_pure_dict(list_params, pure)
  return list_params


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
@pytest.mark.slow
def test_scan_matches_unrolled(remat):
  scan_cfg = dataclasses.replace(CFG, scan=True, remat=remat)
  g_scan, p_scan = make(scan_cfg)
  g_list, p_list = make(dataclasses.replace(CFG, remat=remat), seed=1)
  p_list = unstack(p_scan, p_list)
  frames = clip(2)
  np.testing.assert_allclose(apply(g_scan, p_scan, frames)[0], apply(g_list, p_list, frames)[0],
                             rtol=1e-5, atol=1e-5)

  def loss(params, graphdef):
    return jnp.sum(apply(graphdef, params, frames)[0] ** 2)

  grads = jax.grad(loss)(p_scan, g_scan)
  norm = optax_global_norm(grads)
  assert np.isfinite(norm) and norm > 0


def optax_global_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree))))


@pytest.mark.slow
def test_sharded_forward_matches_single_device():
  """Under FSDP rules (the default: `embed` over the batch's `fsdp` axis, `mlp` and `heads` over
  `model`) on a 2 x 2 x 2 mesh, the forward pass with its activations pinned to the batch's
  split, and without, equals the single-device forward."""
  assert jax.device_count() == 8
  config = config_lib.default_config("mu/8")
  config.mesh.shape = (2, 2, 2)
  mesh_cfg = config_lib.MeshConfig.from_config(config)
  mesh = sharding.make_mesh(mesh_cfg)
  cfg = dataclasses.replace(CFG, scan=True)
  graphdef, abstract = vit.abstract_encoder(cfg)
  shardings = sharding.tree_shardings(abstract, mesh, mesh_cfg.rules)
  _, sharded_params = vit.init_encoder(cfg, 0, shardings)
  _, params = vit.init_encoder(cfg, 0)
  kernel = sharded_params["blocks"]["mlp"]["fc1"]["kernel"]
  assert kernel[...].sharding.spec == P(None, "fsdp", "model")
  activations = sharding.activation_sharding(mesh, mesh_cfg.rules)
  assert activations.spec == P(("data", "fsdp"), None, None)
  frames, mask = clip(4, b=8), jnp.ones((8, 4), bool).at[:, 3].set(False)

  def forward(params, frames, mask, activations=None):
    return apply(graphdef, params, frames, frame_mask=mask, segments=(2,),
                 activation_sharding=activations)[1]["segments"][2]

  batch = sharding.batch_sharding(mesh, mesh_cfg.rules, 5)
  single = jax.jit(forward)(params, frames, mask)
  for pinned in (None, activations):
    sharded = jax.jit(functools.partial(forward, activations=pinned), in_shardings=(
      shardings, batch, NamedSharding(mesh, P(("data", "fsdp"), None))))(
        sharded_params, jax.device_put(frames, batch), mask)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


def test_pinned_activations_keep_the_batch_split_under_fsdp():
  """With `embed` sharded over the `fsdp` axis that also splits the batch, GSPMD left alone
  gathers the batch on every device and splits the width (the weights' layout); pinning the
  blocks' activations keeps each device's share of the batch, and the forward pass's
  temporaries shrink by about the 8 batch shards (ViT-L/14 at scale: docs/scaling.md)."""
  mesh_cfg = config_lib.MeshConfig(axes=("data", "fsdp", "model"), shape=(1, 8, 1),
                                   rules=config_lib.DEFAULT_SHARDING_RULES)
  mesh = sharding.make_mesh(mesh_cfg)
  cfg = dataclasses.replace(CFG, scan=True)
  graphdef, abstract = vit.abstract_encoder(cfg)
  shardings = sharding.tree_shardings(abstract, mesh, mesh_cfg.rules)
  frames = jax.ShapeDtypeStruct((64, 4, SIZE, SIZE, 3), jnp.float32)
  temp = {}
  for pinned in (None, sharding.activation_sharding(mesh, mesh_cfg.rules)):
    def forward(params, frames, pinned=pinned):
      return apply(graphdef, params, frames, activation_sharding=pinned)[0]

    jitted = jax.jit(forward, in_shardings=(
      shardings, sharding.batch_sharding(mesh, mesh_cfg.rules, 5)))
    compiled = jitted.lower(abstract, frames).compile()
    temp[pinned is not None] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[True] * 3 < temp[False], temp


@pytest.mark.slow
def test_each_bucket_compiles_once(model):
  graphdef, params = model
  traces = []

  @jax.jit
  def forward(params, frames):
    traces.append(frames.shape[1])
    return apply(graphdef, params, frames)[0]

  for _ in range(3):
    for t in (1, 2, 4, 8, 16):
      forward(params, clip(t, seed=t))
  assert traces == [1, 2, 4, 8, 16]
  assert forward._cache_size() == 5


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  graphdef, params = make(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  embedding, aux = apply(graphdef, params, clip(2))
  assert aux["tokens"].dtype == jnp.bfloat16 and embedding.dtype == jnp.float32
  reference, _ = apply(*make(), clip(2))
  np.testing.assert_allclose(embedding, reference, atol=0.1)


@pytest.mark.slow
def test_attention_implementation_reaches_the_kernel():
  """`model.attention` picks `jax.nn.dot_product_attention`'s kernel for the blocks: cuDNN's is
  refused on a machine without cuDNN and agrees with XLA's where it runs."""
  xla = dataclasses.replace(CFG, dtype="bfloat16")
  graphdef, params = make(xla)
  reference, _ = apply(graphdef, params, clip(2))
  cudnn_graphdef, _ = make(dataclasses.replace(xla, attention="cudnn"))
  if jax.default_backend() != "gpu":
    with pytest.raises(RuntimeError, match="cuDNN"):
      apply(cudnn_graphdef, params, clip(2))
  else:
    embedding, _ = apply(cudnn_graphdef, params, clip(2))
    np.testing.assert_allclose(embedding, reference, atol=0.05)


def test_exact_gelu_is_jax_exact_gelu():
  """The MLPs' erf-form GELU is `jax.nn.gelu(approximate=False)` (erfc form) to float32
  rounding, values and gradients, and keeps a 16-bit input's dtype."""
  x = jnp.linspace(-12.0, 12.0, 100_001, dtype=jnp.float32)
  np.testing.assert_allclose(jax.jit(vit.gelu_exact)(x), jax.nn.gelu(x, approximate=False),
                             rtol=0, atol=2e-6)
  grad = jax.jit(jax.vmap(jax.grad(vit.gelu_exact)))
  exact_grad = jax.vmap(jax.grad(functools.partial(jax.nn.gelu, approximate=False)))
  np.testing.assert_allclose(grad(x), exact_grad(x), rtol=0, atol=1e-6)
  assert vit.gelu_exact(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("queries", [1, 6])
def test_attention_is_jax_xla_attention(dtype, atol, queries):
  """`vit.dot_product_attention` is `jax.nn.dot_product_attention`'s XLA path, values and
  gradients, under per-query and key masks, with a query that sees no token."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, 6, 2, 8)).astype(dtype)
  k, v = (jax.random.normal(key, (2, 5, 2, 8)).astype(dtype) for key in keys[1:3])
  mask = jax.random.bernoulli(keys[3], 0.6, (2, queries, 5)).at[0, 0].set(False)

  def loss(attention, q, k, v):
    return jnp.sum(jnp.sin(attention(q, k, v).astype(jnp.float32)))

  ours = functools.partial(vit.dot_product_attention, mask=mask)
  theirs = functools.partial(jax.nn.dot_product_attention, mask=mask[:, None],
                             implementation="xla")
  assert ours(q, k, v).dtype == q.dtype
  np.testing.assert_allclose(np.float32(ours(q, k, v)), np.float32(theirs(q, k, v)), atol=atol)
  for a, b in zip(jax.grad(functools.partial(loss, ours), (0, 1, 2))(q, k, v),
                  jax.grad(functools.partial(loss, theirs), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=atol)


def test_bad_frame_size(model):
  with pytest.raises(ValueError, match="frame size 20x16 is not a multiple of the patch size 8"):
    apply(*model, jnp.zeros((1, 1, 20, 16, 3)))


def test_rotation_is_computed_once_per_pass():
  """The compiled forward and backward evaluate the rotary cosines and sines once (one cosine
  for the rotation, one for the time embedding), not again inside every rotated projection of
  every layer and of the backward pass, as XLA's fusion did (9 of each here) before
  `rope.rotation` kept them as arrays: a tenth of the demo's train step on CPU."""
  cfg = dataclasses.replace(CFG, patch_size=4)
  graphdef, params = make(cfg)
  b, t = 2, 4
  positions = np.broadcast_to(
    positions_lib.grid_positions(positions_lib.frame_times(t), 8, 8), (b, t * 64, 3))

  def loss(params, frames, positions):
    embedding, _ = nnx.merge(graphdef, params)(frames, positions=positions)
    return jnp.sum(embedding ** 2)

  frames = jax.random.normal(jax.random.key(0), (b, t, 32, 32, 3))
  text = jax.jit(jax.grad(loss)).lower(params, frames, positions).compile().as_text()
  assert cfg.time_embedding == "sincos"
  assert text.count(" cosine(") == 2 and text.count(" sine(") == 2
