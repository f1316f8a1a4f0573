"""The optimiser: AdamW with warm-up then a closed-form decay, and gradient clipping.

The schedule is a pure function of the step, so a resumed run follows exactly the same curve
(unlike recursive PyTorch schedulers, see reference/method-notes.md §2.6). Norm scales, biases and
other vectors are not weight-decayed.
"""

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up over `optim.warmup_steps`, then `optim.schedule` decay to
  `optim.lr * optim.end_lr_fraction` at `total_steps`.

  Raises:
    ValueError: naming `optim.schedule` when it is unknown.
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
    raise ValueError(f"optim.schedule={optim.schedule!r}: expected one of {SCHEDULES}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def decay_mask(params):
  """Weight decay on matrices only (ndim >= 2), not on norm scales or biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
  """AdamW from `config.optim`, with global-norm clipping when `grad_clip_norm` > 0."""
  adamw = optax.adamw(
    learning_rate(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
    weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
  return adamw
