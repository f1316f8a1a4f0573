"""Attentive probe: a learned query pools frozen tokens (the encoder's `MapHead`), then a linear
layer classifies the pooled vector.

The learning rate is chosen on a validation split carved from the training split (each candidate
trained for the same fixed number of epochs and scored at its last epoch); the chosen rate is
then retrained on the whole training split, and its last epoch is scored on the test split, which
is loaded once, at the end.

All runs share one compiled train step (per probe shape): the learning rate and weight decay are
arguments, the batch shape is fixed (a short last batch is padded with zero-weight examples).
Every run starts from the same seeded initial parameters and visits the data in the same seeded
order, so candidates differ only in their learning rate.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from univit_jax import config_lib
from univit_jax.evaluation import common, metrics
from univit_jax.models import vit


def map_head_config(dim: int) -> config_lib.ModelConfig:
  """The `MapHead` of the probe over `dim`-wide tokens.

  Heads of 64 channels as in the encoder's variants when `dim` is a multiple of 64, else a single
  head; the usual 4x MLP. Depth and patch size are required by `ModelConfig` but unused by the
  head.
  """
  num_heads = dim // 64 if dim % 64 == 0 else 1
  return config_lib.ModelConfig(
    width=dim, depth=0, num_heads=num_heads, mlp_dim=4 * dim, patch_size=1)


class AttentiveClassifier(nnx.Module):
  """`MapHead` pooling of the valid tokens, then a linear map (no norm) to class logits."""

  def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs):
    self.pool = vit.MapHead(map_head_config(dim), rngs=rngs)
    # Zero-initialised, so every run starts from uniform predictions.
    self.classifier = nnx.Linear(
      dim, num_classes, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
    """Logits `[B, C]` of `tokens [B, L, D]`, attending only where `token_mask [B, L]`."""
    pooled = self.pool(tokens, token_mask[:, None, :])[:, 0]
    return self.classifier(pooled)


def _optimizer(weight_decay: float | jax.Array) -> optax.GradientTransformation:
  """Adam with decoupled decay of the matrices; the caller scales the update by -lr."""
  return optax.chain(
    optax.scale_by_adam(),
    optax.add_decayed_weights(weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))


def _loss(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array],
          multilabel: bool) -> jax.Array:
  logits = nnx.merge(graphdef, params)(batch["tokens"], batch["token_mask"])
  if multilabel:
    losses = optax.sigmoid_binary_cross_entropy(logits, batch["targets"]).mean(-1)
  else:
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(losses * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


# Module-level and keyed on the (hashable) graph, so probes of the same shape share compilations.
@functools.partial(jax.jit, static_argnames=("graphdef", "multilabel"))
def _train_step(params: nnx.State, opt_state: optax.OptState, batch: dict[str, jax.Array],
                lr: jax.Array, weight_decay: jax.Array, *, graphdef: nnx.GraphDef,
                multilabel: bool) -> tuple[nnx.State, optax.OptState, jax.Array]:
  """One AdamW step on `batch` (tokens `[B, L, D]`, token_mask `[B, L]`, targets `[B]` or
  `[B, C]`, weights `[B]`, 0 for padding); returns the new parameters, state and mean loss."""
  loss, grads = jax.value_and_grad(_loss, argnums=1)(graphdef, params, batch, multilabel)
  updates, opt_state = _optimizer(weight_decay).update(grads, opt_state, params)
  params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
  return params, opt_state, loss


@functools.partial(jax.jit, static_argnames="graphdef")
def _logits(params: nnx.State, tokens: jax.Array, token_mask: jax.Array, *,
            graphdef: nnx.GraphDef) -> jax.Array:
  return nnx.merge(graphdef, params)(tokens, token_mask)


def attentive_probe(
    train: common.Split, test: common.TestLoader, *, multilabel: bool = False,
    num_classes: int | None = None, epochs: int = 10, batch_size: int = 128,
    lr_grid: Sequence[float] = (1e-3, 3e-3), weight_decay: float = 1e-4,
    val_fraction: float = 0.2, seed: int = 0) -> common.ProbeResult:
  """Trains an attentive probe on frozen tokens and scores it on the test split.

  Args:
    train: `x [N, L, D]` tokens; `y` int `[N]` class ids, or `{0, 1}` `[N, C]` when
      `multilabel`; optional `extra["token_mask"]` bool `[N, L]` (True = a real token; all True
      when absent).
    test: loads the test split (same layout); called once, after the final model is fitted.
    multilabel: sigmoid cross-entropy and mean ROC AUC instead of softmax cross-entropy and
      accuracy.
    num_classes: C; by default the largest training class id + 1 (or `y.shape[1]`).
    epochs: passes over the data of every run (candidates and the final one).
    batch_size: examples per step (at most N).
    lr_grid: peak learning rates to choose from (AdamW, cosine decay to 0).
    weight_decay: AdamW decoupled weight decay of the matrices (biases and norms are not decayed).
    val_fraction: share of `train` held out to choose the learning rate.
    seed: of the validation carve-out, the initial parameters and the batch order.

  Returns:
    "accuracy" or "mean_auc" on the test split; `selected` {"lr"}; `curves` with "train_loss"
    (per-epoch mean of the final run) and "val_vs_lr" ([[lr, val], ...]); for multiclass,
    `details` with "majority" (the majority-class rate on test) and "confusion" ([C, C] nested
    lists, rows = true class); a constant score has AUC 0.5 for multilabel.

  Raises:
    ValueError: for inconsistent shapes, or an example without any valid token.
  """
  if train.x.ndim != 3:
    raise ValueError(f"attentive_probe: x must be tokens [N, L, D], got {train.x.shape}")
  if "token_mask" in train.extra and not train.extra["token_mask"].any(-1).all():
    raise ValueError("attentive_probe: some training example has no valid token")
  if multilabel:
    if train.y.ndim != 2 or (num_classes is not None and num_classes != train.y.shape[1]):
      raise ValueError(
        f"attentive_probe: multilabel y must be [N, num_classes], got {train.y.shape}")
    num_classes = train.y.shape[1]
  elif num_classes is None:
    num_classes = int(train.y.max()) + 1
  metric = "mean_auc" if multilabel else "accuracy"
  dim = train.x.shape[-1]
  batch_size = min(batch_size, len(train))

  with nnx.use_eager_sharding(False):
    graphdef, init_params = nnx.split(AttentiveClassifier(dim, num_classes, rngs=nnx.Rngs(seed)))

  def inputs(split: common.Split, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tokens = split.x[index].astype(np.float32)
    if "token_mask" in split.extra:
      return tokens, split.extra["token_mask"][index].astype(bool)
    return tokens, np.ones(tokens.shape[:2], bool)

  def fit(split: common.Split, peak_lr: float) -> tuple[nnx.State, list[float]]:
    targets = split.y.astype(np.float32 if multilabel else np.int32)
    steps_per_epoch = -(-len(split) // batch_size)
    lrs = common.cosine_schedule(peak_lr, epochs * steps_per_epoch).astype(np.float32)
    params, opt_state = init_params, _optimizer(weight_decay).init(init_params)
    rng = np.random.default_rng(seed)
    epoch_losses = []
    for epoch in range(epochs):
      total = 0.0
      for i, (index, valid) in enumerate(common.epoch_batches(len(split), batch_size, rng)):
        tokens, token_mask = inputs(split, index)
        batch = {"tokens": tokens, "token_mask": token_mask, "targets": targets[index],
                 "weights": valid.astype(np.float32)}
        params, opt_state, loss = _train_step(
          params, opt_state, batch, lrs[epoch * steps_per_epoch + i], np.float32(weight_decay),
          graphdef=graphdef, multilabel=multilabel)
        total += float(loss) * int(valid.sum())
      epoch_losses.append(total / len(split))
    return params, epoch_losses

  def predict(params: nnx.State, split: common.Split) -> np.ndarray:
    """Logits `[N, C]` of `split`."""
    out = []
    for start in range(0, len(split), batch_size):
      index = np.arange(start, min(start + batch_size, len(split)))
      padded = np.pad(index, (0, batch_size - len(index)))
      logits = _logits(params, *inputs(split, padded), graphdef=graphdef)
      out.append(np.asarray(logits)[:len(index)])
    return np.concatenate(out)

  def score(labels: np.ndarray, logits: np.ndarray) -> float:
    if multilabel:
      return metrics.mean_auc(labels, logits)
    return metrics.accuracy(labels, logits.argmax(-1))

  fit_split, val_split = common.carve_validation(train, val_fraction, seed)
  val_vs_lr = []
  for lr in lr_grid:
    params, _ = fit(fit_split, lr)
    val_vs_lr.append([float(lr), score(val_split.y, predict(params, val_split))])
  best_lr, best_val = max(val_vs_lr, key=lambda pair: pair[1])
  params, train_loss = fit(train, best_lr)

  test_split = test()
  logits = predict(params, test_split)
  if multilabel:
    details = {}
  else:
    details = {
      "majority": metrics.majority_rate(train.y, test_split.y),
      "confusion": metrics.confusion_matrix(
        test_split.y, logits.argmax(-1), num_classes).tolist(),
    }
  return common.ProbeResult(
    metric=metric, value=score(test_split.y, logits), selected={"lr": best_lr},
    val_value=best_val, curves={"train_loss": train_loss, "val_vs_lr": val_vs_lr},
    details=details)
