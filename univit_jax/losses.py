"""UniViT's losses: cluster discrimination against class-centre banks, and structured contrast.

All math runs in float32 and every loss returns `(scalar, metrics)`.

Discrimination (`discrimination_loss`, one call per bank and use)
------------------------------------------------------------------
An embedding e (a clip or image, a temporal segment, or a region) carries the top-k cluster ids
of one bank as positives P (label -1 is padding). Cosines cos_c = <e / |e|, W_c / |W_c|> are taken
against a sampled subset of the bank's K centres W [K, D] ("partial FC", `sample_classes`): all
the classes that are positives anywhere in the global batch, plus random negatives, M classes in
all, M static. Two forms, switched by `config.loss.kind`:

  mlcd          MLCD Eq. 5 (An et al., arXiv 2407.17331), with the scale s = 64 and positive
                margin m = 0.3 that RICE (arXiv 2507.20025, Sec. 4.1) uses with it:
                  L = log(1 + sum_{i in P} exp(-s (cos_i - m)))
                    + log(1 + sum_{j in N'} exp(s cos_j))
                N' = the sampled classes that are not positives of this row (other samples'
                positives included). Averaged over rows.
  cosface_slot  what OneVision-Encoder's code optimises (EvolvingLMMs-Lab/OneVision-Encoder,
                `training/fused_partial_fc_v2_multi_res.py`): each step `num_positive_slots`
                (8) of the k (10) labels are drawn per row; each drawn label is the target of a
                CosFace softmax cross-entropy over the M sampled classes with logits
                s (cos_t - m) for the target and s * (0 if cos_j > 0.75 else cos_j) otherwise
                (non-targets above the filter threshold are likely false negatives and are
                zeroed before scaling; the row's other positives stay in the softmax as
                non-targets, as in that code). Averaged over (row, slot) pairs.

Both are written with logsumexp-stable forms, so gradients stay finite at s = 64.

Structured contrast (`structured_contrastive_loss`)
---------------------------------------------------
Soft-target InfoNCE over the global batch, with targets from the overlap of pseudo-label structure
(`set_jaccard`): for images, the Jaccard overlap of the sets of object clusters of their regions
(co-occurrence, `object_sets`); for clips at granularity g, the Jaccard overlap of their sets of
ordered event transitions (cluster of segment i, cluster of segment i + 1) (`transition_sets`).
Each clip's segment-shuffled copy (`shuffle_segments`) joins the batch as a hard negative of its
original (`clip_targets`). A row with no structural partner falls back to the identity as its
only positive, so it still pushes its negatives away.

Sharding
--------
The functions are written on global arrays; under `jax.jit` GSPMD partitions them from the input
shardings (batch over ("data", "fsdp"), bank classes over ("fsdp", "model")). The class sampling
draws its randomness for the whole bank at once (`jax.random.uniform` is partitionable), so the
sampled set, the loss and the gradients do not depend on the mesh. Pass `logits_sharding`
(the logical axes ("batch", "classes") resolved on the mesh) to split the [N, M] logits over the
class axis too; left to itself GSPMD computes them replicated over "model"
(benchmarks/losses_sharding.py). The bank is never all-gathered: the sampled rows are gathered
shard-locally and summed, an [M, D] collective.
"""

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from univit_jax import config_lib, specs

Metrics = dict[str, jax.Array]
LossOutput = tuple[jax.Array, Metrics]
Schedule = Sequence[tuple[float, Sequence[int]]]

_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Partial FC: class sampling.


class ClassSample(NamedTuple):
  """The classes scored this step for one bank, and where each label landed among them.

  Attributes:
    classes: [M] int32 class ids, ascending; every positive of the batch is among them.
    label_pos: [N, k] int32 position of each label in `classes` (0 where not valid).
    label_valid: [N, k] bool, label >= 0, < K, and its row valid.
    num_positive_classes: [] int32 distinct positives in the batch.
    ignored_labels: [] int32 labels >= K in valid rows (a label-file / bank-size mismatch).
  """
  classes: jax.Array
  label_pos: jax.Array
  label_valid: jax.Array
  num_positive_classes: jax.Array
  ignored_labels: jax.Array


def num_sampled_classes(num_classes: int, num_labels: int, sample_ratio: float) -> int:
  """The static number of sampled classes M = min(K, max(min(n, K), ceil(r K))).

  `num_labels` n (rows x k, padding included) bounds the number of distinct positives, so M
  always has room for all of them; the rest of the M are random negatives. With large global
  batches n exceeds r K (32K rows x 10 labels > 10 % of 1M classes) and M = n: a static shape
  must hold the worst case, which a dynamic-shape PartialFC does not pay for.

  Raises:
    ValueError: for a non-positive K or a ratio outside (0, 1].
  """
  if num_classes <= 0:
    raise ValueError(f"num_classes={num_classes} must be positive")
  if not 0 < sample_ratio <= 1:
    raise ValueError(f"sample_ratio={sample_ratio} must be in (0, 1]")
  # round() first so that e.g. 0.1 * 100 (= 10.000000000000002) gives 10, not 11.
  ratio_count = math.ceil(round(sample_ratio * num_classes, 6))
  return min(num_classes, max(num_labels, ratio_count))


def sample_classes(labels: jax.Array, valid: jax.Array, num_classes: int, sample_ratio: float,
                   rng: jax.Array) -> ClassSample:
  """Partial FC with static shapes: the batch's positives plus uniformly random negatives.

  Every class gets a priority: -1 if it is a positive of a valid row, else uniform [0, 1); the M
  lowest (`num_sampled_classes`) are kept, so all positives survive and the rest is a uniform
  random subset of the other classes (MLCD's random 10 % of negatives; OneVision-Encoder's
  `PartialFC` sample). Labels are remapped to positions in the sorted class list by searchsorted.

  Args:
    labels: [N, k] int cluster ids; -1 is padding.
    valid: [N] bool; rows that are padding contribute no positives.
    num_classes: K, the bank size.
    sample_ratio: r.
    rng: PRNG key (the train step folds the step and bank into it).

  Returns:
    The `ClassSample`.
  """
  labels = labels.astype(jnp.int32)
  m = num_sampled_classes(num_classes, labels.size, sample_ratio)
  in_rows = (labels >= 0) & valid[:, None]
  label_valid = in_rows & (labels < num_classes)
  ids = jnp.where(label_valid, labels, num_classes).reshape(-1)
  is_positive = jnp.zeros((num_classes,), bool).at[ids].set(True, mode="drop")
  priority = jnp.where(is_positive, -1.0, jax.random.uniform(rng, (num_classes,)))
  classes = jnp.sort(jnp.argsort(priority)[:m]).astype(jnp.int32)
  label_pos = jnp.searchsorted(classes, jnp.where(label_valid, labels, 0)).astype(jnp.int32)
  return ClassSample(
    classes=classes,
    label_pos=jnp.where(label_valid, label_pos, 0),
    label_valid=label_valid,
    num_positive_classes=jnp.sum(is_positive, dtype=jnp.int32),
    ignored_labels=jnp.sum(in_rows & ~label_valid, dtype=jnp.int32))


# ---------------------------------------------------------------------------------------------
# Discrimination losses.


def l2_normalize(x: jax.Array) -> jax.Array:
  """L2-normalises the last axis in float32 (a zero vector stays zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _EPS * _EPS))


def _cosines(embeddings: jax.Array, centres: jax.Array, classes: jax.Array,
             sharding: jax.sharding.Sharding | None) -> jax.Array:
  """cos [N, M] between embeddings [N, D] and the sampled centres W[classes], clipped to [-1, 1].

  `sharding`, when given, pins the [N, M] cosines (and so the largest intermediates, the logits,
  and their gradients) to a layout, e.g. rows over ("data", "fsdp") and classes over "model";
  otherwise GSPMD picks one, which can leave the class axis replicated.
  """
  sampled = l2_normalize(jnp.take(centres, classes, axis=0, mode="clip"))
  cos = l2_normalize(embeddings) @ sampled.T
  if sharding is not None:
    cos = jax.lax.with_sharding_constraint(cos, sharding)
  return jnp.clip(cos, -1.0, 1.0)


def _positive_mask(sample: ClassSample) -> jax.Array:
  """[N, M] bool: class m is one of row n's positives (a repeated label counts once)."""
  n, m = sample.label_pos.shape[0], sample.classes.shape[0]
  cols = jnp.where(sample.label_valid, sample.label_pos, m)
  return jnp.zeros((n, m), bool).at[jnp.arange(n)[:, None], cols].set(True, mode="drop")


def _log1p_sum_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
  """log(1 + sum_{mask} exp(x)) over the last axis, stable for large |x| (0 for an empty mask)."""
  x = jnp.where(mask, x, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.maximum(jnp.max(x, axis=-1), 0.0))
  total = jnp.exp(-top) + jnp.sum(jnp.exp(x - top[..., None]), axis=-1)
  return jnp.log(total) + top


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _flatten(embeddings: jax.Array, labels: jax.Array, valid: jax.Array | None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[..., D], [..., k], [...] -> [N, D], [N, k], [N] bool.

  Raises:
    ValueError: if the leading shapes disagree.
  """
  lead = embeddings.shape[:-1]
  if labels.shape[:-1] != lead:
    raise ValueError(
      f"labels {labels.shape} and embeddings {embeddings.shape} differ in leading shape")
  if valid is None:
    valid = jnp.ones(lead, bool)
  elif valid.shape != lead:
    raise ValueError(f"valid {valid.shape} must have the embeddings' leading shape {lead}")
  n = math.prod(lead)
  return (embeddings.reshape(n, embeddings.shape[-1]), labels.reshape(n, labels.shape[-1]),
          valid.reshape(n).astype(bool))


def _check_bank(embeddings: jax.Array, centres: jax.Array) -> None:
  if centres.ndim != 2 or centres.shape[1] != embeddings.shape[-1]:
    raise ValueError(
      f"bank centres {centres.shape} must be [K, D] with D = the embedding width "
      f"{embeddings.shape[-1]}")


def _common_metrics(cos: jax.Array, positive: jax.Array, row_valid: jax.Array,
                    sample: ClassSample) -> Metrics:
  pos = positive & row_valid[:, None]
  neg = ~positive & row_valid[:, None]
  return dict(
    positive_cos=_masked_mean(cos, pos),
    negative_cos=_masked_mean(cos, neg),
    num_positive_classes=sample.num_positive_classes.astype(jnp.float32),
    num_sampled_classes=jnp.float32(sample.classes.shape[0]),
    ignored_labels=sample.ignored_labels.astype(jnp.float32),
    valid_rows=jnp.sum(row_valid).astype(jnp.float32))


def mlcd_loss(embeddings: jax.Array, labels: jax.Array, valid: jax.Array | None,
              centres: jax.Array, rng: jax.Array, *, scale: float = 64.0, margin: float = 0.3,
              sample_ratio: float = 0.1,
              logits_sharding: jax.sharding.Sharding | None = None) -> LossOutput:
  """MLCD Eq. 5 with a positive margin (RICE), over partial-FC sampled negatives.

    L_n = log(1 + sum_{i in P_n} exp(-s (cos_ni - m))) + log(1 + sum_{j in N'_n} exp(s cos_nj))

  P_n = the distinct valid labels of row n, N'_n = the sampled classes not in P_n. The loss is
  the mean of L_n over valid rows that have at least one valid label.

  Args:
    embeddings: [..., D] any dtype (cast to float32).
    labels: [..., k] int cluster ids of this bank, -1 = padding.
    valid: [...] bool or None (all valid).
    centres: [K, D] the bank.
    rng: PRNG key for the negative sampling.
    scale: s. margin: m. sample_ratio: r.
    logits_sharding: optional layout of the [N, M] logits, N = the flattened rows (the train
      step passes the logical axes ("batch", "classes") resolved on its mesh).

  Returns:
    (loss, metrics): loss, positive_loss, negative_loss, positive_cos, negative_cos,
    num_positive_classes, num_sampled_classes, ignored_labels, valid_rows.
  """
  _check_bank(embeddings, centres)
  emb, labels, valid = _flatten(embeddings, labels, valid)
  sample = sample_classes(labels, valid, centres.shape[0], sample_ratio, rng)
  cos = _cosines(emb, centres, sample.classes, logits_sharding)
  positive = _positive_mask(sample)
  row_valid = valid & jnp.any(sample.label_valid, axis=-1)
  positive_loss = _log1p_sum_exp(-scale * (cos - margin), positive)
  negative_loss = _log1p_sum_exp(scale * cos, ~positive)
  loss = _masked_mean(positive_loss + negative_loss, row_valid)
  metrics = dict(loss=loss, positive_loss=_masked_mean(positive_loss, row_valid),
                 negative_loss=_masked_mean(negative_loss, row_valid),
                 **_common_metrics(cos, positive, row_valid, sample))
  return loss, metrics


def choose_slots(label_valid: jax.Array, num_slots: int, rng: jax.Array) -> jax.Array:
  """Indices [N, S] of S label slots drawn uniformly without replacement per row, valid first.

  Rows with fewer than S valid labels get all of them, then padding slots.
  """
  priority = jax.random.uniform(rng, label_valid.shape) + jnp.where(label_valid, 0.0, 2.0)
  return jnp.argsort(priority, axis=-1)[:, :num_slots]


def cosface_slot_loss(embeddings: jax.Array, labels: jax.Array, valid: jax.Array | None,
                      centres: jax.Array, rng: jax.Array, *, scale: float = 64.0,
                      margin: float = 0.3, sample_ratio: float = 0.1, num_slots: int = 8,
                      filter_threshold: float = 0.75,
                      logits_sharding: jax.sharding.Sharding | None = None) -> LossOutput:
  """OneVision-Encoder's form: CosFace softmax cross-entropy per sampled label slot.

  For each row n and each of S slots drawn from its k labels (target t):
    z_j = cos_nt - m                if j = t
        = 0                         if j != t and cos_nj > filter_threshold
        = cos_nj                    otherwise
    CE_ns = logsumexp_j(s z_j) - s z_t
  The loss is the mean of CE over valid (row, slot) pairs (equal to the code's mean over slots
  of per-slot batch means when every row has S valid labels).

  Args: as `mlcd_loss`, plus num_slots (S <= k) and filter_threshold.

  Returns:
    (loss, metrics): loss, positive_cos, negative_cos, num_positive_classes, num_sampled_classes,
    ignored_labels, valid_rows.

  Raises:
    ValueError: if S exceeds the number of labels k.
  """
  _check_bank(embeddings, centres)
  if not 1 <= num_slots <= labels.shape[-1]:
    raise ValueError(
      f"num_positive_slots={num_slots} must be in [1, k] with k = {labels.shape[-1]} labels")
  sample_rng, slot_rng = jax.random.split(rng)
  emb, labels, valid = _flatten(embeddings, labels, valid)
  sample = sample_classes(labels, valid, centres.shape[0], sample_ratio, sample_rng)
  cos = _cosines(emb, centres, sample.classes, logits_sharding)
  slots = choose_slots(sample.label_valid, num_slots, slot_rng)
  slot_pos = jnp.take_along_axis(sample.label_pos, slots, axis=1)
  slot_valid = jnp.take_along_axis(sample.label_valid, slots, axis=1)
  others = jnp.where(cos > filter_threshold, 0.0, cos)
  columns = jnp.arange(cos.shape[1])
  target_logit = scale * (jnp.take_along_axis(cos, slot_pos, axis=1) - margin)
  per_slot = []
  for s in range(num_slots):
    is_target = columns[None, :] == slot_pos[:, s:s + 1]
    logits = scale * jnp.where(is_target, cos - margin, others)
    per_slot.append(jax.nn.logsumexp(logits, axis=-1) - target_logit[:, s])
  loss = _masked_mean(jnp.stack(per_slot, axis=1), slot_valid)
  row_valid = valid & jnp.any(sample.label_valid, axis=-1)
  metrics = dict(loss=loss, **_common_metrics(cos, _positive_mask(sample), row_valid, sample))
  return loss, metrics


def center_rows(embeddings: jax.Array, valid: jax.Array | None) -> jax.Array:
  """Subtracts the mean of the valid rows: `[..., D]` -> `[..., D]` float32.

  The mean runs over every leading axis (the global batch, and segments or regions), weighted by
  `valid [...]` (None: all rows); gradients flow through it, so the parameters that only move the
  component every row shares get no gradient from a loss on the result. Invalid rows are shifted
  too (the loss ignores them). With no valid row nothing is subtracted.
  """
  x = embeddings.astype(jnp.float32)
  weight = (jnp.ones(x.shape[:-1], jnp.float32) if valid is None
            else valid.astype(jnp.float32))[..., None]
  axes = tuple(range(x.ndim - 1))
  mean = jnp.sum(x * weight, axis=axes) / jnp.maximum(jnp.sum(weight), 1.0)
  return x - mean


def discrimination_loss(embeddings: jax.Array, labels: jax.Array, valid: jax.Array | None,
                        centres: jax.Array, rng: jax.Array,
                        config: config_lib.DiscriminationConfig,
                        logits_sharding: jax.sharding.Sharding | None = None) -> LossOutput:
  """One bank's discrimination loss in the configured form (`config.kind`).

  The one entry point for the three uses: clip / image embeddings [B, D] with their labels
  [B, k]; segment embeddings [B, g, D] with per-segment labels [B, g, k]; region embeddings
  [B, R, D] with region labels [B, R, k] and a region mask [B, R]. With
  `config.center_embeddings` the embeddings are centred over their valid rows first
  (`center_rows`).

  Raises:
    ValueError: for an unknown kind or inconsistent shapes.
  """
  common = dict(scale=config.scale, margin=config.margin, sample_ratio=config.sample_ratio,
                logits_sharding=logits_sharding)
  if config.center_embeddings:
    embeddings = center_rows(embeddings, valid)
  if config.kind == "mlcd":
    return mlcd_loss(embeddings, labels, valid, centres, rng, **common)
  if config.kind == "cosface_slot":
    return cosface_slot_loss(
      embeddings, labels, valid, centres, rng, num_slots=config.num_positive_slots,
      filter_threshold=config.filter_threshold, **common)
  raise ValueError(f"loss kind {config.kind!r}: expected one of {config_lib.LOSS_KINDS}")


# ---------------------------------------------------------------------------------------------
# Structured contrast.


def set_jaccard(ids: jax.Array, valid: jax.Array) -> jax.Array:
  """Jaccard overlap |A n B| / |A u B| of every pair of rows' sets of id tuples.

  Args:
    ids: [B, S, W] int; row b's set is {ids[b, s] : valid[b, s]} (tuples of width W; repeats
      within a row count once).
    valid: [B, S] bool.

  Returns:
    [B, B] float32 in [0, 1]; 1 for identical non-empty sets, 0 when either set is empty.

  Cost: B^2 S^2 tuple comparisons; XLA fuses the compare into the reduction, so memory is
  O(B^2) like the contrastive logits themselves.
  """
  s = ids.shape[1]
  same_in_row = jnp.all(ids[:, :, None, :] == ids[:, None, :, :], axis=-1)  # [B, S, S]
  earlier = jnp.tril(jnp.ones((s, s), bool), k=-1)  # [s, t]: t < s
  repeated = jnp.any(same_in_row & earlier[None] & valid[:, None, :], axis=2)
  keep = valid & ~repeated
  size = jnp.sum(keep, axis=1).astype(jnp.float32)
  equal = jnp.all(ids[:, None, :, None, :] == ids[None, :, None, :, :], axis=-1)  # [B, B, S, S]
  both = keep[:, None, :, None] & keep[None, :, None, :]
  inter = jnp.sum(equal & both, axis=(2, 3)).astype(jnp.float32)
  union = size[:, None] + size[None, :] - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)


def object_sets(region_labels: jax.Array, region_valid: jax.Array, image_labels: jax.Array,
                image_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """An image's set of object clusters: the top-1 cluster of each valid region, or, for an image
  without any (a single item from a source without boxes, batched with images that have them),
  its whole-image top-1 cluster, which indexes the same object bank.

  Without the fallback such an image has an empty set, hence no partner, and the contrastive
  term never relates two images of the same item cluster.

  Args:
    region_labels: [B, R, k] object-bank ids per region (top-k, nearest first), -1 = padding.
    region_valid: [B, R] bool.
    image_labels: [B, k] object-bank ids of the whole image, -1 = padding.
    image_valid: [B] bool, True where `image_labels` index the object bank.

  Returns:
    (ids [B, R, 1], valid [B, R]) for `set_jaccard`.
  """
  top1, image_top1 = jnp.asarray(region_labels)[..., 0], jnp.asarray(image_labels)[:, 0]
  valid = jnp.asarray(region_valid) & (top1 >= 0)
  fallback = ~valid.any(axis=1) & jnp.asarray(image_valid) & (image_top1 >= 0)
  top1 = top1.at[:, 0].set(jnp.where(fallback, image_top1, top1[:, 0]))
  valid = valid.at[:, 0].set(valid[:, 0] | fallback)
  return top1[..., None], valid


def transition_sets(segment_clusters: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A clip's set of ordered event transitions (c_i, c_{i+1}), i < g - 1.

  Args:
    segment_clusters: [B, g] int, the top-1 event cluster of each segment in temporal order,
      -1 for a segment without a label.

  Returns:
    (ids [B, g - 1, 2], valid [B, g - 1]) for `set_jaccard`.

  Raises:
    ValueError: if g < 2 (a single segment has no order).
  """
  g = segment_clusters.shape[1]
  if g < 2:
    raise ValueError(f"transitions need at least 2 segments per clip, got g={g}")
  pairs = jnp.stack([segment_clusters[:, :-1], segment_clusters[:, 1:]], axis=-1)
  return pairs, jnp.all(pairs >= 0, axis=-1)


def shuffle_segments(segment_clusters: jax.Array, rng: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """A segment permutation per clip whose cluster order differs from the original when it can.

  A uniformly random permutation is drawn; if it leaves the cluster sequence unchanged (e.g.
  swapping two segments of the same cluster), the rotation by one segment is used instead,
  which changes every sequence that is not constant.

  Args:
    segment_clusters: [B, g] int, as for `transition_sets`.
    rng: PRNG key (the train step folds the step into it).

  Returns:
    perm [B, g] int32: the shuffled copy's segment i is the original's segment perm[b, i];
    order_matters [B] bool: the clip has at least 2 distinct segment clusters, so its shuffled
    copy is a different event sequence.
  """
  b, g = segment_clusters.shape
  perm = jnp.argsort(jax.random.uniform(rng, (b, g)), axis=1).astype(jnp.int32)
  unchanged = jnp.all(jnp.take_along_axis(segment_clusters, perm, axis=1) == segment_clusters,
                      axis=1)
  rotation = jnp.roll(jnp.arange(g, dtype=jnp.int32), -1)
  perm = jnp.where(unchanged[:, None], rotation[None, :], perm)
  order_matters = jnp.any(segment_clusters != segment_clusters[:, :1], axis=1)
  return perm, order_matters


def clip_targets(segment_clusters: jax.Array, perm: jax.Array, order_matters: jax.Array
                 ) -> jax.Array:
  """Targets [2B, 2B] for the batch [originals; shuffled copies] of clips.

  Pair weights are the Jaccard overlap of ordered transition sets; a clip and its own shuffled
  copy get weight 0 when the order matters (even when a shuffle happens to keep the transition
  set, as [a, b, a, b] -> [b, a, b, a]), since the copy shows the same events in another order.

  Args:
    segment_clusters: [B, g] int, the originals' segment clusters.
    perm: [B, g] from `shuffle_segments`.
    order_matters: [B] bool from `shuffle_segments`.
  """
  b = segment_clusters.shape[0]
  shuffled = jnp.take_along_axis(segment_clusters, perm, axis=1)
  targets = set_jaccard(*transition_sets(jnp.concatenate([segment_clusters, shuffled])))
  own_copy = jnp.zeros((2 * b, 2 * b), bool)
  idx = jnp.arange(b)
  own_copy = own_copy.at[idx, idx + b].set(order_matters).at[idx + b, idx].set(order_matters)
  return jnp.where(own_copy, 0.0, targets)


def structured_contrastive_loss(embeddings: jax.Array, targets: jax.Array,
                                valid: jax.Array | None, temperature: float = 0.1
                                ) -> LossOutput:
  """Soft-target InfoNCE over the global batch.

  With z_ab = cos(e_a, e_b) / tau and weights w_ab = targets[a, b] >= 0 (a != b, both valid):
    rows with a partner (sum_b w_ab > 0):  L_a = -sum_{b != a} p_ab log softmax_{b' != a}(z_ab'),
                                           p_ab = w_ab / sum_b' w_ab'
    rows without one:                      L_a = -log softmax_{b'}(z_ab')[a] with z_aa = 1 / tau,
                                           i.e. log(1 + sum_{b != a} exp((cos_ab - 1) / tau))
  The fallback keeps the identity as the only positive (there is no second view), so a row with
  no structural partner is still pushed away from its negatives, its own shuffled copy included,
  instead of dropping out. The loss is the mean of L_a over valid rows.

  Args:
    embeddings: [B, D] (the global batch; cast to float32).
    targets: [B, B] non-negative pair weights, e.g. from `set_jaccard` or `clip_targets`; the
      diagonal is ignored.
    valid: [B] bool or None.
    temperature: tau.

  Returns:
    (loss, metrics): loss, no_partner_fraction (valid rows on the fallback), target_cos (the
    target-weighted mean cosine of partner pairs).
  """
  b = embeddings.shape[0]
  if targets.shape != (b, b):
    raise ValueError(f"targets {targets.shape} must be [B, B] with B = {b}")
  valid = jnp.ones((b,), bool) if valid is None else valid.astype(bool)
  e = l2_normalize(embeddings)
  cos = e @ e.T
  eye = jnp.eye(b, dtype=bool)
  pair = valid[:, None] & valid[None, :] & ~eye
  weights = jnp.where(pair, jnp.maximum(targets.astype(jnp.float32), 0.0), 0.0)
  total = jnp.sum(weights, axis=1)
  has_partner = total > 0
  candidates = pair | (eye & ~has_partner[:, None])
  z = jnp.where(eye, 1.0, cos) / temperature
  log_q = z - jax.nn.logsumexp(jnp.where(candidates, z, -jnp.inf), axis=1, keepdims=True)
  p = jnp.where(has_partner[:, None], weights / jnp.maximum(total, _EPS)[:, None],
                eye.astype(jnp.float32))
  per_row = -jnp.sum(jnp.where(candidates, p * log_q, 0.0), axis=1)
  loss = _masked_mean(per_row, valid)
  metrics = dict(
    loss=loss,
    no_partner_fraction=_masked_mean((~has_partner).astype(jnp.float32), valid),
    target_cos=jnp.sum(weights * cos) / jnp.maximum(jnp.sum(weights), _EPS))
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# Curriculum and combination.


def active_granularities(progress: float, schedule: Schedule) -> tuple[int, ...]:
  """The event granularities trained at `progress` (fraction of training done, >= 0).

  `schedule` is ((start, granularities), ...) with increasing starts, the first 0.0; the last
  entry whose start <= progress applies, e.g. coarse to fine:
  ((0.0, (1,)), (0.25, (1, 2)), (0.5, (1, 2, 4)), (0.75, (1, 2, 4, 8))).

  Raises:
    ValueError: for a negative progress or a schedule that does not start at 0.
  """
  if not schedule or schedule[0][0] != 0.0:
    raise ValueError(f"event schedule {schedule} must start with an entry at progress 0.0")
  if progress < 0:
    raise ValueError(f"training progress {progress} must be >= 0")
  active = schedule[0][1]
  for start, granularities in schedule:
    if progress >= start:
      active = granularities
  return tuple(active)


def loss_weights(config: config_lib.LossConfig, progress: float) -> dict[str, float]:
  """Weight of every loss term at `progress`: each bank of `config.bank_weights` (event banks of
  granularities the schedule has not switched on yet at 0) and "contrastive"."""
  active = set(active_granularities(progress, config.event_schedule))
  weights = {}
  for name, weight in config.bank_weights:
    granularity = specs.event_granularity(name)
    weights[name] = weight if granularity is None or granularity in active else 0.0
  weights["contrastive"] = config.contrastive_weight
  return weights


def combine_losses(terms: Mapping[str, LossOutput],
                   weights: Mapping[str, float | jax.Array]) -> LossOutput:
  """Total = sum_name weights[name] * loss_name; metrics flattened as "name/metric".

  Raises:
    ValueError: for a term without a weight.
  """
  missing = sorted(set(terms) - set(weights))
  if missing:
    raise ValueError(f"loss terms {missing} have no weight; weights are {sorted(weights)}")
  total = jnp.float32(0.0)
  metrics: Metrics = {}
  for name, (loss, term_metrics) in terms.items():
    weight = jnp.asarray(weights[name], jnp.float32)
    total = total + weight * loss
    metrics[f"{name}/weight"] = weight
    metrics.update({f"{name}/{key}": value for key, value in term_metrics.items()})
  metrics["loss"] = total
  return total, metrics
