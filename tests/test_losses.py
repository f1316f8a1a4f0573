"""Losses against direct NumPy implementations of their formulas, sampling, sharding, curriculum."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from univit_jax import config_lib, losses

K, D, KTOP = 40, 8, 4


def _jit(fn, **kwargs):
  """The loss compiled once (faster than op-by-op dispatch on a busy CPU)."""
  return jax.jit(functools.partial(fn, **kwargs))


def _problem(seed: int, n: int = 6, k: int = KTOP, num_classes: int = K, dim: int = D):
  """Random embeddings [n, D], bank [K, D], labels [n, k] (distinct per row, some -1), valid."""
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(n, dim)).astype(np.float32)
  bank = rng.normal(size=(num_classes, dim)).astype(np.float32)
  labels = np.stack([rng.choice(num_classes, k, replace=False) for _ in range(n)]).astype(np.int32)
  labels[0, -1] = -1
  labels[1, 1:] = -1
  valid = np.ones(n, bool)
  valid[-1] = False
  return emb, labels, valid, bank


def _np_cos(emb, bank):
  e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  w = bank / np.linalg.norm(bank, axis=-1, keepdims=True)
  return np.clip(e.astype(np.float64) @ w.T.astype(np.float64), -1, 1)


def _np_mlcd(emb, labels, valid, bank, classes, s, m):
  cos = _np_cos(emb, bank)
  total, rows = 0.0, 0
  for n in range(len(emb)):
    positives = {int(c) for c in labels[n] if c >= 0}
    if not valid[n] or not positives:
      continue
    pos = sum(np.exp(-s * (cos[n, c] - m)) for c in positives)
    neg = sum(np.exp(s * cos[n, c]) for c in classes if int(c) not in positives)
    total += np.log1p(pos) + np.log1p(neg)
    rows += 1
  return total / rows


def _np_cosface(emb, labels_used, valid, bank, classes, s, m, threshold):
  """Mean over valid (row, used label) pairs of the filtered CosFace cross-entropy."""
  cos = _np_cos(emb, bank)
  total, count = 0.0, 0
  for n in range(len(emb)):
    if not valid[n]:
      continue
    for t in labels_used[n]:
      if t < 0:
        continue
      logits = []
      for c in classes:
        if c == t:
          logits.append(s * (cos[n, c] - m))
        else:
          logits.append(s * (0.0 if cos[n, c] > threshold else cos[n, c]))
      logits = np.array(logits)
      top = logits.max()
      total += top + np.log(np.exp(logits - top).sum()) - s * (cos[n, t] - m)
      count += 1
  return total / count


@pytest.mark.parametrize("scale, margin", [(64.0, 0.3), (4.0, 0.0)])
def test_mlcd_matches_numpy_over_all_classes(scale, margin):
  emb, labels, valid, bank = _problem(0)
  loss, metrics = _jit(losses.mlcd_loss, scale=scale, margin=margin, sample_ratio=1.0)(
    emb, labels, valid, bank, jax.random.key(0))
  want = _np_mlcd(emb, labels, valid, bank, np.arange(K), scale, margin)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert metrics["num_sampled_classes"] == K and metrics["valid_rows"] == 5


def test_mlcd_matches_numpy_over_sampled_classes():
  emb, labels, valid, bank = _problem(1, n=3, k=2)
  rng = jax.random.key(3)
  sample = _jit(losses.sample_classes, num_classes=K, sample_ratio=0.25)(labels, valid, rng=rng)
  assert sample.classes.shape == (10,)
  loss, _ = _jit(losses.mlcd_loss, sample_ratio=0.25)(emb, labels, valid, bank, rng)
  want = _np_mlcd(emb, labels, valid, bank, np.asarray(sample.classes), 64.0, 0.3)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_cosface_slot_matches_numpy_with_all_slots():
  emb, labels, valid, bank = _problem(2)
  # Centres near some embeddings, so that the 0.75 filter really fires.
  bank[:3] = emb[:3] + 0.1 * bank[:3]
  loss, _ = _jit(losses.cosface_slot_loss, sample_ratio=1.0, num_slots=KTOP)(
    emb, labels, valid, bank, jax.random.key(0))
  assert (_np_cos(emb, bank) > 0.75).sum() >= 3
  want = _np_cosface(emb, labels, valid, bank, np.arange(K), 64.0, 0.3, 0.75)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_cosface_slot_draws_the_configured_slots():
  emb, labels, valid, bank = _problem(3)
  rng = jax.random.key(5)
  loss, _ = _jit(losses.cosface_slot_loss, sample_ratio=0.5, num_slots=2, filter_threshold=0.5,
                 margin=0.2, scale=16.0)(emb, labels, valid, bank, rng)
  sample_rng, slot_rng = jax.random.split(rng)
  sample = _jit(losses.sample_classes, num_classes=K, sample_ratio=0.5)(
    labels, valid, rng=sample_rng)
  slots = np.asarray(losses.choose_slots(sample.label_valid, 2, slot_rng))
  used = np.take_along_axis(labels, slots, axis=1)
  # Valid labels are drawn before padding: row 1 has one valid label, so one -1 slot.
  assert (used[1] >= 0).sum() == 1 and (used[2:] >= 0).all()
  want = _np_cosface(emb, used, valid, bank, np.asarray(sample.classes), 16.0, 0.2, 0.5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_cosface_slot_rejects_more_slots_than_labels():
  emb, labels, valid, bank = _problem(0)
  with pytest.raises(ValueError, match="num_positive_slots=5"):
    losses.cosface_slot_loss(emb, labels, valid, bank, jax.random.key(0), num_slots=5)


def test_sampling_keeps_every_positive_with_a_static_size():
  rng = np.random.default_rng(0)
  num_classes = 1000
  labels = rng.integers(-1, num_classes, size=(16, 10)).astype(np.int32)
  valid = rng.random(16) > 0.2
  m = losses.num_sampled_classes(num_classes, labels.size, 0.1)
  assert m == 160
  sample_fn = jax.jit(lambda l, v, key: losses.sample_classes(l, v, num_classes, 0.1, key))
  seen = []
  for seed in range(3):
    sample = sample_fn(labels, valid, jax.random.key(seed))
    classes = np.asarray(sample.classes)
    assert classes.shape == (m,)
    assert np.all(np.diff(classes) > 0)  # distinct and sorted
    positives = set(labels[valid][labels[valid] >= 0].tolist())
    assert positives <= set(classes.tolist())
    assert sample.num_positive_classes == len(positives)
    ok = np.asarray(sample.label_valid)
    np.testing.assert_array_equal(classes[np.asarray(sample.label_pos)][ok], labels[ok])
    seen.append(frozenset(classes.tolist()) - positives)
  assert len(set(seen)) == 3  # the negatives are redrawn with the key


def test_num_sampled_classes():
  assert losses.num_sampled_classes(100, 5, 0.1) == 10
  assert losses.num_sampled_classes(100, 30, 0.1) == 30
  assert losses.num_sampled_classes(10, 50, 0.1) == 10
  with pytest.raises(ValueError, match="sample_ratio"):
    losses.num_sampled_classes(10, 5, 0.0)


def test_labels_beyond_the_bank_are_ignored_and_counted():
  emb, labels, valid, bank = _problem(4)
  labels[2, 0] = K + 3
  _, metrics = jax.jit(losses.mlcd_loss)(emb, labels, valid, bank, jax.random.key(0))
  assert metrics["ignored_labels"] == 1


@pytest.mark.parametrize("kind", ["mlcd", "cosface_slot"])
def test_gradients_are_finite_at_scale_64(kind):
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(K, D)).astype(np.float32)
  # cos = +1 and -1 to centres, a zero embedding, and an all-invalid batch.
  emb = np.stack([bank[0], -bank[1], 5e3 * bank[2], np.zeros(D, np.float32)])
  labels = np.array([[0, 1, 2, 3], [1, 0, 5, 6], [7, 2, 8, 9], [3, 4, 5, -1]], np.int32)
  cfg = config_lib.DiscriminationConfig(kind=kind, num_positive_slots=3)

  def f(e, w, v):
    return losses.discrimination_loss(e, labels, v, w, jax.random.key(0), cfg)[0]

  loss_and_grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  for valid in (np.ones(4, bool), np.zeros(4, bool)):
    loss, grads = loss_and_grads(emb, bank, valid)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in grads)
  assert loss == 0.0


def test_discrimination_loss_accepts_segments_and_regions():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(K, D)).astype(np.float32)
  emb = rng.normal(size=(2, 3, D)).astype(np.float32)
  labels = rng.integers(0, K, size=(2, 3, KTOP)).astype(np.int32)
  mask = np.array([[True, True, False], [True, False, False]])
  cfg = config_lib.DiscriminationConfig()
  # Same rows and, with r = 1, the same classes: equal losses.
  full = config_lib.DiscriminationConfig(sample_ratio=1.0)
  loss = _jit(losses.discrimination_loss, config=full)
  got, _ = loss(emb, labels, mask, bank, jax.random.key(0))
  flat, _ = loss(emb[mask], labels[mask], None, bank, jax.random.key(0))
  np.testing.assert_allclose(got, flat, rtol=1e-6)
  with pytest.raises(ValueError, match="leading shape"):
    losses.discrimination_loss(emb, labels[:, :2], None, bank, jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="embedding width"):
    losses.discrimination_loss(emb, labels, None, bank[:, :4], jax.random.key(0), cfg)


# ---------------------------------------------------------------------------------------------
# Sharded banks give the single-device result.


@pytest.mark.parametrize("kind, mesh_shape, pin_logits", [
  ("mlcd", (2, 2, 2), True), ("cosface_slot", (1, 1, 8), True), ("mlcd", (1, 1, 8), False)])
@pytest.mark.slow
def test_sharded_bank_matches_one_device(kind, mesh_shape, pin_logits):
  mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(8, 2, D)).astype(np.float32)  # [B, g, D] segments
  labels = rng.integers(-1, 64, size=(8, 2, KTOP)).astype(np.int32)
  valid = rng.random((8, 2)) > 0.2
  bank = rng.normal(size=(64, D)).astype(np.float32)
  cfg = config_lib.DiscriminationConfig(kind=kind, sample_ratio=0.25, num_positive_slots=2,
                                        scale=64.0)

  def loss_and_grads(e, l, v, w, logits_sharding=None):
    f = lambda e, w: losses.discrimination_loss(e, l, v, w, jax.random.key(7), cfg,
                                                logits_sharding)[0]
    return jax.value_and_grad(f, argnums=(0, 1))(e, w)

  one = jax.device_put((emb, labels, valid, bank), jax.devices()[0])
  want_loss, want_grads = jax.jit(loss_and_grads)(*one)
  # Rows over the batch axes, sampled classes over "model": the logits are split, not copied.
  logits = NamedSharding(mesh, P(("data", "fsdp"), "model")) if pin_logits else None
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  classes = NamedSharding(mesh, P(("fsdp", "model"), None))
  sharded = jax.jit(functools.partial(loss_and_grads, logits_sharding=logits),
                    in_shardings=(batch, batch, batch, classes),
                    out_shardings=(None, (batch, classes)))
  args = [jax.device_put(x, s) for x, s in zip((emb, labels, valid, bank),
                                               (batch, batch, batch, classes))]
  got_loss, got_grads = sharded(*args)
  assert got_grads[1].sharding.spec == classes.spec
  assert len(got_grads[1].addressable_shards) == 8
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# Structured contrast.


def _np_jaccard(ids, valid):
  sets = [{tuple(ids[b, s]) for s in range(ids.shape[1]) if valid[b, s]}
          for b in range(ids.shape[0])]
  out = np.zeros((len(sets), len(sets)))
  for a, b in itertools.product(range(len(sets)), repeat=2):
    union = sets[a] | sets[b]
    out[a, b] = len(sets[a] & sets[b]) / len(union) if union else 0.0
  return out


def _np_contrastive(emb, targets, valid, tau):
  e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  cos = e.astype(np.float64) @ e.T.astype(np.float64)
  total, rows = 0.0, 0
  for a in range(len(e)):
    if not valid[a]:
      continue
    others = [b for b in range(len(e)) if b != a and valid[b]]
    w = np.array([max(targets[a, b], 0.0) for b in others])
    rows += 1
    if w.sum() > 0:
      z = cos[a, others] / tau
      log_q = z - np.log(np.exp(z).sum())
      total += -(w / w.sum() * log_q).sum()
    else:
      total += np.log1p(np.exp((cos[a, others] - 1) / tau).sum())
  return total / rows


def test_set_jaccard_matches_numpy():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 3, size=(7, 5, 2)).astype(np.int32)  # many repeats and overlaps
  valid = rng.random((7, 5)) > 0.3
  valid[0] = False  # an empty set
  ids[1], valid[1] = ids[2], valid[2]  # identical structures
  got = np.asarray(jax.jit(losses.set_jaccard)(ids, valid))
  np.testing.assert_allclose(got, _np_jaccard(ids, valid), atol=1e-6)
  assert got[1, 2] == 1.0 and got.max() == 1.0 and got[0].max() == 0.0


@pytest.mark.slow
def test_object_sets_use_the_top_cluster_of_valid_regions():
  region_labels = np.array([[[5, 1], [6, 2], [-1, -1]], [[6, 3], [5, 4], [9, 9]]], np.int32)
  region_valid = np.array([[True, True, True], [True, True, False]])
  image_labels = np.array([[7, 8], [9, 1]], np.int32)
  targets = losses.set_jaccard(*losses.object_sets(
    region_labels, region_valid, image_labels, np.array([True, True])))
  assert targets[0, 1] == 1.0  # {5, 6} both: co-occurrence, order of regions irrelevant


def test_images_without_regions_fall_back_to_their_whole_image_cluster():
  # Rows 0-1: single items (no boxes) of the same whole-image cluster 4; row 2: regions {4, 6};
  # row 3: no regions and no object label (a clip's row, or an unlabelled image).
  region_labels = np.array([[[-1]] * 2, [[-1]] * 2, [[4], [6]], [[-1]] * 2], np.int32)
  region_valid = np.array([[False, False], [False, False], [True, True], [False, False]])
  image_labels = np.array([[4], [4], [4], [4]], np.int32)
  image_valid = np.array([True, True, True, False])
  targets = np.asarray(losses.set_jaccard(*losses.object_sets(
    region_labels, region_valid, image_labels, image_valid)))
  assert targets[0, 1] == 1.0 and targets[0, 2] == 0.5  # {4} vs {4, 6}
  assert targets[3].max() == 0.0  # still no partner: the identity is its positive


def test_shuffled_copy_is_a_negative_when_order_matters():
  clusters = np.array([[1, 2, 3, 4], [1, 2, 1, 2], [3, 3, 5, 5], [7, 7, 7, 7],
                       [1, 2, 3, 4]], np.int32)
  perm, matters = jax.jit(losses.shuffle_segments)(clusters, jax.random.key(0))
  perm = np.asarray(perm)
  np.testing.assert_array_equal(np.sort(perm, axis=1), np.tile(np.arange(4), (5, 1)))
  np.testing.assert_array_equal(matters, [True, True, True, False, True])
  shuffled = np.take_along_axis(clusters, perm, axis=1)
  assert all((shuffled[b] != clusters[b]).any() for b in range(5) if matters[b])
  targets = np.asarray(jax.jit(losses.clip_targets)(clusters, perm, matters))
  b = len(clusters)
  for i in range(b):
    assert targets[i, b + i] == targets[b + i, i] == (0.0 if matters[i] else 1.0)
  assert targets[0, 4] == 1.0  # identical ordered structures: the maximal weight
  assert targets.max() <= 1.0
  with pytest.raises(ValueError, match="at least 2 segments"):
    losses.transition_sets(clusters[:, :1])


def test_shuffle_changes_order_for_every_key():
  clusters = np.array([[4, 4, 9], [1, 2, 0]], np.int32)  # a swap of the two 4s changes nothing
  shuffle = jax.jit(losses.shuffle_segments)
  for seed in range(20):
    perm, _ = shuffle(clusters, jax.random.key(seed))
    shuffled = np.take_along_axis(clusters, np.asarray(perm), axis=1)
    assert (shuffled != clusters).any(axis=1).all()


def test_structured_contrastive_matches_numpy():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(6, D)).astype(np.float32)
  targets = rng.random((6, 6)).astype(np.float32) * (rng.random((6, 6)) > 0.5)
  targets[2] = 0.0  # no partner: the identity fallback
  valid = np.array([True, True, True, True, True, False])
  for tau in (0.1, 0.5):
    loss, metrics = _jit(losses.structured_contrastive_loss, temperature=tau)(
      emb, targets, valid)
    np.testing.assert_allclose(loss, _np_contrastive(emb, targets, valid, tau), rtol=1e-5)
  assert metrics["no_partner_fraction"] >= 0.2


def test_structured_contrastive_lowers_when_embeddings_follow_the_targets():
  rng = np.random.default_rng(1)
  clusters = rng.integers(0, 3, size=(12, 4)).astype(np.int32)
  perm, matters = jax.jit(losses.shuffle_segments)(clusters, jax.random.key(0))
  targets = jax.jit(losses.clip_targets)(clusters, perm, matters)
  both = np.concatenate([clusters, np.take_along_axis(clusters, np.asarray(perm), axis=1)])
  # Aligned: one dimension per ordered transition, so cosines follow the transition overlap.
  aligned = np.zeros((24, 9), np.float32)
  for b, s in itertools.product(range(24), range(3)):
    aligned[b, 3 * both[b, s] + both[b, s + 1]] = 1.0
  random = rng.normal(size=(24, 9)).astype(np.float32)
  f = jax.jit(lambda e: losses.structured_contrastive_loss(e, targets, None, 0.1)[0])
  assert f(aligned) < f(random)
  # And gradient descent on the embeddings reduces it.
  step = jax.jit(lambda e: e - 0.5 * jax.grad(f)(e))
  e = jnp.asarray(random)
  for _ in range(20):
    e = step(e)
  assert f(e) < 0.8 * f(random)


def test_structured_contrastive_sharded_matches_one_device():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(16, D)).astype(np.float32)
  targets = (rng.random((16, 16)) > 0.7).astype(np.float32)
  f = jax.value_and_grad(lambda e, t: losses.structured_contrastive_loss(e, t, None, 0.1)[0])
  want = jax.jit(f)(*jax.device_put((emb, targets), jax.devices()[0]))
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  got = jax.jit(f, in_shardings=(batch, batch))(emb, targets)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_structured_contrastive_gradients_finite_with_degenerate_rows():
  emb = np.zeros((4, D), np.float32)
  emb[0, 0] = 1.0
  targets = np.zeros((4, 4), np.float32)
  valid = np.array([True, False, False, False])
  f = lambda e: losses.structured_contrastive_loss(e, targets, valid, 0.05)[0]
  loss, grad = jax.jit(jax.value_and_grad(f))(emb)
  assert loss == 0.0 and np.all(np.isfinite(grad))


# ---------------------------------------------------------------------------------------------
# Curriculum, weights, config.


SCHEDULE = ((0.0, (1,)), (0.25, (1, 2)), (0.5, (1, 2, 4)), (0.75, (1, 2, 4, 8)))


def test_active_granularities_go_coarse_to_fine():
  got = [losses.active_granularities(p, SCHEDULE) for p in (0.0, 0.2, 0.25, 0.6, 0.99, 1.5)]
  assert got == [(1,), (1,), (1, 2), (1, 2, 4), (1, 2, 4, 8), (1, 2, 4, 8)]
  with pytest.raises(ValueError, match="progress"):
    losses.active_granularities(-0.1, SCHEDULE)
  with pytest.raises(ValueError, match="0.0"):
    losses.active_granularities(0.5, ((0.1, (1,)),))


def test_loss_config_weights_and_combination():
  config = config_lib.default_config("mu/8")
  cfg = config_lib.loss_config(config)
  assert cfg.discrimination == config_lib.DiscriminationConfig()
  config.loss.center_embeddings = True
  assert config_lib.loss_config(config).discrimination.center_embeddings
  assert cfg.event_schedule == SCHEDULE
  weights = losses.loss_weights(cfg, 0.3)
  assert weights == dict(object=1.0, event_1=1.0, event_2=1.0, event_4=0.0, event_8=0.0,
                         contrastive=1.0)
  terms = {"object": (jnp.float32(2.0), {"loss": jnp.float32(2.0)}),
           "event_4": (jnp.float32(5.0), {"loss": jnp.float32(5.0)}),
           "contrastive": (jnp.float32(3.0), {"no_partner_fraction": jnp.float32(0.5)})}
  total, metrics = losses.combine_losses(terms, weights)
  assert total == 5.0 and metrics["loss"] == 5.0
  assert metrics["event_4/weight"] == 0.0 and metrics["contrastive/no_partner_fraction"] == 0.5
  with pytest.raises(ValueError, match="no weight"):
    losses.combine_losses({"ocr": terms["object"]}, weights)


@pytest.mark.parametrize("field, value, message", [
  ("kind", "arcface", "loss.kind"),
  ("scale", 0.0, "loss.scale"),
  ("sample_ratio", 1.5, "loss.sample_ratio"),
  ("filter_threshold", 2.0, "loss.filter_threshold"),
  ("event_schedule", ((0.0, (1,)), (0.5, (1, 16))), "event_16"),
  ("event_schedule", ((0.5, (1,)),), "loss.event_schedule"),
])
def test_loss_config_rejects_bad_values(field, value, message):
  config = config_lib.default_config("mu/8")
  config.loss[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.loss_config(config)


@pytest.mark.parametrize("kind", ["mlcd", "cosface_slot"])
def test_centred_discrimination_ignores_the_shared_component(kind):
  # Embeddings that differ by a small per-row part on top of a large common vector (a fresh
  # encoder on mostly-background frames): uncentred, the common part sets every cosine and gets
  # gradient; centred over the valid rows, the loss and the gradient depend on the differences
  # only, so the encoder cannot lower the loss by growing what all samples share (collapse).
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(K, D)).astype(np.float32)
  labels = rng.integers(0, K, size=(6, 2, KTOP)).astype(np.int32)
  valid = np.array([[True, True], [True, False], [True, True], [False, False], [True, True],
                    [True, True]])
  small = 0.1 * rng.normal(size=(6, 2, D)).astype(np.float32)
  shared = 10.0 * rng.normal(size=(D,)).astype(np.float32)
  centred = config_lib.DiscriminationConfig(kind=kind, num_positive_slots=2, center_embeddings=True)
  plain = config_lib.DiscriminationConfig(kind=kind, num_positive_slots=2)

  def loss(e, cfg):
    return losses.discrimination_loss(e, labels, valid, bank, jax.random.key(0), cfg)[0]

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  base, grad = value_and_grad(small, centred)
  shifted, shifted_grad = value_and_grad(small + shared, centred)
  np.testing.assert_allclose(shifted, base, rtol=1e-5)
  np.testing.assert_allclose(shifted_grad, grad, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(np.sum(grad[valid], axis=0), 0.0, atol=1e-3)
  assert abs(float(value_and_grad(small + shared, plain)[0]) - float(base)) > 1.0
  got = losses.center_rows(small + shared, valid)
  np.testing.assert_allclose(np.mean(np.asarray(got)[valid], axis=0), 0.0, atol=1e-5)
