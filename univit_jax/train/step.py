"""The train step: a pure function (state, batch, weights) -> (state, metrics), one per bucket.

It comes in two halves (`TrainStep`): the bucket's gradients, and the update, which depends only
on the parameters and so compiles once for every bucket in the training loop.

Loss terms (each weighted by `config.loss`, see `losses.loss_weights`):
  object         the image embedding against the object bank (whole-image rows)
  event_1        the clip embedding against the event_1 bank
  event_<g>      each segment embedding (g ordered segments, 2 <= g <= T) against event_<g>
  object_region  each region (box) embedding against the object bank (weighted as `object`)
  contrastive    the structured contrastive loss: for clips, over [clips; segment-shuffled copies]
                 with ordered event-transition targets at the bucket's contrast granularity; for
                 images, over object co-occurrence (region clusters, else the image's labels)
The weights are an argument (replicated f32 scalars), so the coarse-to-fine curriculum changes
them without recompiling: each frame bucket compiles exactly once.

A step whose loss or gradient is not finite returns the incoming state unchanged (and the metrics
that say so), so the state in memory is never a bad one.
"""

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from univit_jax import config_lib, losses, specs
from univit_jax.data import pipeline
from univit_jax.models import vit
from univit_jax.run_config import data_config
from univit_jax.train import labels as labels_lib
from univit_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static shape of one bucket's step.

  Attributes:
    num_frames: T of the bucket.
    banks: names of the trained banks.
    segments: event granularities with segment terms (`labels.segment_granularities`).
    contrast_granularity: g of the shuffled copies (clips), 0 for the image form.
    has_boxes: the batches carry boxes (region terms).
  """
  num_frames: int
  banks: tuple[str, ...]
  segments: tuple[int, ...]
  contrast_granularity: int
  has_boxes: bool

  @classmethod
  def for_bucket(cls, num_frames: int, banks: tuple[str, ...], has_boxes: bool) -> "StepSpec":
    segments = labels_lib.segment_granularities(banks, num_frames)
    divisible = [g for g in segments if num_frames % g == 0]
    return cls(num_frames=num_frames, banks=banks, segments=segments,
               contrast_granularity=max(divisible, default=0), has_boxes=has_boxes)


# The fields of a batch the step reads besides the labels (`abstract_batch`).
STEP_INPUTS = ("frames", "positions", "frame_mask", "boxes")


def abstract_batch(data_cfg: data_config.DataConfig, spec: StepSpec, batch_size: int,
                   top_k: int, image_labels: str) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the step of a bucket takes, as `jax.ShapeDtypeStruct`s: the inputs of
  `pipeline.example_shapes` the step reads (boxes: `data.max_boxes` per example when
  `spec.has_boxes`) and the label fields `labels.LabelAttacher` adds, `top_k` labels a row.
  What the training loop compiles each bucket for, and `--mode=summary` with it.

  Args:
    data_cfg: the data settings (frame size, boxes per example).
    spec: the bucket's step.
    batch_size: its global batch.
    top_k: the largest top-k of the trained banks' labels (`LabelAttacher.top_k`).
    image_labels: `loss.image_labels` (the width of `labels_global`).
  """
  t = spec.num_frames
  shapes = pipeline.example_shapes(data_cfg, t, batch_size, spec.has_boxes)
  batch = {k: v for k, v in shapes.items() if k in STEP_INPUTS}
  num_boxes = data_cfg.max_boxes if spec.has_boxes else None
  for key, (shape, dtype) in labels_lib.label_shapes(spec.banks, top_k, t, batch_size, num_boxes,
                                                     image_labels).items():
    batch[key] = jax.ShapeDtypeStruct(shape, dtype)
  return batch


def term_weights(loss_config: config_lib.LossConfig, progress: float,
                 banks: tuple[str, ...]) -> dict[str, jax.Array]:
  """Weights of every term at `progress` (fraction of training done), as f32 scalars."""
  weights = losses.loss_weights(loss_config, progress)
  out = {name: weights.get(name, 0.0) for name in banks}
  out["object_region"] = weights.get(specs.OBJECT_BANK, 0.0)
  out["contrastive"] = weights["contrastive"]
  return {name: jnp.float32(w) for name, w in out.items()}


def mean_pairwise_cosine(embeddings: jax.Array) -> jax.Array:
  """Mean cosine over distinct pairs of rows `[B, D]`: near 1 when embeddings collapse."""
  e = losses.l2_normalize(embeddings)
  b = e.shape[0]
  return (jnp.sum(e @ e.T) - jnp.trace(e @ e.T)) / max(b * (b - 1), 1)


def _shuffle_frames(x: jax.Array, perm: jax.Array) -> jax.Array:
  """Reorders the g equal segments of the frame axis (axis 1) of `x [B, T, ...]` by perm [B, g]."""
  b, t = x.shape[:2]
  g = perm.shape[1]
  segments = x.reshape((b, g, t // g) + x.shape[2:])
  index = perm.reshape((b, g) + (1,) * (segments.ndim - 2))
  return jnp.take_along_axis(segments, index, axis=1).reshape(x.shape)


def center_statistics(graphdef: nnx.GraphDef, params: nnx.State, embeddings: jax.Array,
                      valid: jax.Array, num_frames: int, momentum: float) -> nnx.State:
  """The encoder's running mean embeddings (`vit.UniViT.embedding_center` and its count, the
  `vit.EmbeddingCenter` leaves of `params`) with the row of `num_frames`-frame clips moved to
  this batch's mean; an empty state for an encoder without them.

  `embeddings [B, D]` are the encoder's output at `params`, already centred by the current mean,
  so the mean of the `valid [B]` rows is the step to the batch's mean. A row's first
  1 / (1 - momentum) updates average plainly (weight 1 / (n + 1)), so no row keeps a trace of
  its zero start; later ones weigh the batch by 1 - momentum.
  """
  model = nnx.merge(graphdef, params, copy=True)  # merge shares Variables; `params` stays as is
  encoder = model.encoder
  if not encoder.cfg.embedding_center:
    return nnx.State({})
  row = vit.center_index(vit.center_lengths(encoder.cfg), num_frames)
  weight = valid.astype(jnp.float32)[:, None]
  step = jnp.sum(embeddings.astype(jnp.float32) * weight, 0) / jnp.maximum(jnp.sum(weight), 1.0)
  count = encoder.embedding_center_count[...]
  seen = jnp.any(valid).astype(jnp.float32)
  rate = seen * jnp.maximum(1.0 - momentum, 1.0 / (count[row] + 1.0))
  encoder.embedding_center[...] = encoder.embedding_center[...].at[row].add(rate * step)
  encoder.embedding_center_count[...] = count.at[row].add(seen)
  return nnx.state(model, vit.EmbeddingCenter)


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """One bucket's optimiser step as two pure functions, callable as the whole step.

  `gradients` holds everything that depends on the bucket's shapes (the encoder, the loss terms
  and their gradients); `update` everything that depends only on the parameters' (the optimiser,
  the finiteness guard, the norms), so the training loop compiles `update` once for all buckets
  (`compile_update`) rather than once per bucket: it is about a quarter of each bucket's program.
  Called, it runs both as one function, which `compile_step` compiles as one program.

  Attributes:
    gradients: (params, rng, step, batch, weights) -> (grads, metrics with the total `loss`,
      statistics: the new values of the parameters no gradient trains, `center_statistics`);
      `rng` is the state's base key data, `step` its step counter.
    update: (state, grads, loss, statistics) -> (state, metrics).
  """
  gradients: Callable
  update: Callable

  def __call__(self, state: TrainState, batch: Batch, weights: Mapping[str, jax.Array]
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    grads, metrics, statistics = self.gradients(state.params, state.rng, state.step, batch,
                                                weights)
    state, more = self.update(state, grads, metrics["loss"], statistics)
    return state, {**metrics, **more}


def make_update(tx: optax.GradientTransformation, learning_rate: optax.Schedule) -> Callable:
  """The update half of every bucket's step (`TrainStep.update`).

  The statistics the gradients half computed (`center_statistics`) replace whatever the
  optimiser made of those parameters. A step whose loss or gradient is not finite returns the
  incoming state unchanged.
  """

  def update(state: TrainState, grads: nnx.State, loss: jax.Array, statistics: nnx.State
             ) -> tuple[TrainState, dict[str, jax.Array]]:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = nnx.merge_state(optax.apply_updates(state.params, updates), statistics)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng)
    state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    return state, dict(
      grad_norm=grad_norm, param_norm=optax.global_norm(params),
      update_norm=optax.global_norm(updates), learning_rate=learning_rate(new.step - 1),
      finite=finite)

  return update


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    learning_rate: optax.Schedule, loss_config: config_lib.LossConfig,
                    spec: StepSpec,
                    logits_sharding: jax.sharding.NamedSharding | None = None,
                    activation_sharding: jax.sharding.NamedSharding | None = None) -> TrainStep:
  """The pure step of one bucket (compile it with `compile_step`, or its halves with
  `compile_gradients` and `compile_update`).

  `logits_sharding` (`sharding.logits_sharding`) pins every bank term's partial-FC logits
  `[N, M]`; None leaves their layout to GSPMD, which can replicate them over the class axes.
  `activation_sharding` (`sharding.activation_sharding`) pins the encoder's activations between
  blocks to the batch's split (`vit.UniViT`); None leaves them to GSPMD, which under FSDP rules
  gathers the batch instead of the weights.
  """
  disc = loss_config.discrimination

  def loss_fn(params: nnx.State, batch: Batch, rng: jax.Array, weights: Mapping[str, jax.Array]):
    model = nnx.merge(graphdef, params)
    centres = {name: model.heads[name].centres[...] for name in spec.banks}
    keys = iter(jax.random.split(rng, 16))
    emb, aux = model.encoder(batch["frames"], positions=batch["positions"],
                             frame_mask=batch["frame_mask"], segments=spec.segments,
                             boxes=batch["boxes"] if spec.has_boxes else None,
                             activation_sharding=activation_sharding)
    terms = {}
    for index, name in enumerate(labels_lib.GLOBAL_BANKS):
      if name in centres:
        terms[name] = losses.discrimination_loss(
          emb, batch["labels_global"], batch["global_bank"] == index, centres[name], next(keys),
          disc, logits_sharding)
    for g in spec.segments:
      name = specs.event_bank_name(g)
      valid = batch[f"segments_valid_{g}"] & aux["segment_mask"][g]
      terms[name] = losses.discrimination_loss(
        aux["segments"][g], batch[f"labels_segments_{g}"], valid, centres[name], next(keys), disc,
        logits_sharding)
    if spec.has_boxes and specs.OBJECT_BANK in centres:
      terms["object_region"] = losses.discrimination_loss(
        aux["regions"], batch["labels_regions"], batch["regions_valid"],
        centres[specs.OBJECT_BANK], next(keys), disc, logits_sharding)

    if spec.contrast_granularity:
      g = spec.contrast_granularity
      clusters = jnp.where(batch[f"segments_valid_{g}"],
                           batch[f"labels_segments_{g}"][..., 0], -1)
      perm, order_matters = losses.shuffle_segments(clusters, next(keys))
      # A second pass, not one over clips and copies together: that doubles the pass's batch,
      # and ViT-L/14's 16-frame bucket no longer fits a v5p (docs/scaling.md).
      shuffled, _ = model.encoder(_shuffle_frames(batch["frames"], perm),
                                  positions=batch["positions"],
                                  frame_mask=_shuffle_frames(batch["frame_mask"], perm),
                                  activation_sharding=activation_sharding)
      terms["contrastive"] = losses.structured_contrastive_loss(
        jnp.concatenate([emb, shuffled]), losses.clip_targets(clusters, perm, order_matters),
        None, loss_config.temperature)
    else:
      if spec.has_boxes:
        ids, valid = losses.object_sets(
          batch["labels_regions"], batch["regions_valid"], batch["labels_global"],
          batch["global_bank"] == labels_lib.GLOBAL_BANKS.index(specs.OBJECT_BANK))
      else:
        ids = batch["labels_global"][..., None]
        valid = (batch["labels_global"] >= 0) & (batch["global_bank"] >= 0)[:, None]
      terms["contrastive"] = losses.structured_contrastive_loss(
        emb, losses.set_jaccard(ids, valid), None, loss_config.temperature)

    total, metrics = losses.combine_losses(terms, {name: weights[name] for name in terms})
    metrics["embedding_cosine"] = mean_pairwise_cosine(emb)
    return total, (metrics, emb)

  def gradients(params: nnx.State, rng: jax.Array, step: jax.Array, batch: Batch,
                weights: Mapping[str, jax.Array]
                ) -> tuple[nnx.State, dict[str, jax.Array], nnx.State]:
    """The gradient of the weighted loss at `params`, its metrics, and the running statistics
    this batch moves (`center_statistics`). `weights`: f32 [] per term."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    (_, (metrics, emb)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch, rng, weights)
    statistics = center_statistics(graphdef, params, emb, batch["frame_mask"].any(-1),
                                   spec.num_frames, loss_config.center_momentum)
    return grads, metrics, statistics

  return TrainStep(gradients=gradients, update=make_update(tx, learning_rate))


def _batch_inputs(abstract_batch: Mapping[str, jax.ShapeDtypeStruct],
                  weights: Mapping[str, jax.Array]) -> tuple[dict, dict]:
  return dict(abstract_batch), {k: jax.ShapeDtypeStruct((), jnp.float32) for k in weights}


def compile_step(train_step: Callable, abstract_state: TrainState, state_shardings: TrainState,
                 abstract_batch: Mapping[str, jax.ShapeDtypeStruct],
                 batch_shardings: Mapping[str, jax.sharding.NamedSharding],
                 weights: Mapping[str, jax.Array], replicated: jax.sharding.NamedSharding):
  """Lowers and compiles the whole step of one bucket as one program (what `--mode=summary`
  measures); the state is donated, so its buffers are reused for the new state."""
  jitted = jax.jit(
    train_step, in_shardings=(state_shardings, dict(batch_shardings), replicated),
    out_shardings=(state_shardings, replicated), donate_argnums=0)
  return jitted.lower(abstract_state, *_batch_inputs(abstract_batch, weights)).compile()


def compile_gradients(train_step: TrainStep, abstract_state: TrainState,
                      state_shardings: TrainState,
                      abstract_batch: Mapping[str, jax.ShapeDtypeStruct],
                      batch_shardings: Mapping[str, jax.sharding.NamedSharding],
                      weights: Mapping[str, jax.Array], replicated: jax.sharding.NamedSharding):
  """Lowers and compiles `train_step.gradients` for one bucket; the gradients come out on the
  parameters' shardings, the running statistics replicated."""
  jitted = jax.jit(
    train_step.gradients,
    in_shardings=(state_shardings.params, replicated, replicated, dict(batch_shardings),
                  replicated),
    out_shardings=(state_shardings.params, replicated, replicated))
  return jitted.lower(abstract_state.params, abstract_state.rng, abstract_state.step,
                      *_batch_inputs(abstract_batch, weights)).compile()


def compile_update(update: Callable, abstract_state: TrainState, state_shardings: TrainState,
                   replicated: jax.sharding.NamedSharding):
  """Lowers and compiles the update (`make_update`), the same program for every bucket; the
  state is donated (the new state reuses its buffers, which leaves none for the gradients)."""
  jitted = jax.jit(
    update, in_shardings=(state_shardings, state_shardings.params, replicated, replicated),
    out_shardings=(state_shardings, replicated), donate_argnums=0)
  return jitted.lower(abstract_state, abstract_state.params,
                      jax.ShapeDtypeStruct((), jnp.float32),
                      nnx.filter_state(abstract_state.params, vit.EmbeddingCenter)).compile()
