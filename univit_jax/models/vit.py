"""The UniViT encoder: a pre-LN ViT over frames with U-RoPE and an attention-pooling head.

One set of weights serves images (T = 1) and clips of any frame count: frames are patchified one
by one (tubelet 1), there is no CLS token and no spatial position embedding, and every token
carries an explicit (t, h, w) position used by the rotary embedding (`rope.py`) and, for time,
by a time embedding (`time_embedding="sincos"`): a learned projection of sinusoids of the
frame's time on the virtual grid, added to the patch embeddings, so frame order is in every
token from the first step (RoPE alone leaves a fresh encoder blind to order: reversing a clip
changed its embedding by 1 - cos ~ 1e-6 to 1e-8; docs/training.md). A
SigLIP2-style multihead attention-pooling (MAP) head turns the tokens into the embedding; the same
head, given per-segment or per-region masks, pools one embedding per temporal segment and per box.

The same code runs the pretrained weights of a plain ViT (a big_vision SigLIP image tower,
`siglip.py`): `ModelConfig` switches add a patch-embedding bias and a learned position table,
drop the pre-norm and the rotary embedding (`rope.mode="none"`) and take the tanh GELU.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv`, `patch`, `layers`) that the
config's sharding rules map to mesh axes (`univit_jax/sharding.py`); on a mesh, the activations
between blocks are pinned to the rules' ("batch", "tokens", "embed") when the caller passes
their sharding. `dtype` is the compute dtype, `param_dtype` the storage dtype; layer-norm
statistics and attention softmax run in float32.
"""

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from univit_jax import config_lib, sharding
from univit_jax import positions as positions_lib
from univit_jax.models import masks as masks_lib
from univit_jax.models import rope


def _init(names: tuple[str | None, ...], init=nnx.initializers.lecun_normal()):
  return nnx.with_partitioning(init, names)


def _dense(in_dim: int, out_dim: int, names: tuple[str, str], cfg: config_lib.ModelConfig,
           rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(
    in_dim, out_dim, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
    kernel_init=_init(names), bias_init=_init(names[1:], nnx.initializers.zeros_init()),
    rngs=rngs)


def _norm(cfg: config_lib.ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
    cfg.width, epsilon=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
    scale_init=_init(("embed",), nnx.initializers.ones_init()),
    bias_init=_init(("embed",), nnx.initializers.zeros_init()), rngs=rngs)


def gelu_exact(x: jax.Array) -> jax.Array:
  """The exact GELU, x * Phi(x), in its erf form: 0.5 x (1 + erf(x / sqrt(2))).

  The same function as `jax.nn.gelu(x, approximate=False)`, which writes it with erfc for
  relative accuracy in the far negative tail; XLA:CPU's erfc costs twice its erf (ViT-Ti/16's
  GELUs were ~12% of the f32 train step's thunk time, profiled 2026-12-01). In float32 the two
  differ by at most 1.1e-6 absolute over [-12, 12] (erfc: 3.8e-7 from the float64 value), and
  their gradients by 2.4e-7; it is the form PyTorch's exact GELU uses.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(2 ** -0.5, x.dtype)))


class Mlp(nnx.Module):
  """Two dense layers with a GELU between them (exact erf, or tanh-approximate by config)."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.fc1 = _dense(cfg.width, cfg.mlp_dim, ("embed", "mlp"), cfg, rngs)
    self.fc2 = _dense(cfg.mlp_dim, cfg.width, ("mlp", "embed"), cfg, rngs)
    self.approximate = cfg.gelu_approximate

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.fc1(x)
    return self.fc2(jax.nn.gelu(h, approximate=True) if self.approximate else gelu_exact(h))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
                          ) -> jax.Array:
  """Softmax attention of `q [B, Q, H, K]` over `k, v [B, N, H, K]` where `mask [B, Q | 1, N]`.

  What `jax.nn.dot_product_attention(..., implementation="xla")` computes (logits in float32,
  masked to its large negative, softmax in float32, weights cast to v's dtype), written as two
  einsums over all heads at once: jax's vmaps its core over the heads and broadcasts the mask
  to every head, which cost ViT-Ti/16's train step on XLA:CPU 28% more in attention for 8-frame
  clips (1,568 tokens; fwd + bwd 884 against 634 ms of CPU per layer) and 4% more for images
  (2026-12-01). The softmax's division comes after the second einsum (as in flash attention),
  on `[B, Q, H, K]` instead of `[B, H, Q, N]`: XLA:CPU wrote the divisor out at the full
  `[B, H, Q, N]` for its dot fusions (fwd + bwd of two 1,024-token clips of the demo model:
  151 against 182 ms, 1-minute load 4).
  """
  logits = jnp.einsum("bqhk,bnhk->bhqn", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None], logits * q.shape[-1] ** -0.5,
                     -0.7 * jnp.finfo(jnp.float32).max)
  # A row's largest logit becomes exp(0) = 1, so the sum is >= 1 also for fully masked rows.
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = jnp.einsum("bhqn,bnhk->bqhk", weights.astype(v.dtype), v)
  total = jnp.transpose(jnp.sum(weights, axis=-1), (0, 2, 1))[..., None]  # [B, Q, H, 1]
  return out / total.astype(out.dtype)


class Attention(nnx.Module):
  """Multi-head attention; queries and keys are rotated by U-RoPE when a rotation is given.

  `implementation` "xla" is `dot_product_attention` here, "cudnn" that of
  `jax.nn.dot_product_attention`; the pooling head keeps "xla", whose few queries and arbitrary
  masks gain nothing from a fused kernel.
  """

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs,
               implementation: str = "xla"):
    h, k, d = cfg.num_heads, cfg.head_dim, cfg.width
    self.implementation = implementation

    def proj(kernel_shape, kernel_names, bias_shape, bias_names, equation):
      return nnx.Einsum(
        equation, kernel_shape, bias_shape, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_init(kernel_names),
        bias_init=_init(bias_names, nnx.initializers.zeros_init()), rngs=rngs)

    self.query, self.key, self.value = (
      proj((d, h, k), ("embed", "heads", "kv"), (h, k), ("heads", "kv"), "bnd,dhk->bnhk")
      for _ in range(3))
    self.out = proj((h, k, d), ("heads", "kv", "embed"), (d,), ("embed",), "bnhk,hkd->bnd")

  def __call__(self, queries: jax.Array, tokens: jax.Array, mask: jax.Array,
               rotation: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Attends from `queries [B, Q, D]` to `tokens [B, N, D]`.

    Args:
      queries: `[B, Q, D]` (the tokens themselves for self-attention).
      tokens: `[B, N, D]` keys and values.
      mask: `[B, Q, N]` bool, True where query q may attend to token n (`[B, 1, N]`: the
        same for every query).
      rotation: `rope.rotation` of the rotary angles for self-attention (Q == N), or None for
        no rotation.
    """
    q, k, v = self.query(queries), self.key(tokens), self.value(tokens)
    if rotation is not None:
      q, k = rope.rotate(q, rotation), rope.rotate(k, rotation)
    if self.implementation == "xla":
      out = dot_product_attention(q, k, v, mask)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                         implementation=self.implementation)
    return self.out(out)


class Block(nnx.Module):
  """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.norm1 = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs, implementation=cfg.attention)
    self.norm2 = _norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, rotation: tuple[jax.Array, jax.Array] | None,
               mask: jax.Array) -> jax.Array:
    y = self.norm1(x)
    x = x + self.attn(y, y, mask, rotation)
    return x + self.mlp(self.norm2(x))


class MapHead(nnx.Module):
  """SigLIP2-style multihead attention pooling: a learned probe attends to the tokens.

  Several queries (all the same probe) with different masks pool several embeddings at once
  (the clip, its temporal segments, its regions) while keys and values are projected once.
  """

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.probe = nnx.Param(
      _init((None, "embed"), nnx.initializers.xavier_uniform())(
        rngs.params(), (1, cfg.width), cfg.param_dtype))
    self.attn = Attention(cfg, rngs=rngs)
    self.norm = _norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Pools `tokens [B, N, D]` under `mask [B, Q, N]` into `[B, Q, D]`."""
    batch, num_queries = mask.shape[:2]
    probe = jnp.broadcast_to(self.probe[...].astype(tokens.dtype),
                             (batch, num_queries, tokens.shape[-1]))
    x = self.attn(probe, tokens, mask)
    return x + self.mlp(self.norm(x))


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


TIME_FEATURES = 16  # sinusoid pairs of the time embedding


def time_features(times: jax.Array, virtual_frames: int) -> jax.Array:
  """Sinusoids `[..., 2 * TIME_FEATURES]` of time positions `[...]` on the virtual grid.

  Frequencies are geometric from pi / virtual_frames (a half turn across the grid, so the
  slowest pair orders every position) to 1 rad per grid step (adjacent frames differ).
  """
  freqs = (np.pi / virtual_frames) ** (np.arange(TIME_FEATURES) / (TIME_FEATURES - 1))
  angles = times[..., None].astype(jnp.float32) * jnp.asarray(freqs, jnp.float32)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class EmbeddingCenter(nnx.Variable):
  """A running mean of the encoder's embeddings, kept by the train step (not by gradients)."""


def center_lengths(cfg: config_lib.ModelConfig) -> tuple[int, ...]:
  """The clip lengths with a row of `embedding_center`: 1, 2, 4, ... up to the virtual grid."""
  return tuple(2 ** i for i in range(int(np.log2(cfg.rope.virtual_frames)) + 1))


def _log_distances(lengths: tuple[int, ...], num_frames: int) -> np.ndarray:
  """|log(length / num_frames)| of each length: how far apart clip lengths are."""
  return np.abs(np.log(np.asarray(lengths, np.float64) / num_frames))


def center_index(lengths: tuple[int, ...], num_frames: int) -> int:
  """The row of `embedding_center` that clips of `num_frames` frames update: the length
  nearest on a log scale."""
  return int(np.argmin(_log_distances(lengths, num_frames)))


class UniViT(nnx.Module):
  """The encoder. Call with frames `[B, T, H, W, C]`; returns `(embedding [B, D], aux)`.

  With `cfg.embedding_center`, the encoder holds `embedding_center [L, D]`, the running mean of
  its raw embeddings per clip length of `center_lengths` (kept by the train step), and
  `embedding_center_count [L]`, the steps that updated each row. Every pooled output of a
  T-frame clip (the embedding, its regions; a segment of T / g frames) loses the row of the
  updated length nearest T on a log scale (none while no row was updated). A loss on
  batch-centred embeddings cannot see the component every embedding shares, so it is left large
  and arbitrary; without it the cosine of two embeddings measures what the loss shaped.
  """

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, c = cfg.patch_size, cfg.channels
    self.patch_embed = _dense(p * p * c, cfg.width, ("patch", "embed"), cfg, rngs,
                              use_bias=cfg.patch_bias)
    if cfg.pos_grid is not None:
      self.pos_embed = nnx.Param(
        _init((None, None, "embed"), nnx.initializers.normal(cfg.width ** -0.5))(
          rngs.params(), (1, cfg.pos_grid[0] * cfg.pos_grid[1], cfg.width), cfg.param_dtype))
    if cfg.time_embedding == "sincos":
      self.time_embed = _dense(2 * TIME_FEATURES, cfg.width, (None, "embed"), cfg, rngs,
                               use_bias=False)
    if cfg.norm_pre:
      self.norm_pre = _norm(cfg, rngs)
    if cfg.scan:
      @nnx.split_rngs(splits=cfg.depth)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)
      self.blocks = stacked(rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.norm_post = _norm(cfg, rngs)
    self.head = MapHead(cfg, rngs=rngs)
    if cfg.embedding_center:
      lengths = len(center_lengths(cfg))
      self.embedding_center = EmbeddingCenter(jnp.zeros((lengths, cfg.width), jnp.float32))
      self.embedding_center_count = EmbeddingCenter(jnp.zeros((lengths,), jnp.float32))

  def _encode(self, x: jax.Array, rotation: tuple[jax.Array, jax.Array] | None, mask: jax.Array,
              activation_sharding: jax.sharding.NamedSharding | None) -> jax.Array:
    def apply(block: Block, x: jax.Array) -> jax.Array:
      x = sharding.constrain(x, activation_sharding)
      return sharding.constrain(block(x, rotation, mask), activation_sharding)

    if not self.cfg.scan:
      apply = _remat(apply, self.cfg.remat)
      for block in self.blocks:
        x = apply(block, x)
      return x
    graphdef, layers = nnx.split(self.blocks)

    def body(x, layer):
      return apply(nnx.merge(graphdef, layer), x), None

    x, _ = jax.lax.scan(_remat(body, self.cfg.remat), x, layers)
    return x

  def __call__(
      self, frames: jax.Array, *, positions: jax.Array | None = None,
      frame_mask: jax.Array | None = None, segments: tuple[int, ...] = (),
      boxes: jax.Array | None = None,
      activation_sharding: jax.sharding.NamedSharding | None = None) -> tuple[jax.Array, dict]:
    """Encodes images or clips.

    Args:
      frames: `[B, T, H, W, C]`, or `[B, H, W, C]` for images (the same as T = 1). H and W
        must be multiples of the patch size.
      positions: `[B, T * gh * gw, 3]` (t, h, w) per token; by default T frames evenly spaced on
        the virtual time grid and patch row / column indices.
      frame_mask: `[B, T]` bool, False for padding frames: they are attended by nobody and get
        the identity rotation. Default: all frames valid.
      segments: granularities g for which to pool one embedding per ordered temporal segment.
      boxes: `[B, R, 4]` (ymin, xmin, ymax, xmax) in [0, 1] to pool one embedding per box over
        the patches (of every frame) whose centre lies inside it.
      activation_sharding: under jit on a mesh, where every block's input and output `[B, N, D]`
        are pinned (`sharding.activation_sharding`: batch split, tokens and width whole). Without
        it GSPMD follows the weights: with `embed` sharded over the batch's `fsdp` axis it
        gathers the batch on every device and splits the width instead (ViT-L/14, 256 images
        per device on 64: 192 GiB of forward temporaries per device, 3.5 GiB pinned;
        docs/scaling.md). None (one device): no constraint.

    Returns:
      `embedding [B, D]` (float32) and `aux` with `tokens [B, N, D]` (after the final norm),
      `token_mask [B, N]`, and when asked, `segments {g: [B, g, D]}` with `segment_mask
      {g: [B, g]}` (False where a segment holds only padding frames) and `regions [B, R, D]`.
    """
    if frames.ndim == 4:
      frames = frames[:, None]
    b, t, h, w, _ = frames.shape
    p = self.cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"frame size {h}x{w} is not a multiple of the patch size {p}")
    gh, gw = h // p, w // p
    if self.cfg.pos_grid is not None and (gh, gw) != tuple(self.cfg.pos_grid):
      raise ValueError(
        f"frame size {h}x{w} gives a {gh}x{gw} patch grid; the position table is for "
        f"{self.cfg.pos_grid[0]}x{self.cfg.pos_grid[1]} ({self.cfg.pos_grid[0] * p}x"
        f"{self.cfg.pos_grid[1] * p} pixels)")
    if positions is None:
      positions = np.broadcast_to(
        positions_lib.grid_positions(
          positions_lib.frame_times(t, self.cfg.rope.virtual_frames), gh, gw),
        (b, t * gh * gw, 3))
    if frame_mask is None:
      frame_mask = jnp.ones((b, t), bool)
    token_mask = masks_lib.frames_to_tokens(frame_mask, gh * gw)

    x = einops.rearrange(
      frames.astype(self.cfg.dtype), "b t (gh ph) (gw pw) c -> b (t gh gw) (ph pw c)",
      ph=p, pw=p)
    x = self.patch_embed(x)
    if self.cfg.pos_grid is not None:
      x = x + jnp.tile(self.pos_embed[...].astype(x.dtype), (1, t, 1))
    if self.cfg.time_embedding == "sincos":
      x = x + self.time_embed(
        time_features(positions[..., 0], self.cfg.rope.virtual_frames).astype(self.cfg.dtype))
    if self.cfg.norm_pre:
      x = self.norm_pre(x)
    rotation = None if self.cfg.rope.mode == "none" else rope.rotation(rope.rope_angles(
      positions, self.cfg.head_dim, self.cfg.rope.mode, self.cfg.rope.base,
      self.cfg.rope.split, token_mask, self.cfg.rope.temporal_span,
      self.cfg.rope.virtual_frames), self.cfg.dtype)
    x = self._encode(x, rotation, token_mask[:, None, :], activation_sharding)
    tokens = self.norm_post(x)

    queries = [token_mask[:, None, :]]
    for g in segments:
      seg = masks_lib.frames_to_tokens(
        jnp.asarray(masks_lib.segment_frame_masks(t, g)), gh * gw)  # [g, N]
      valid = seg[None] & token_mask[:, None, :]  # [B, g, N]
      # A segment made only of padding frames still pools its (repeated) frames; the loss
      # ignores it through segment_mask.
      queries.append(jnp.where(valid.any(-1, keepdims=True), valid, seg[None]))
    if boxes is not None:
      region = jnp.tile(masks_lib.box_patch_masks(boxes, gh, gw), (1, 1, t))  # [B, R, N]
      queries.append(region & token_mask[:, None, :])
    pooled = self.head(tokens, jnp.concatenate(queries, axis=1)).astype(jnp.float32)

    aux = {"tokens": tokens, "token_mask": token_mask}
    center = self._center if self.cfg.embedding_center else lambda x, _: x
    offset = 1
    if segments:
      aux["segments"], aux["segment_mask"] = {}, {}
      for g, q in zip(segments, queries[1:1 + len(segments)]):
        aux["segments"][g] = center(pooled[:, offset:offset + g], max(t // g, 1))
        aux["segment_mask"][g] = (q & token_mask[:, None, :]).any(-1)
        offset += g
    if boxes is not None:
      aux["regions"] = center(pooled[:, offset:], t)
    return center(pooled[:, 0], t), aux

  def _center(self, pooled: jax.Array, num_frames: int) -> jax.Array:
    """`pooled [..., D]` minus the running mean embedding of the updated clip length nearest
    `num_frames` (nothing while no length was updated)."""
    updated = self.embedding_center_count[...] > 0
    distance = jnp.where(updated, _log_distances(center_lengths(self.cfg), num_frames), jnp.inf)
    row = jnp.where(jnp.any(updated), self.embedding_center[...][jnp.argmin(distance)], 0.0)
    return pooled - jax.lax.stop_gradient(row)


def abstract_encoder(cfg: config_lib.ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The encoder's graph and its parameter shapes, without allocating any weights."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: UniViT(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def init_encoder(cfg: config_lib.ModelConfig, seed: int, shardings=None
                 ) -> tuple[nnx.GraphDef, nnx.State]:
  """Creates the encoder's parameters inside jit, born with `shardings` (a tree like the state)."""
  graphdef, _ = abstract_encoder(cfg)

  def create():
    with nnx.use_eager_sharding(False):
      return nnx.split(UniViT(cfg, rngs=nnx.Rngs(seed)))[1]

  return graphdef, jax.jit(create, out_shardings=shardings)()
