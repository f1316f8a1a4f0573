"""The demo dataset: determinism, disjoint splits, and labels that agree with the pixels."""

import itertools
import pickle

import grain
import numpy as np
import pytest

from univit_jax.data import demo

SIZE = 32
FRAMES = 16
_APPEAR, _MOVE, _TURN, _VANISH = range(4)


def _records(kind, n, split="train", **kwargs):
  source = demo.DemoSource(kind, split, num_examples=n, **kwargs)
  return [source[i] for i in range(n)]


@pytest.fixture(scope="module")
def clips():
  return _records("events", 150, image_size=SIZE, num_frames=FRAMES)


def _centroid(pixels):
  ys, xs = np.nonzero(pixels)
  return np.array([ys.mean(), xs.mean()]) + 0.5


@pytest.mark.parametrize("kwargs, message", [
  (dict(kind="scenes"), "kind='scenes'"),
  (dict(split="dev"), "split='dev'"),
  (dict(num_examples=0), "num_examples=0"),
  (dict(image_size=15), "image_size=15"),
  (dict(num_frames=1), "num_frames=1"),
  (dict(seed=-1), "seed=-1"),
  (dict(num_examples=2.5), "num_examples=2.5"),
])
def test_bad_arguments_name_the_argument(kwargs, message):
  args = dict(kind="events", split="train", num_examples=4) | kwargs
  with pytest.raises(ValueError, match=message):
    demo.DemoSource(args.pop("kind"), args.pop("split"), **args)


def test_index_out_of_range():
  source = demo.DemoSource("items", "val", num_examples=3)
  with pytest.raises(IndexError, match="index=3"):
    source[3]


@pytest.mark.parametrize("kind", demo.DEMO_KINDS)
def test_records_are_deterministic_in_any_order(kind):
  first = demo.DemoSource(kind, "train", num_examples=10, seed=5)
  second = demo.DemoSource(kind, "train", num_examples=10, seed=5)
  later = first[7]
  for a, b in [(later, second[7]), (first[2], second[2])]:
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  other_seed = demo.DemoSource(kind, "train", num_examples=10, seed=6)[7]
  assert not np.array_equal(later["frames"], other_seed["frames"])
  assert not np.array_equal(later["frames"], first[6]["frames"])


def test_splits_use_disjoint_digits():
  rows = {split: demo.split_digits(split) for split in demo.DEMO_SPLITS}
  assert [len(r) for r in rows.values()] == [4000, 500, 500]
  assert len(np.unique(np.concatenate(list(rows.values())))) == 5000
  labels = demo._digits().labels
  assert (np.bincount(labels[rows["val"]], minlength=10) == 50).all()
  for split, kind in itertools.product(demo.DEMO_SPLITS, demo.DEMO_KINDS):
    used = np.concatenate([r["source_ids"] for r in _records(kind, 8, split)])
    used = used[used >= 0]
    assert np.isin(used, rows[split]).all(), (split, kind)


def _expected_fields(kind):
  t = FRAMES if kind == "events" else 1
  r, e = demo.MAX_ITEMS, demo.MAX_EVENTS
  fields = {
    "id": (np.int64, ()), "frames": (np.uint8, (t, SIZE, SIZE, 3)),
    "masks": (np.uint8, (t, SIZE, SIZE)), "label": (np.int32, ()),
    "boxes": (np.float32, (r, 4)), "box_labels": (np.int32, (r,)), "box_mask": (np.bool_, (r,)),
    "frame_boxes": (np.float32, (t, r, 4)), "frame_box_mask": (np.bool_, (t, r)),
    "item_labels": (np.int32, (r,)), "source_ids": (np.int32, (r,)),
  }
  if kind == "events":
    fields |= {
      "events": (np.int32, (e,)), "event_mask": (np.bool_, (e,)),
      "event_frames": (np.int32, (e, 2)), "event_items": (np.int32, (e,)),
      "event_motion": (np.float32, (e, 3)),
    }
  return fields


@pytest.mark.parametrize("kind", demo.DEMO_KINDS)
def test_fields_have_fixed_shapes_and_dtypes(kind):
  expected = _expected_fields(kind)
  for i, record in enumerate(_records(kind, 4, image_size=SIZE, num_frames=FRAMES)):
    assert set(record) == set(expected)
    for key, (dtype, shape) in expected.items():
      value = np.asarray(record[key])
      assert value.dtype == dtype and value.shape == shape, (key, value.dtype, value.shape)
    assert record["id"] == i


@pytest.mark.parametrize("kind", demo.DEMO_KINDS)
def test_boxes_and_masks_agree_with_pixels(kind, clips):
  records = clips[:40] if kind == "events" else _records(kind, 40, image_size=SIZE)
  for record in records:
    masks, frames = record["masks"], record["frames"].max(axis=-1)
    # Drawn pixels are bright, background pixels dark (the documented 40 / 76 bounds).
    assert frames[masks == 0].max() <= 40 and frames[masks > 0].min() >= 76
    num_items = (record["item_labels"] >= 0).sum()
    assert masks.max() <= num_items
    for t, r in itertools.product(range(len(masks)), range(demo.MAX_ITEMS)):
      pixels = masks[t] == r + 1
      assert record["frame_box_mask"][t, r] == pixels.any()
      if not pixels.any():
        assert (record["frame_boxes"][t, r] == 0).all()
        continue
      ys, xs = np.nonzero(pixels)
      tight = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / SIZE
      np.testing.assert_allclose(record["frame_boxes"][t, r], tight, atol=1e-6)
    np.testing.assert_array_equal(record["boxes"], record["frame_boxes"][0])
    np.testing.assert_array_equal(record["box_mask"], record["frame_box_mask"][0])
    np.testing.assert_array_equal(
      record["box_labels"], np.where(record["box_mask"], record["item_labels"], -1))
    labels = demo._digits().labels
    rows = record["source_ids"][:num_items]
    np.testing.assert_array_equal(record["item_labels"][:num_items], labels[rows])
    if kind != "events":  # Every item of an image is visible.
      assert record["box_mask"].sum() == num_items


def test_image_kinds_labels():
  for record in _records("items", 20):
    assert record["label"] == record["item_labels"][0] and record["box_mask"].sum() == 1
  counts = [r["box_mask"].sum() for r in _records("objects", 30)]
  assert min(counts) >= 2 and max(counts) <= 4 and len(set(counts)) == 3
  assert all(r["label"] == -1 for r in _records("objects", 3))


def test_event_structure_and_codes(clips):
  for clip in clips:
    n = clip["event_mask"].sum()
    assert clip["event_mask"][:n].all() and 1 <= n <= demo.MAX_EVENTS
    spans = clip["event_frames"][:n]
    assert (spans[:, 1] - spans[:, 0] >= 2).all() and spans[0, 0] >= 0
    assert spans[-1, 1] <= FRAMES and (spans[1:, 0] >= spans[:-1, 1]).all()
    slots = clip["event_items"][:n]
    actions = clip["events"][:n] % 4
    np.testing.assert_array_equal(clip["events"][:n] // 4, clip["item_labels"][slots])
    assert (clip["events"][n:] == -1).all() and (clip["event_items"][n:] == -1).all()
    assert clip["label"] == demo.action_sequence_label(actions.tolist())
    assert demo.action_sequence(int(clip["label"])) == tuple(actions.tolist())


def test_event_order_matches_motion(clips):
  seen = set()
  for clip in clips:
    masks = clip["masks"]
    n = clip["event_mask"].sum()
    last_end = {}
    for k in range(n):
      slot, code, motion = clip["event_items"][k], clip["events"][k], clip["event_motion"][k]
      start, end = clip["event_frames"][k]
      action = code % 4
      seen.add(action)
      present = (masks == slot + 1).any(axis=(1, 2))
      first, final = masks[start] == slot + 1, masks[end - 1] == slot + 1
      if action in (_MOVE, _TURN):
        assert present[start:end].all()
      if action == _MOVE:
        shift = _centroid(final) - _centroid(first)
        # Resampling and the draw threshold move a mask centroid by about a pixel at most.
        np.testing.assert_allclose(shift, motion[:2] * SIZE, atol=1.5)
        assert np.linalg.norm(motion[:2]) >= 0.15 - 1e-6
      elif action == _TURN:
        assert np.linalg.norm(_centroid(final) - _centroid(first)) <= 1.5
        assert (first != final).sum() >= 2 and abs(motion[2]) >= np.pi / 4
      elif action == _APPEAR:  # Absent since the slot's previous event (it vanished) or frame 0.
        assert not present[last_end.get(slot, 0):start + 1].any()
        assert present[start + 1:end].all()
      else:  # Absent after the event, until the slot's next event (an appear) shows it again.
        later = [s for s, o in zip(clip["event_frames"][k + 1:n, 0], clip["event_items"][k + 1:n])
                 if o == slot]
        assert present[start:end - 1].all()
        assert not present[end - 1:(later[0] + 1 if later else FRAMES)].any()
      last_end[slot] = end
    untouched = set(range((clip["item_labels"] >= 0).sum())) - set(clip["event_items"][:n])
    for slot in untouched:  # Distractors stand still.
      assert ((masks == slot + 1) == (masks[:1] == slot + 1)).all()
  assert seen == {_APPEAR, _MOVE, _TURN, _VANISH}


def test_action_sequence_labels_are_a_bijection_sensitive_to_order():
  tuples = [t for n in range(1, demo.MAX_EVENTS + 1) for t in itertools.product(range(4), repeat=n)]
  labels = [demo.action_sequence_label(t) for t in tuples]
  assert sorted(labels) == list(range(demo.NUM_EVENT_LABELS))
  assert all(demo.action_sequence(label) == t for label, t in zip(labels, tuples))
  assert demo.action_sequence_label((_APPEAR, _VANISH)) != demo.action_sequence_label(
    (_VANISH, _APPEAR))
  with pytest.raises(ValueError, match="actions"):
    demo.action_sequence_label((0, 4))


def test_same_ordered_actions_give_the_same_label(clips):
  by_actions = {}
  for clip in clips:
    actions = tuple((clip["events"][clip["event_mask"]] % 4).tolist())
    by_actions.setdefault(actions, set()).add(int(clip["label"]))
  assert all(len(labels) == 1 for labels in by_actions.values())
  assert len({next(iter(v)) for v in by_actions.values()}) == len(by_actions) > 10


def test_grain_batches_records_and_sources_pickle():
  sources = demo.demo_splits("events", {"train": 8, "val": 4}, image_size=16, num_frames=4)
  assert len(sources["train"]) == 8 and sources["val"].split == "val"
  batch = next(iter(grain.MapDataset.source(sources["train"]).batch(4)))
  assert batch["frames"].shape == (4, 4, 16, 16, 3) and batch["event_frames"].shape == (4, 4, 2)
  np.testing.assert_array_equal(batch["frames"][2], sources["train"][2]["frames"])
  # Grain's worker processes receive the source pickled.
  copy = pickle.loads(pickle.dumps(sources["val"]))
  np.testing.assert_array_equal(copy[3]["masks"], sources["val"][3]["masks"])
