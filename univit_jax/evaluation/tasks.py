"""Evaluation tasks: held-out records with ground truth, and their frozen features per extractor.

A task names the records it reads (a `RecordSet`: records of one kind, a train and a test split)
and how to turn a record into a target. The demo record sets draw their probe-train records
from the demo's `train` digits with the evaluation seed (fresh placements, never the exact
records the encoder was trained on) and their test records from the `test` digits, which no
training stage sees. Other record sets come from any source of `univit_jax.data.sources`
(TFDS, image or video folders, manifests) with a `label` per record.

`EvalData` holds the records of every set once, and the features of each (extractor, set,
split) once: every probe of a run reads the same cached arrays.

Demo tasks (ground truth from `univit_jax.data.demo`):
  digit_class      items: the digit (10 classes).
  object_presence  objects: which digits are on the canvas (multi-label over 10).
  event_sequence   events: the ordered tuple of actions (`demo.action_sequence_label`).
  first_action     events: the first action (appear / move / turn / vanish).
  last_action      events: the last action.
  segmentation     objects: per-pixel class, 0 background, 1 + digit for item pixels.
The three event targets change when a clip runs backwards (appear <-> vanish, moves and turns
reverse), so a time-blind encoder cannot get them from content alone.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from univit_jax import config_lib
from univit_jax.data import demo
from univit_jax.data import sources as sources_lib
from univit_jax.data import transforms
from univit_jax.evaluation import common
from univit_jax.evaluation import features as features_lib
from univit_jax.run_config import stage_config

SPLITS = ("train", "test")
TASK_TYPES = ("multiclass", "multilabel", "dense")


@dataclasses.dataclass(frozen=True)
class RecordSet:
  """Records of one kind with a train and a test split.

  Attributes:
    name: e.g. "items", "objects", "events" (demo) or a configured dataset name.
    sources: split -> random-access source of records (`len`, `[i]`).
    num_frames: T frames fed to the encoder per record (1 for images; clips are sampled
      uniformly, the evaluation choice of `video.sample_indices`).
    image_size: frames are centre-cropped and resized to this side.
  """
  name: str
  sources: Mapping[str, Any]
  num_frames: int
  image_size: int


@dataclasses.dataclass(frozen=True)
class Task:
  """A target over the records of a set.

  Attributes:
    name: column name, e.g. "first_action".
    records: the `RecordSet.name` it reads.
    type: "multiclass" (int `[N]`), "multilabel" ({0, 1} `[N, C]`) or "dense" (int `[N, T, H, W]`
      per-pixel classes).
    num_classes: C.
    target: record -> target of one example.
    description: one line for tables.
    temporal: the target changes under time reversal (a temporal probe).
  """
  name: str
  records: str
  type: str
  num_classes: int
  target: Callable[[Mapping[str, Any]], Any]
  description: str
  temporal: bool = False


def _presence(record: Mapping[str, Any]) -> np.ndarray:
  hot = np.zeros(demo.NUM_CLASSES, np.int32)
  hot[record["box_labels"][record["box_mask"]]] = 1
  return hot


def _pixel_classes(record: Mapping[str, Any]) -> np.ndarray:
  masks = np.asarray(record["masks"])  # [T, S, S]: 0 background, r + 1 for item slot r
  lookup = np.concatenate([[0], np.asarray(record["item_labels"]) + 1]).astype(np.int32)
  return lookup[masks]


def _action(position: int) -> Callable[[Mapping[str, Any]], int]:
  return lambda record: demo.action_sequence(int(record["label"]))[position]


DEMO_TASKS = (
  Task("digit_class", "items", "multiclass", demo.NUM_CLASSES, lambda r: int(r["label"]),
       "the digit of a single-item image"),
  Task("object_presence", "objects", "multilabel", demo.NUM_CLASSES, _presence,
       "which digits a multi-object image holds"),
  Task("event_sequence", "events", "multiclass", demo.NUM_EVENT_LABELS,
       lambda r: int(r["label"]), "the ordered actions of a clip", temporal=True),
  Task("first_action", "events", "multiclass", len(demo.ACTIONS), _action(0),
       "a clip's first action", temporal=True),
  Task("last_action", "events", "multiclass", len(demo.ACTIONS), _action(-1),
       "a clip's last action", temporal=True),
  Task("segmentation", "objects", "dense", demo.NUM_CLASSES + 1, _pixel_classes,
       "per-pixel digit class (background a class)"),
)


def demo_record_sets(image_size: int, clip_frames: int, num_train: int, num_test: int,
                     seed: int) -> dict[str, RecordSet]:
  """The demo's items, objects and events, train records from the train digits, test from test."""
  sets = {}
  for kind in demo.DEMO_KINDS:
    frames = clip_frames if kind == "events" else 1
    sets[kind] = RecordSet(kind, {
      split: demo.DemoSource(kind, split, num_examples=n, image_size=image_size,
                             num_frames=clip_frames, seed=seed)
      for split, n in (("train", num_train), ("test", num_test))}, frames, image_size)
  return sets


def dataset_record_set(name: str, spec: Mapping[str, Any], image_size: int) -> RecordSet:
  """A labelled classification set from `config.eval.datasets.<name>`: `train` and `test` are
  source specs of `univit_jax.data.sources` (e.g. TFDS splits, image or video folders) and
  `frames` the frames per example (1 for images)."""
  sources = {split: sources_lib.build_source(config_lib.SourceSpec.from_dict(
    f"{name}_{split}", dict(spec[split]))) for split in SPLITS}
  return RecordSet(name, sources, int(spec.get("frames", 1)), image_size)


def dataset_task(name: str, spec: Mapping[str, Any]) -> Task:
  return Task(name, name, "multiclass", int(spec["num_classes"]), lambda r: int(r["label"]),
              spec.get("description", f"{name} classification"))


def eval_frames(record: Mapping[str, Any], num_frames: int, image_size: int) -> np.ndarray:
  """uint8 `[T, S, S, 3]` of a record: T uniformly sampled frames, centre square, resized.

  The same geometry as the pipeline's evaluation transform; the encoder normalises.
  """
  frames, _ = sources_lib.load_clip(record, num_frames, "uniform", 1, None)
  frames = transforms.to_rgb(frames)
  top, left, h, w = transforms.center_square(*frames.shape[1:3])
  return transforms.resize(frames[:, top:top + h, left:left + w], image_size, image_size)


@dataclasses.dataclass
class Features:
  """Features of one split under one extractor (see `features.FeatureExtractor`)."""
  embedding: np.ndarray
  mean_tokens: np.ndarray
  tokens: np.ndarray
  grid: tuple[int, int, int]


class EvalData:
  """Records and cached features of every record set of an evaluation.

  Records are read once per (set, split); features once per (extractor name, set, split,
  reversed), so all probes share them.
  """

  def __init__(self, record_sets: Mapping[str, RecordSet], batch_size: int = 64):
    self.record_sets = dict(record_sets)
    self.batch_size = batch_size
    self._records: dict[tuple[str, str], list[dict]] = {}
    self._frames: dict[tuple[str, str], np.ndarray] = {}
    self._features: dict[tuple[str, str, str, bool], Features] = {}

  def records(self, set_name: str, split: str) -> list[dict]:
    key = (set_name, split)
    if key not in self._records:
      source = self.record_sets[set_name].sources[split]
      self._records[key] = [source[i] for i in range(len(source))]
    return self._records[key]

  def frames(self, set_name: str, split: str) -> np.ndarray:
    """uint8 `[N, T, S, S, 3]` model input of a split."""
    key = (set_name, split)
    if key not in self._frames:
      rs = self.record_sets[set_name]
      self._frames[key] = np.stack([eval_frames(r, rs.num_frames, rs.image_size)
                                    for r in self.records(set_name, split)])
    return self._frames[key]

  def features(self, extractor: features_lib.FeatureExtractor, set_name: str, split: str,
               reverse_time: bool = False) -> Features:
    """Features of a split (with `reverse_time`, of every clip played backwards)."""
    key = (extractor.name, set_name, split, reverse_time)
    if key not in self._features:
      frames = self.frames(set_name, split)
      if reverse_time:
        frames = frames[:, ::-1]
      parts = [extractor(frames[i:i + self.batch_size])
               for i in range(0, len(frames), self.batch_size)]
      self._features[key] = Features(
        **{k: np.concatenate([p[k] for p in parts]) for k in ("embedding", "mean_tokens",
                                                              "tokens")},
        grid=extractor.grid(*frames.shape[1:4]))
    return self._features[key]

  def forget(self, extractor_name: str) -> None:
    """Drops the cached features of one extractor (records stay)."""
    for key in [k for k in self._features if k[0] == extractor_name]:
      del self._features[key]

  def targets(self, task: Task, split: str) -> np.ndarray:
    return np.stack([np.asarray(task.target(r)) for r in self.records(task.records, split)])

  def split(self, extractor: features_lib.FeatureExtractor, task: Task, split: str,
            field: str = "embedding") -> common.Split:
    """A probe's `common.Split`: features `field` of `task`'s records and their targets."""
    feats = self.features(extractor, task.records, split)
    return common.Split(np.asarray(getattr(feats, field)), self.targets(task, split))


def demo_eval_data(eval_cfg: stage_config.EvalConfig, image_size: int) -> EvalData:
  """The demo's record sets plus any `eval.datasets`, sized by `eval.num_train` / `num_test`."""
  sets = demo_record_sets(image_size, eval_cfg.clip_frames, eval_cfg.num_train,
                          eval_cfg.num_test, eval_cfg.seed) if eval_cfg.demo else {}
  for name, spec in eval_cfg.datasets:
    sets[name] = dataset_record_set(name, spec, image_size)
  return EvalData(sets, eval_cfg.batch_size)


def tasks_for(eval_cfg: stage_config.EvalConfig) -> tuple[Task, ...]:
  """The demo tasks (when `eval.demo`) and one classification task per `eval.datasets` entry."""
  tasks = DEMO_TASKS if eval_cfg.demo else ()
  return tasks + tuple(dataset_task(name, spec) for name, spec in eval_cfg.datasets)

