"""Templated QA: questions agree with the demo records' ground truth, yes / no answers are
balanced, and the QA probe answers from the visual tokens (and only from them)."""

import numpy as np
import pytest

from univit_jax.data import demo
from univit_jax.evaluation import common, qa

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def objects():
  source = demo.DemoSource("objects", "train", num_examples=200, image_size=IMAGE_SIZE)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def events():
  source = demo.DemoSource("events", "train", num_examples=200, image_size=IMAGE_SIZE,
                           num_frames=8)
  return [source[i] for i in range(len(source))]


def ask(records, kind, seed=0):
  rng = np.random.default_rng(seed)
  return [(record, q) for record in records for q in qa.questions_for(record, kind, rng)]


def answer(q):
  return qa.ANSWERS[q.answer]


def test_image_questions_match_the_records(objects):
  for record, q in ask(objects, "objects"):
    words = q.text.split()
    visible = record["box_labels"][record["box_mask"]]
    if q.type == "count":
      assert answer(q) == str(record["box_mask"].sum())
    elif q.type == "exists":
      assert answer(q) == ("yes" if int(words[3]) in visible else "no")
    else:
      assert q.type == "left_of"
      a, b = int(words[2]), int(words[6])
      assert a != b and (visible == a).sum() == 1 and (visible == b).sum() == 1
      boxes = record["boxes"][record["box_mask"]]
      centre_x = (boxes[:, 1] + boxes[:, 3]) / 2
      assert answer(q) == ("yes" if centre_x[visible == a][0] < centre_x[visible == b][0]
                           else "no")


def test_clip_questions_match_the_records(events):
  forms = set()
  for record, q in ask(events, "events"):
    actions = [demo.ACTIONS[a] for a in demo.action_sequence(int(record["label"]))]
    words = q.text.split()
    if q.type == "first_action":
      assert answer(q) == actions[0]
    elif q.type == "after":
      k = actions.index(words[3])
      assert actions.count(words[3]) == 1 and answer(q) == actions[k + 1]
    else:
      assert q.type == "before"
      if words[1] == "the":  # "did the <d> <action> before the <e> <action> ?"
        codes = record["events"][record["event_mask"]].tolist()
        first = codes.index(int(words[2]) * 4 + demo.ACTIONS.index(words[3]))
        second = codes.index(int(words[6]) * 4 + demo.ACTIONS.index(words[7]))
        assert {words[3], words[7]} == {"appear", "vanish"}
      else:  # "did <action> happen before <action> ?"
        first, second = actions.index(words[1]), actions.index(words[4])
      forms.add(words[1] == "the")
      assert first != second and answer(q) == ("yes" if first < second else "no")
  assert forms == {True, False}


def test_questions_are_padded_and_closed(objects, events):
  for kind, records in (("objects", objects), ("events", events)):
    types = set()
    for _, q in ask(records[:50], kind):
      types.add(q.type)
      assert q.tokens.shape == (qa.MAX_QUESTION_LEN,) and q.tokens.dtype == np.int32
      length = int((q.tokens != qa.PAD_ID).sum())
      assert length and (q.tokens[length:] == qa.PAD_ID).all()
      assert 0 <= q.answer < len(qa.ANSWERS)
    assert types == set(qa.KIND_QUESTION_TYPES[kind])
  with pytest.raises(ValueError, match="kind"):
    qa.questions_for(objects[0], "items", np.random.default_rng(0))


@pytest.mark.parametrize("kind, types", [("objects", ("exists", "left_of")),
                                          ("events", ("before",))])
def test_yes_no_answers_are_balanced(kind, types, objects, events):
  questions = [q for _, q in ask(objects if kind == "objects" else events, kind)]
  for type_ in types:
    answers = [answer(q) for q in questions if q.type == type_]
    assert set(answers) == {"yes", "no"} and len(answers) >= 50, type_
    assert 0.4 <= answers.count("yes") / len(answers) <= 0.6, type_


def test_build_qa_split(objects):
  n, length, dim = 20, 5, 3
  tokens = np.random.default_rng(0).normal(size=(n, length, dim)).astype(np.float32)
  mask = np.arange(length) < np.arange(n)[:, None] % length + 1
  split = qa.build_qa_split(tokens, mask, objects[:n], "objects", seed=0, per_record=2)
  record = split.extra["record"]
  assert len(split) == 2 * n and np.array_equal(np.bincount(record), np.full(n, 2))
  np.testing.assert_array_equal(split.x, tokens[record])
  np.testing.assert_array_equal(split.extra["token_mask"], mask[record])
  assert split.extra["question"].shape == (2 * n, qa.MAX_QUESTION_LEN)
  for i in range(len(split)):  # Two different types per record.
    assert (split.extra["question_type"][record == record[i]] != split.extra["question_type"][i]
            ).sum() == 1
  again = qa.build_qa_split(tokens, None, objects[:n], "objects", seed=0, per_record=2)
  np.testing.assert_array_equal(again.extra["question"], split.extra["question"])
  assert again.extra["token_mask"].all()
  with pytest.raises(ValueError, match="records"):
    qa.build_qa_split(tokens[:3], None, objects[:n], "objects", seed=0)


def synthetic(n, seed, informative):
  """The `exists` questions about object records with 2-4 random digits, over tokens `[n, 5, 16]`.

  Item r's token holds 3 * one-hot of its digit (of a random digit unless `informative`) plus
  noise; the remaining tokens are masked padding holding one-hots of random digits, which would
  mislead a decoder that attended to them.
  """
  rng = np.random.default_rng(seed)
  records, tokens = [], rng.normal(scale=0.1, size=(n, 5, 16)).astype(np.float32)
  mask = np.zeros((n, 5), bool)
  for i in range(n):
    k = int(rng.integers(2, 5))
    labels = np.full(demo.MAX_ITEMS, -1, np.int32)
    labels[:k] = rng.integers(0, demo.NUM_CLASSES, size=k)
    corner = rng.uniform(0, 0.7, size=(demo.MAX_ITEMS, 2))
    boxes = np.concatenate([corner, corner + 0.25], axis=1).astype(np.float32)
    records.append({"box_labels": labels, "box_mask": labels >= 0, "boxes": boxes})
    shown = labels[:k] if informative else rng.integers(0, demo.NUM_CLASSES, size=k)
    tokens[i, np.arange(5), np.concatenate([shown, rng.integers(0, demo.NUM_CLASSES, 5 - k)])] += 3
    mask[i, :k] = True
  split = qa.build_qa_split(tokens, mask, records, "objects", seed=seed, per_record=3)
  return split.take(split.extra["question_type"] == qa.QUESTION_TYPES.index("exists"))


class OnceLoader:
  def __init__(self, split: common.Split):
    self.split, self.calls = split, 0

  def __call__(self) -> common.Split:
    self.calls += 1
    return self.split


@pytest.mark.parametrize("informative", [True, False])
@pytest.mark.slow
def test_probe_answers_from_the_tokens(informative):
  loader = OnceLoader(synthetic(300, seed=1, informative=informative))
  result = qa.qa_probe(synthetic(1000, seed=0, informative=informative), loader, epochs=15,
                       batch_size=32, lr=3e-3, width=32, depth=2)
  assert loader.calls == 1
  assert result.metric == "accuracy" and result.selected == {"lr": 3e-3}
  assert set(result.details["per_type"]) == {"exists"}
  assert result.details["per_type"]["exists"] == pytest.approx(result.value)
  majority = result.details["majority_per_type"]["exists"]
  assert 0.35 < majority < 0.65
  assert len(result.curves["train_loss"]) == 15
  if informative:
    assert result.value > 0.9
  else:
    assert abs(result.value - majority) < 0.15


@pytest.mark.slow
def test_probe_selects_lr_on_validation_and_reports_every_type(events):
  tokens = np.random.default_rng(0).normal(size=(len(events), 6, 8)).astype(np.float32)
  train = qa.build_qa_split(tokens[:150], None, events[:150], "events", seed=0)
  loader = OnceLoader(qa.build_qa_split(tokens[150:], None, events[150:], "events", seed=1))
  result = qa.qa_probe(train, loader, epochs=2, batch_size=32, lr=(1e-3, 3e-3), width=16,
                       depth=1)
  assert loader.calls == 1
  grid = result.curves["val_accuracy_vs_lr"]
  assert [lr for lr, _ in grid] == [1e-3, 3e-3]
  assert result.selected["lr"] == max(grid, key=lambda row: row[1])[0]
  assert result.val_value == max(acc for _, acc in grid)
  types = set(qa.KIND_QUESTION_TYPES["events"])
  assert set(result.details["per_type"]) == set(result.details["majority_per_type"]) == types
  assert sum(result.details["count_per_type"].values()) == len(loader.split)
