"""What every probe shares: a split of frozen features and targets, the validation carve-out, and
the rule that the test split is read once, after every selection is made.

A probe is a function `probe(train, test, cfg) -> ProbeResult`. `train` is a `Split`; `test` is
a zero-argument callable returning a `Split`, which the probe calls exactly once, after it has
carved its validation split from `train`, selected its hyper-parameters on it and fitted its
final model. Nothing the probe selects can therefore depend on the test split (the tests check
this by handing over a test loader that fails if called early, and by permuting test labels).
"""

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Split:
  """Frozen features and targets of one split (N examples).

  Attributes:
    x: float32 features: `[N, D]` pooled embeddings, or `[N, L, D]` tokens.
    y: targets: int `[N]` class ids (multiclass); `{0, 1}` `[N, C]` (multilabel); int `[N, H, W]`
      per-pixel class ids (dense), or any per-example target a probe documents.
    extra: further per-example arrays a probe needs, each with leading dimension N (e.g.
      `token_mask [N, L]`, `question [N, Q]`, `question_type [N]`); shared settings such as the
      token grid belong in the probe's arguments.
  """
  x: np.ndarray
  y: np.ndarray
  extra: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    n = len(self.x)
    if len(self.y) != n:
      raise ValueError(f"Split: x has {n} examples, y has {len(self.y)}")
    for key, value in self.extra.items():
      if len(value) != n:
        raise ValueError(f"Split: x has {n} examples, extra[{key!r}] has {len(value)}")

  def __len__(self) -> int:
    return len(self.x)

  def take(self, index: np.ndarray) -> "Split":
    """The examples at `index` (an int array or a bool mask), as a new split."""
    return Split(self.x[index], self.y[index], {k: v[index] for k, v in self.extra.items()})


TestLoader = Callable[[], Split]


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
  """Splits `train` into (fit, validation) by a seeded permutation; `fraction` goes to validation.

  Raises:
    ValueError: if either part would be empty.
  """
  n = len(train)
  n_val = int(round(n * fraction))
  if not 0 < n_val < n:
    raise ValueError(
      f"validation fraction {fraction} of {n} training examples leaves an empty part")
  order = np.random.default_rng(seed).permutation(n)
  return train.take(np.sort(order[n_val:])), train.take(np.sort(order[:n_val]))


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of shuffled `(index [B], valid [B])` for probes trained by minibatches; the last
  batch is padded with index 0 marked invalid, so every step has one shape."""
  order = rng.permutation(n)
  for start in range(0, n, batch_size):
    index = order[start:start + batch_size]
    valid = np.ones(batch_size, bool)
    valid[len(index):] = False
    yield np.pad(index, (0, batch_size - len(index))), valid


def cosine_schedule(peak: float, total_steps: int) -> np.ndarray:
  """Learning rate of each step `[total_steps]`: cosine decay from `peak` to 0, no warm-up."""
  return peak * 0.5 * (1 + np.cos(np.pi * np.arange(total_steps) / total_steps))


@dataclasses.dataclass
class ProbeResult:
  """What a probe reports.

  Attributes:
    metric: the name of the headline metric (e.g. "accuracy", "mean_auc", "miou").
    value: its value on the test split.
    selected: hyper-parameters chosen on validation (e.g. {"l2": 1e-3}).
    val_value: the headline metric on validation for the selected setting.
    curves: named series for plots, e.g. {"val_accuracy_vs_l2": [[l2, acc], ...],
      "train_loss": [...]}; JSON-serialisable lists only.
    details: further JSON-serialisable numbers (per-class values, per-question-type accuracy,
      a confusion matrix as nested lists under "confusion", "class_names").
  """
  metric: str
  value: float
  selected: dict[str, Any] = dataclasses.field(default_factory=dict)
  val_value: float | None = None
  curves: dict[str, list] = dataclasses.field(default_factory=dict)
  details: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
