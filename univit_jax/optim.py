"""The optimiser: AdamW with warm-up then a closed-form decay, and gradient clipping.

The schedule is a pure function of the step, so a resumed run follows exactly the same curve
(unlike recursive PyTorch schedulers, see reference/method-notes.md §2.6). Norm scales, biases and
other vectors are not weight-decayed; the class-centre banks have their own decay and lr scale.
"""

import jax
import optax

from univit_jax import config_lib
from univit_jax.models import heads

SCHEDULES = ("cosine", "linear", "constant")
# The `OptimConfig` fields `learning_rate` reads (with total_steps): the learning-rate schedule.
SCHEDULE_FIELDS = ("lr", "schedule", "warmup_steps", "end_lr_fraction")


def learning_rate(optim: config_lib.OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up over `optim.warmup_steps`, then `optim.schedule` decay to
  `optim.lr * optim.end_lr_fraction` at `total_steps`.

  Raises:
    config_lib.ConfigError: naming `optim.schedule` when it is unknown.
  """
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  end = optim.lr * optim.end_lr_fraction
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_fraction)
  elif optim.schedule == "linear":
    decay = optax.linear_schedule(optim.lr, end, decay_steps)
  elif optim.schedule == "constant":
    decay = optax.constant_schedule(optim.lr)
  else:
    raise config_lib.ConfigError(
      f"optim.schedule={optim.schedule!r}: expected one of {SCHEDULES}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def _bank_mask(tree):
  return jax.tree_util.tree_map_with_path(lambda path, _: heads.is_bank_param(path), tree)


def _encoder_decay_mask(tree):
  # Matrices of the encoder only; norm scales and biases are not decayed, banks have their own.
  return jax.tree_util.tree_map_with_path(
    lambda path, x: x.ndim >= 2 and not heads.is_bank_param(path), tree)


def _scale_banks(factor: float) -> optax.GradientTransformation:
  """Multiplies the bank parameters' updates by `factor` (their learning-rate multiplier)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
      lambda path, u: u * factor if heads.is_bank_param(path) else u, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim: config_lib.OptimConfig, total_steps: int
                   ) -> optax.GradientTransformation:
  """AdamW over the encoder and its class-centre banks, from the `optim` section.

  One global-norm clip (when `grad_clip_norm` > 0), one schedule, and the banks' own weight
  decay (`bank_weight_decay`) and lr multiplier (`bank_lr_scale`). Written as one chain, not
  `optax.multi_transform`, so every optimiser-state leaf has the structure of the parameters and
  inherits their sharding. Parameters without banks (the bare encoder) work the same.
  """
  parts = []
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  parts += [
    optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
    optax.add_decayed_weights(optim.weight_decay, mask=_encoder_decay_mask),
    optax.add_decayed_weights(optim.bank_weight_decay, mask=_bank_mask),
    optax.scale_by_learning_rate(learning_rate(optim, total_steps)),
  ]
  if optim.bank_lr_scale != 1.0:
    parts.append(_scale_banks(float(optim.bank_lr_scale)))
  return optax.chain(*parts)
