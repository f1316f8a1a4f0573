"""Linear probe: L2-regularised logistic regression on frozen features, fitted full-batch by L-BFGS.

Multiclass targets (int `[N]`) get a multinomial (softmax) model, multilabel targets (`{0, 1}`
`[N, C]`) an independent sigmoid per class. The objective is the mean over examples of the
cross-entropy (summed over classes for multilabel, so each class is its own binary problem) plus
`l2 / 2 * ||W||^2`; the bias is not regularised. Features are standardised with the mean and
standard deviation of the examples being fitted. With this scaling, scikit-learn's
`LogisticRegression(C=1 / (l2 * n_fit))` on the same standardised features minimises the same
objective.

The L2 strength is chosen from a grid on a validation part carved from the training split; the
model is then refitted on the whole training split and scored on the test split, which is read
once, at the end. The grid and the refit share one compiled solver: every fit runs on the whole
training split with per-example weights (0 on the validation part), and `l2` is a traced argument.
"""

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from univit_jax.evaluation import common
from univit_jax.evaluation import metrics

_CONSTANT = 1e-5  # relative spread below which a feature counts as constant
_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("multilabel", "num_classes"))
def _solve(x: jax.Array, y: jax.Array, weights: jax.Array, l2: jax.Array, max_iter: jax.Array,
           tol: jax.Array, *, multilabel: bool, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Minimises the weighted, standardised logistic objective; returns raw-feature parameters.

  Args:
    x: `[N, D]` float32 features.
    y: int32 `[N]` class ids, or float32 `{0, 1}` `[N, C]` when `multilabel`.
    weights: `[N]` non-negative example weights (0 leaves an example out, also of the
      standardisation statistics).
    l2: scalar L2 strength on the weights of the standardised features.
    max_iter: scalar cap on L-BFGS iterations.
    tol: scalar; iteration stops once the gradient's L2 norm falls below it.
    multilabel: sigmoid per class instead of softmax.
    num_classes: C, the number of outputs.

  Returns:
    `(w [D, C], b [C])`, acting on unstandardised features.
  """
  total = jnp.sum(weights)
  mean = jnp.sum(weights[:, None] * x, 0) / total
  std = jnp.sqrt(jnp.sum(weights[:, None] * jnp.square(x - mean), 0) / total)
  # A feature that varies only at float32 rounding level (e.g. a time average of the same frames
  # summed in another order) is constant: standardising it would turn rounding into signal.
  scale = jnp.where(std > _CONSTANT * jnp.abs(mean), std, 1.0)
  z = (x - mean) / scale

  def objective(params):
    w, b = params
    logits = jnp.dot(z, w, precision=_HIGHEST) + b
    if multilabel:
      losses = optax.sigmoid_binary_cross_entropy(logits, y).sum(-1)
    else:
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(weights * losses) / total + 0.5 * l2 * jnp.sum(jnp.square(w))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  params = (jnp.zeros((x.shape[1], num_classes), jnp.float32),
            jnp.zeros((num_classes,), jnp.float32))
  (w, b), _ = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
  w = w / scale[:, None]
  return w, b - jnp.dot(mean, w, precision=_HIGHEST)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, *, multilabel: bool = False,
                 num_classes: int | None = None, max_iter: int = 200,
                 weights: np.ndarray | None = None,
                 tol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
  """Fits L2-regularised logistic regression on standardised features by L-BFGS (float32).

  Compiles once per (shape, `multilabel`, `num_classes`); `l2`, `max_iter`, `tol` and `weights`
  are traced, so a grid of `l2` values reuses one compiled solver.

  Args:
    x: `[N, D]` features.
    y: int `[N]` class ids in `[0, num_classes)`, or `{0, 1}` `[N, C]` when `multilabel`.
    l2: L2 strength on the weights of the standardised features (the objective's data term is a
      mean over examples).
    multilabel: independent sigmoid per class instead of a softmax.
    num_classes: C for multiclass targets (default: largest label + 1); ignored for multilabel.
    max_iter: cap on L-BFGS iterations.
    weights: optional `[N]` non-negative example weights; 0 leaves an example out of both the
      fit and the standardisation statistics.
    tol: stop once the gradient's L2 norm is below this.

  Returns:
    `(w [D, C], b [C])` float32 NumPy arrays acting on the raw (unstandardised) features:
    scores are `x @ w + b` (see `predict_scores`).

  Raises:
    ValueError: if a multiclass label lies outside `[0, num_classes)`.
  """
  x = np.asarray(x, np.float32)
  if multilabel:
    y = np.asarray(y, np.float32)
    num_classes = y.shape[1]
  else:
    y = np.asarray(y, np.int32)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    if y.min() < 0 or y.max() >= num_classes:
      raise ValueError(f"fit_logistic: labels span [{y.min()}, {y.max()}], not within "
                       f"[0, {num_classes})")
  weights = np.ones(len(x), np.float32) if weights is None else np.asarray(weights, np.float32)
  w, b = _solve(x, y, weights, np.float32(l2), np.int32(max_iter), np.float32(tol),
                multilabel=multilabel, num_classes=num_classes)
  return np.asarray(w), np.asarray(b)


def predict_scores(params: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
  """Logits `[N, C]` of features `x [N, D]` under `params = (w [D, C], b [C])`."""
  w, b = params
  return np.asarray(x, np.float32) @ w + b


def _score(y: np.ndarray, scores: np.ndarray, multilabel: bool) -> float:
  if multilabel:
    return metrics.mean_auc(y, scores)
  return metrics.accuracy(y, scores.argmax(-1))


def linear_probe(train: common.Split, test: common.TestLoader, *, multilabel: bool = False,
                 num_classes: int | None = None,
                 l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                 val_fraction: float = 0.2, seed: int = 0,
                 max_iter: int = 200) -> common.ProbeResult:
  """Logistic-regression probe with the L2 strength chosen on a validation carve-out.

  Each `l2` in `l2_grid` is fitted on the fit part of `common.carve_validation(train,
  val_fraction, seed)` and scored on its validation part (accuracy, or mean ROC AUC when
  `multilabel`); the best wins (ties go to the larger `l2`). The model is refitted with it on
  the whole of `train`, and only then is `test()` called, once.

  Args:
    train: `x [N, D]` features; `y` int `[N]` class ids, or `{0, 1}` `[N, C]` when `multilabel`.
    test: loader of the test split, in the same format.
    multilabel: sigmoid per class, scored by mean ROC AUC.
    num_classes: C for multiclass targets (default: largest training label + 1).
    l2_grid: candidate L2 strengths (see `fit_logistic`).
    val_fraction: fraction of `train` held out for selection.
    seed: seed of the validation carve-out.
    max_iter: cap on L-BFGS iterations per fit.

  Returns:
    A `ProbeResult` with metric "accuracy" (or "mean_auc"), `selected={"l2": ...}`, the curve
    "val_vs_l2" as `[[l2, value], ...]`, and details: "confusion" (`[C, C]` nested lists,
    row = true class), "num_classes" and "majority" (multiclass), or "per_class_auc"
    (multilabel; None where a class has a single outcome on test).

  Raises:
    ValueError: if the grid is empty, or a multiclass test label is not below C.
  """
  if not l2_grid:
    raise ValueError("linear_probe: empty l2_grid")
  # Carving an index split names the rows of each part, so that every fit runs on the whole of
  # `train` (validation rows weighted 0) through one compiled solver.
  rows = np.arange(len(train))
  fit_rows, val_rows = (part.x for part in common.carve_validation(
    common.Split(rows, rows), val_fraction, seed))
  fit_weights = np.zeros(len(train), np.float32)
  fit_weights[fit_rows] = 1
  val = train.take(val_rows)
  if not multilabel and num_classes is None:
    num_classes = int(np.max(train.y)) + 1
  fit = functools.partial(fit_logistic, train.x, train.y, multilabel=multilabel,
                          num_classes=num_classes, max_iter=max_iter)

  curve = []
  for l2 in l2_grid:
    params = fit(float(l2), weights=fit_weights)
    curve.append([float(l2), _score(val.y, predict_scores(params, val.x), multilabel)])
  best_l2, best_val = max(curve, key=lambda point: (point[1], point[0]))
  params = fit(best_l2)

  test_split = test()
  scores = predict_scores(params, test_split.x)
  if multilabel:
    targets = np.asarray(test_split.y)
    per_class = [metrics.roc_auc(targets[:, c], scores[:, c])
                 if 0 < targets[:, c].sum() < len(targets) else None
                 for c in range(targets.shape[1])]
    details = {"per_class_auc": per_class}
  else:
    if np.max(test_split.y) >= num_classes:
      raise ValueError(f"linear_probe: test label {np.max(test_split.y)} >= {num_classes} "
                       "classes; pass num_classes")
    predictions = scores.argmax(-1)
    details = {
      "confusion": metrics.confusion_matrix(test_split.y, predictions, num_classes).tolist(),
      "num_classes": num_classes,
      "majority": metrics.majority_rate(train.y, test_split.y),
    }
  return common.ProbeResult(
    metric="mean_auc" if multilabel else "accuracy",
    value=_score(test_split.y, scores, multilabel),
    selected={"l2": best_l2},
    val_value=best_val,
    curves={"val_vs_l2": curve},
    details=details)
