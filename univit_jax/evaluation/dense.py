"""Dense probe: one linear classifier shared by every patch token, scored by mIoU on pixels.

Each patch is trained towards the class histogram of its labelled pixels (a soft target; patches
with no labelled pixel are left out), with softmax cross-entropy plus an l2 penalty on the kernel.
Features are standardised per channel with the training statistics (the role of the BatchNorm in
front of the usual linear segmentation head). Training is minibatch Adam over patches, since the
patches of a segmentation set rarely fit on a device at once; the l2 penalty is in the loss rather
than a decoupled decay, so its selected value means the same as for any other solver of this
convex objective.

A patch predicts the argmax of its logits, and every pixel takes its patch's class (nearest
upsampling). l2 is chosen by validation mIoU on a split carved from the training split, the model
is refitted on the whole training split, and the test split is loaded once, at the end.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from univit_jax.evaluation import common, metrics

IGNORE = -1


def patch_to_pixels(patch_classes: np.ndarray, grid: tuple[int, int, int],
                    patch_size: int) -> np.ndarray:
  """Nearest upsampling of per-patch classes `[N, T * gh * gw]` to pixels `[N, T, H, W]`
  (H = gh * patch_size, W = gw * patch_size)."""
  t, gh, gw = grid
  maps = np.asarray(patch_classes).reshape(-1, t, gh, gw)
  return maps.repeat(patch_size, axis=2).repeat(patch_size, axis=3)


def patch_targets(pixels: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Soft targets of patches from their pixel labels `[B, P]` (IGNORE or out-of-range: unlabelled).

  Returns:
    The class histogram of each patch's labelled pixels `[B, C]` (rows sum to 1, or 0 when no
    pixel is labelled) and a float weight `[B]`: 1 for patches with a labelled pixel, else 0.
  """
  counts = jax.nn.one_hot(pixels, num_classes).sum(1)
  total = counts.sum(-1)
  return counts / jnp.maximum(total, 1.0)[:, None], (total > 0).astype(jnp.float32)


def _pixel_labels(split: common.Split, grid: tuple[int, int, int]) -> tuple[np.ndarray, int]:
  """The split's labels as `[N, T, H, W]`, and the patch size.

  Raises:
    ValueError: if the tokens or labels do not match the grid.
  """
  t, gh, gw = grid
  labels = split.y[:, None] if split.y.ndim == 3 and t == 1 else split.y
  if split.x.ndim != 3 or split.x.shape[1] != t * gh * gw:
    raise ValueError(f"dense_probe: x {split.x.shape} is not [N, {t}*{gh}*{gw}, D] tokens")
  if labels.ndim != 4 or labels.shape[1] != t or labels.shape[2] % gh:
    raise ValueError(f"dense_probe: y {split.y.shape} is not [N, {t}, H, W] for grid {grid}")
  patch_size = labels.shape[2] // gh
  if labels.shape[3] != gw * patch_size:
    raise ValueError(
      f"dense_probe: y {split.y.shape} does not hold {gh}x{gw} square patches for grid {grid}")
  return labels, patch_size


def _labelled_patches(labels: np.ndarray, grid: tuple[int, int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """`labels [N, T, H, W]` as `[N, T, gh, p, gw, p]`, and the flat ids of the patches (see
  `_patch_pixels`) that hold a labelled pixel."""
  n, t, h, w = labels.shape
  _, gh, gw = grid
  patched = labels.reshape(n, t, gh, h // gh, gw, w // gw)
  return patched, np.flatnonzero((patched != IGNORE).any(axis=(3, 5)))


def _patch_pixels(patched: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Pixel labels `[B, p * p]` of flat patch ids `[B]` (example-major, then (t, gh, gw) as the
  tokens) of `patched [N, T, gh, p, gw, p]`."""
  _, t, gh, _, gw, _ = patched.shape
  n, token = np.divmod(ids, t * gh * gw)
  frame, cell = np.divmod(token, gh * gw)
  row, col = np.divmod(cell, gw)
  return patched[n, frame, row, :, col, :].reshape(len(ids), -1)


def _moments(x: np.ndarray, chunk: int = 256) -> np.ndarray:
  """Per-channel mean and standard deviation `[2, D]` of `x [N, P, D]`, in float64 by chunks."""
  total, squares, count = 0.0, 0.0, 0
  for start in range(0, len(x), chunk):
    block = x[start:start + chunk].reshape(-1, x.shape[-1]).astype(np.float64)
    total, squares, count = total + block.sum(0), squares + (block ** 2).sum(0), count + len(block)
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
  return np.stack([mean, np.maximum(std, 1e-6)]).astype(np.float32)


def _logits(params: dict[str, jax.Array], feats: jax.Array, stats: jax.Array) -> jax.Array:
  """Class logits `[B, C]` of patch features `[B, D]` standardised by `stats [2, D]`."""
  return ((feats - stats[0]) / stats[1]) @ params["kernel"] + params["bias"]


def _loss(params: dict[str, jax.Array], feats: jax.Array, pixels: jax.Array, stats: jax.Array,
          l2: jax.Array, num_classes: int) -> jax.Array:
  targets, weights = patch_targets(pixels, num_classes)
  cross_entropy = -(targets * jax.nn.log_softmax(_logits(params, feats, stats))).sum(-1)
  data = jnp.sum(cross_entropy * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return data + l2 * jnp.sum(params["kernel"] ** 2)


@functools.partial(jax.jit, static_argnames="num_classes")
def _train_step(params: dict[str, jax.Array], opt_state: optax.OptState, feats: jax.Array,
                pixels: jax.Array, stats: jax.Array, lr: jax.Array, l2: jax.Array, *,
                num_classes: int) -> tuple[dict[str, jax.Array], optax.OptState, jax.Array]:
  """One Adam step on patches `feats [B, D]` with pixel labels `pixels [B, p * p]` (padding
  patches all IGNORE); returns the new parameters, state and objective."""
  loss, grads = jax.value_and_grad(_loss)(params, feats, pixels, stats, l2, num_classes)
  updates, opt_state = optax.scale_by_adam().update(grads, opt_state, params)
  params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
  return params, opt_state, loss


@jax.jit
def _predict_step(params: dict[str, jax.Array], feats: jax.Array, stats: jax.Array) -> jax.Array:
  return jnp.argmax(_logits(params, feats, stats), -1)


def dense_probe(
    train: common.Split, test: common.TestLoader, *, grid: tuple[int, int, int],
    num_classes: int, l2_grid: Sequence[float] = (1e-5, 1e-4, 1e-3), epochs: int = 10,
    batch_size: int = 4096, lr: float = 1e-3, val_fraction: float = 0.2,
    seed: int = 0) -> common.ProbeResult:
  """Trains a per-patch linear segmentation probe on frozen tokens; scores test mIoU.

  Args:
    train: `x [N, T * gh * gw, D]` patch tokens in (t, h, w) order; `y` int `[N, T, H, W]` pixel
      class ids (`[N, H, W]` when T = 1), IGNORE (-1) for unlabelled pixels.
    test: loads the test split (same layout); called once, after the final model is fitted.
    grid: (T, gh, gw), the token grid; the patch size is H / gh (= W / gw).
    num_classes: C; labels must lie in [0, C) or be IGNORE.
    l2_grid: l2 penalties on the kernel to choose from.
    epochs: passes over the labelled training patches of every run.
    batch_size: patches per step (at most the number of labelled training patches).
    lr: peak Adam learning rate (cosine decay to 0).
    val_fraction: share of `train` examples held out to choose l2.
    seed: of the validation carve-out and the patch order.

  Returns:
    "miou" over `num_classes` on the test pixels; `selected` {"l2"}; `curves` with "train_loss"
    (per-epoch mean objective of the final run) and "val_vs_l2" ([[l2, miou], ...]); `details`
    with "per_class_iou" ([C], None for classes absent from test labels and predictions) and
    "pixel_accuracy".

  Raises:
    ValueError: if shapes do not match the grid, or a label lies outside [0, C) and is not
      IGNORE.
  """
  labels, patch_size = _pixel_labels(train, grid)
  if np.any((labels != IGNORE) & ((labels < 0) | (labels >= num_classes))):
    raise ValueError(f"dense_probe: training labels outside [0, {num_classes}) and not {IGNORE}")
  tokens_per_example = train.x.shape[1]

  batch_size = min(batch_size, len(_labelled_patches(labels, grid)[1]))

  def fit(split: common.Split, l2: float
          ) -> tuple[dict[str, jax.Array], jax.Array, list[float]]:
    """Parameters, feature statistics `[2, D]` and per-epoch mean loss of a run on `split`."""
    patched, ids = _labelled_patches(_pixel_labels(split, grid)[0], grid)
    feats = split.x.reshape(-1, split.x.shape[-1])
    stats = jnp.asarray(_moments(split.x))
    steps_per_epoch = -(-len(ids) // batch_size)
    lrs = common.cosine_schedule(lr, epochs * steps_per_epoch).astype(np.float32)
    dim = feats.shape[-1]
    params = {"kernel": jnp.zeros((dim, num_classes)), "bias": jnp.zeros((num_classes,))}
    opt_state = optax.scale_by_adam().init(params)
    rng = np.random.default_rng(seed)
    epoch_losses = []
    for epoch in range(epochs):
      total = 0.0
      for i, (index, valid) in enumerate(common.epoch_batches(len(ids), batch_size, rng)):
        pixels = np.where(valid[:, None], _patch_pixels(patched, ids[index]), IGNORE)
        params, opt_state, loss = _train_step(
          params, opt_state, feats[ids[index]].astype(np.float32), pixels, stats,
          lrs[epoch * steps_per_epoch + i], np.float32(l2), num_classes=num_classes)
        total += float(loss) * int(valid.sum())
      epoch_losses.append(total / len(ids))
    return params, stats, epoch_losses

  def predict(params: dict[str, jax.Array], stats: jax.Array, split: common.Split) -> np.ndarray:
    """Pixel classes `[N, T, H, W]` of `split`."""
    feats = split.x.reshape(-1, split.x.shape[-1])
    out = []
    for start in range(0, len(feats), batch_size):
      index = np.arange(start, min(start + batch_size, len(feats)))
      padded = np.pad(index, (0, batch_size - len(index)))
      classes = _predict_step(params, feats[padded].astype(np.float32), stats)
      out.append(np.asarray(classes)[:len(index)])
    patch_classes = np.concatenate(out).reshape(len(split), tokens_per_example)
    return patch_to_pixels(patch_classes, grid, patch_size)

  fit_split, val_split = common.carve_validation(train, val_fraction, seed)
  val_labels = _pixel_labels(val_split, grid)[0]
  val_vs_l2 = []
  for l2 in l2_grid:
    params, stats, _ = fit(fit_split, l2)
    val_vs_l2.append(
      [float(l2), metrics.miou(val_labels, predict(params, stats, val_split), num_classes)[0]])
  best_l2, best_val = max(val_vs_l2, key=lambda pair: pair[1])
  params, stats, train_loss = fit(train, best_l2)

  test_split = test()
  test_labels = _pixel_labels(test_split, grid)[0]
  predictions = predict(params, stats, test_split)
  value, per_class = metrics.miou(test_labels, predictions, num_classes)
  labelled = test_labels != IGNORE
  return common.ProbeResult(
    metric="miou", value=value, selected={"l2": best_l2}, val_value=best_val,
    curves={"train_loss": train_loss, "val_vs_l2": val_vs_l2},
    details={
      "per_class_iou": [None if np.isnan(iou) else float(iou) for iou in per_class],
      "pixel_accuracy": float(np.mean(predictions[labelled] == test_labels[labelled])),
    })
