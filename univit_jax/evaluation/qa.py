"""Templated question answering over frozen visual tokens: the questions and the QA probe.

Questions are generated from the ground truth of the demo records (`univit_jax/data/demo.py`)
with fixed templates over a closed vocabulary, so a probe's accuracy measures what the frozen
tokens hold, not language modelling. Question types (`QUESTION_TYPES`):

  images (`"objects"` records):
    * `count`: "how many items are there ?" -> "2" .. "4" (the items visible in `box_mask`).
    * `exists`: "is there a <d> ?" -> yes / no, a fair coin choosing which, then a present or an
      absent digit.
    * `left_of`: "is the <a> left of the <b> ?" -> yes / no, by box centre x, for two items whose
      digits each occur once in the image (so "the <a>" names one item) and whose centres are at
      least `MIN_LEFT_OF_GAP` of the width apart; a fair coin picks the order of the two.
  clips (`"events"` records; an event's item is its digit, `events // 4`, its action
  `events % 4`):
    * `first_action`: "what happened first ?" -> the first event's action.
    * `after`: "what happened after <action> ?" -> the next event's action, for an action that
      happens once in the clip and is not the last event.
    * `before`: two events of the clip, asked in or against time order by a fair coin -> yes / no.
      An appear and a vanish are asked in the paper's style, naming the items: "did the <d>
      appear before the <e> vanish ?" (each event's (digit, action) must occur once in the clip);
      any other two actions in the generic form "did <x> happen before <y> ?" (each action must
      occur once in the clip).

Words and answers are closed vocabularies (`WORDS`, `ANSWERS`); a question is `[Q]` word ids,
`Q = MAX_QUESTION_LEN`, padded with `PAD_ID = 0`. Counts are answered with the digit words.

The probe (`qa_probe`) trains a small decoder on frozen tokens: the question's word embeddings
plus learned positions, after a learned answer query at position 0; `depth` pre-LN blocks of
self-attention over the question, cross-attention to the projected visual tokens (under
`token_mask`) and an MLP; the answer query's output scores the answer vocabulary.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from univit_jax import config_lib
from univit_jax.data import demo
from univit_jax.evaluation import common, metrics
from univit_jax.models import vit

QUESTION_TYPES = ("count", "exists", "left_of", "first_action", "after", "before")
KIND_QUESTION_TYPES = {
  "objects": ("count", "exists", "left_of"),
  "events": ("first_action", "after", "before"),
}
DIGITS = tuple(str(d) for d in range(demo.NUM_CLASSES))
PAD = "<pad>"
WORDS = (PAD, "?", "how", "many", "items", "are", "there", "is", "a", "the", "left", "of", "what",
         "happened", "first", "after", "did", "happen", "before") + DIGITS + demo.ACTIONS
PAD_ID = 0
ANSWERS = ("no", "yes") + DIGITS + demo.ACTIONS
MAX_QUESTION_LEN = 10
MIN_LEFT_OF_GAP = 0.05  # Of the image width: closer box centres make "left of" a coin toss.

_WORD_ID = {w: i for i, w in enumerate(WORDS)}
_ANSWER_ID = {a: i for i, a in enumerate(ANSWERS)}
_APPEAR, _VANISH = demo.ACTIONS.index("appear"), demo.ACTIONS.index("vanish")
_HEAD_DIM = 16


@dataclasses.dataclass(frozen=True)
class Question:
  """One templated question.

  Attributes:
    type: one of `QUESTION_TYPES`.
    tokens: int32 `[MAX_QUESTION_LEN]` word ids, padded with `PAD_ID`.
    answer: index into `ANSWERS`.
  """
  type: str
  tokens: np.ndarray
  answer: int

  @property
  def text(self) -> str:
    return decode(self.tokens)


def encode(words: Sequence[str]) -> np.ndarray:
  """Word ids `[MAX_QUESTION_LEN]` int32 of `words`, padded with `PAD_ID`.

  Raises:
    ValueError: for an unknown word or a question longer than `MAX_QUESTION_LEN`.
  """
  if len(words) > MAX_QUESTION_LEN:
    raise ValueError(f"question {' '.join(words)!r} is longer than {MAX_QUESTION_LEN} words")
  unknown = [w for w in words if w not in _WORD_ID or w == PAD]
  if unknown:
    raise ValueError(f"words {unknown} are not in the vocabulary")
  tokens = np.full(MAX_QUESTION_LEN, PAD_ID, np.int32)
  tokens[:len(words)] = [_WORD_ID[w] for w in words]
  return tokens


def decode(tokens: np.ndarray) -> str:
  """The words of `tokens [Q]`, padding dropped."""
  return " ".join(WORDS[t] for t in np.asarray(tokens) if t != PAD_ID)


def _question(type_: str, words: Sequence[str], answer: str) -> Question:
  return Question(type_, encode(words), _ANSWER_ID[answer])


def _yes_no(flag: bool) -> str:
  return "yes" if flag else "no"


def _image_questions(record: Mapping[str, np.ndarray],
                     rng: np.random.Generator) -> list[Question]:
  visible = np.asarray(record["box_mask"], bool)
  digits = np.asarray(record["box_labels"])[visible]
  boxes = np.asarray(record["boxes"])[visible]
  questions = [_question("count", ["how", "many", "items", "are", "there", "?"],
                         str(len(digits)))]

  present = sorted(set(digits.tolist()))
  absent = sorted(set(range(demo.NUM_CLASSES)) - set(present))
  ask_present = bool(present) and (not absent or rng.random() < 0.5)
  digit = int(rng.choice(present if ask_present else absent))
  questions.append(_question("exists", ["is", "there", "a", DIGITS[digit], "?"],
                             _yes_no(ask_present)))

  centre_x = (boxes[:, 1] + boxes[:, 3]) / 2
  single = [r for r in range(len(digits)) if np.sum(digits == digits[r]) == 1]
  pairs = [(r, s) for i, r in enumerate(single) for s in single[i + 1:]
           if abs(centre_x[r] - centre_x[s]) >= MIN_LEFT_OF_GAP]
  if pairs:
    r, s = pairs[rng.integers(len(pairs))]
    if rng.random() < 0.5:
      r, s = s, r
    questions.append(_question(
      "left_of", ["is", "the", DIGITS[digits[r]], "left", "of", "the", DIGITS[digits[s]], "?"],
      _yes_no(centre_x[r] < centre_x[s])))
  return questions


def _clip_questions(record: Mapping[str, np.ndarray],
                    rng: np.random.Generator) -> list[Question]:
  codes = np.asarray(record["events"])[np.asarray(record["event_mask"], bool)]
  if not len(codes):
    return []
  digits, actions = codes // len(demo.ACTIONS), codes % len(demo.ACTIONS)
  questions = [_question("first_action", ["what", "happened", "first", "?"],
                         demo.ACTIONS[actions[0]])]

  def once(values: np.ndarray, k: int) -> bool:
    return np.sum(values == values[k]) == 1

  followed = [k for k in range(len(codes) - 1) if once(actions, k)]
  if followed:
    k = followed[rng.integers(len(followed))]
    questions.append(_question(
      "after", ["what", "happened", "after", demo.ACTIONS[actions[k]], "?"],
      demo.ACTIONS[actions[k + 1]]))

  pairs = []
  for p in range(len(codes)):
    for q in range(p + 1, len(codes)):
      if {actions[p], actions[q]} == {_APPEAR, _VANISH}:
        if once(codes, p) and once(codes, q):
          pairs.append((p, q))
      elif actions[p] != actions[q] and once(actions, p) and once(actions, q):
        pairs.append((p, q))
  if pairs:
    p, q = pairs[rng.integers(len(pairs))]
    in_order = rng.random() < 0.5
    first, second = (p, q) if in_order else (q, p)
    first_action, second_action = demo.ACTIONS[actions[first]], demo.ACTIONS[actions[second]]
    if {actions[p], actions[q]} == {_APPEAR, _VANISH}:
      words = ["did", "the", DIGITS[digits[first]], first_action, "before",
               "the", DIGITS[digits[second]], second_action, "?"]
    else:
      words = ["did", first_action, "happen", "before", second_action, "?"]
    questions.append(_question("before", words, _yes_no(in_order)))
  return questions


def questions_for(record: Mapping[str, np.ndarray], kind: str,
                  rng: np.random.Generator) -> list[Question]:
  """Every question type of `kind` that `record` can answer unambiguously, one question each.

  Args:
    record: a demo record (see `univit_jax/data/demo.py` for its fields).
    kind: `"objects"` (image questions) or `"events"` (clip questions).
    rng: draws the asked digit, pair or action, and the yes / no coin.

  Returns:
    Questions in `QUESTION_TYPES` order; `count`, `exists` and `first_action` always apply
    (`first_action` once the clip has an event), the others only when the record has items or
    events that the template can name unambiguously.

  Raises:
    ValueError: for a kind without questions.
  """
  if kind == "objects":
    return _image_questions(record, rng)
  if kind == "events":
    return _clip_questions(record, rng)
  raise ValueError(f"kind={kind!r} has no questions; expected one of {list(KIND_QUESTION_TYPES)}")


def build_qa_split(records_tokens: np.ndarray, token_mask: np.ndarray | None,
                   records: Sequence[Mapping[str, np.ndarray]], kind: str, seed: int,
                   per_record: int = 2) -> common.Split:
  """Questions about `records` over their frozen tokens, as a split of M questions.

  Each record gets up to `per_record` of its `questions_for` questions (distinct types, drawn
  at random). The record's tokens are repeated once per question, so `x` holds about
  `per_record` copies of `records_tokens`: pass float32 tokens (they are not converted again)
  and keep `per_record` small for large token sets. `extra["record"]` maps each question back
  to its record.

  Args:
    records_tokens: `[N, L, D]` frozen tokens of the N records.
    token_mask: `[N, L]` bool, True for real tokens (None: all are real).
    records: the N records, in the order of `records_tokens`.
    kind: `"objects"` or `"events"`.
    seed: seeds the question draws.
    per_record: questions asked about each record, at most.

  Returns:
    `Split(x [M, L, D] float32, y [M] int32 answer ids, extra)` with extra `question [M, Q]`
    int32, `question_type [M]` int32 (indices into `QUESTION_TYPES`), `token_mask [M, L]` bool
    and `record [M]` int64.

  Raises:
    ValueError: for mismatched lengths, `per_record` < 1, or records without any question.
  """
  if len(records) != len(records_tokens):
    raise ValueError(f"{len(records)} records but {len(records_tokens)} token rows")
  if per_record < 1:
    raise ValueError(f"per_record={per_record} must be at least 1")
  rng = np.random.default_rng(seed)
  chosen, record_index = [], []
  for i in range(len(records)):
    questions = questions_for(records[i], kind, rng)
    take = rng.choice(len(questions), size=min(per_record, len(questions)), replace=False)
    chosen.extend(questions[j] for j in np.sort(take))
    record_index.extend([i] * len(take))
  if not chosen:
    raise ValueError(f"no {kind!r} question applies to any of the {len(records)} records")
  index = np.asarray(record_index, np.int64)
  if token_mask is None:
    token_mask = np.ones(records_tokens.shape[:2], bool)
  return common.Split(
    x=np.asarray(records_tokens, np.float32)[index],
    y=np.array([q.answer for q in chosen], np.int32),
    extra={
      "question": np.stack([q.tokens for q in chosen]),
      "question_type": np.array([QUESTION_TYPES.index(q.type) for q in chosen], np.int32),
      "token_mask": np.asarray(token_mask, bool)[index],
      "record": index,
    })


class _DecoderBlock(nnx.Module):
  """Pre-LN: x + self_attn(LN(x)), x + cross_attn(LN(x), visual), x + mlp(LN(x))."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.norm_self = nnx.LayerNorm(cfg.width, epsilon=1e-6, rngs=rngs)
    self.self_attn = vit.Attention(cfg, rngs=rngs)
    self.norm_cross = nnx.LayerNorm(cfg.width, epsilon=1e-6, rngs=rngs)
    self.cross_attn = vit.Attention(cfg, rngs=rngs)
    self.norm_mlp = nnx.LayerNorm(cfg.width, epsilon=1e-6, rngs=rngs)
    self.mlp = vit.Mlp(cfg, rngs=rngs)

  def __call__(self, x: jax.Array, visual: jax.Array, self_mask: jax.Array,
               cross_mask: jax.Array) -> jax.Array:
    y = self.norm_self(x)
    x = x + self.self_attn(y, y, self_mask)
    x = x + self.cross_attn(self.norm_cross(x), visual, cross_mask)
    return x + self.mlp(self.norm_mlp(x))


class QADecoder(nnx.Module):
  """Answers a question `[B, Q]` about frozen visual tokens `[B, L, D]` with answer logits."""

  def __init__(self, token_dim: int, width: int, depth: int, *, rngs: nnx.Rngs):
    """Builds the decoder.

    Args:
      token_dim: D, the width of the frozen tokens.
      width: the decoder's width, a multiple of 16 (heads of 16 channels).
      depth: number of decoder blocks.
      rngs: `rngs.params` draws the initialisation.
    """
    if width % _HEAD_DIM:
      raise ValueError(f"width={width} must be a multiple of {_HEAD_DIM}")
    cfg = config_lib.ModelConfig(width=width, depth=depth, num_heads=width // _HEAD_DIM,
                                 mlp_dim=4 * width, patch_size=1)
    init = nnx.initializers.normal(0.02)
    self.words = nnx.Embed(len(WORDS), width, embedding_init=init, rngs=rngs)
    self.answer_query = nnx.Param(init(rngs.params(), (1, width)))
    self.positions = nnx.Param(init(rngs.params(), (MAX_QUESTION_LEN + 1, width)))
    self.visual = nnx.Linear(token_dim, width, rngs=rngs)
    self.visual_norm = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
    self.blocks = nnx.List([_DecoderBlock(cfg, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, epsilon=1e-6, rngs=rngs)
    self.logits = nnx.Linear(width, len(ANSWERS), rngs=rngs)

  def __call__(self, tokens: jax.Array, token_mask: jax.Array,
               question: jax.Array) -> jax.Array:
    """Answer logits `[B, len(ANSWERS)]` float32.

    Args:
      tokens: `[B, L, D]` frozen visual tokens.
      token_mask: `[B, L]` bool, True for real tokens (at least one per example).
      question: `[B, Q]` word ids padded with `PAD_ID`.
    """
    batch, length = question.shape
    x = jnp.concatenate([jnp.broadcast_to(self.answer_query[...], (batch, 1, self.words.features)),
                         self.words(question)], axis=1) + self.positions[...][:length + 1]
    keys = jnp.concatenate([jnp.ones((batch, 1), bool), question != PAD_ID], axis=1)
    self_mask = jnp.broadcast_to(keys[:, None, :], (batch, length + 1, length + 1))
    cross_mask = jnp.broadcast_to(token_mask[:, None, :], (batch, length + 1, tokens.shape[1]))
    visual = self.visual_norm(self.visual(tokens))
    for block in self.blocks:
      x = block(x, visual, self_mask, cross_mask)
    return self.logits(self.norm(x[:, 0])).astype(jnp.float32)


@flax.struct.dataclass
class _TrainState:
  """The probe's train state.

  Attributes:
    step: int32 [] steps done.
    params: nnx.State of `QADecoder`.
    opt_state: the optax state of AdamW at unit rate.
    lr: float32 [] the peak learning rate (data, so every grid point shares one compilation).
  """
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  lr: jax.Array


def _batch(split: common.Split, index: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": split.x[index], "token_mask": split.extra["token_mask"][index],
          "question": split.extra["question"][index], "answer": split.y[index]}


def _predict(predict_fn: Callable, params: nnx.State, split: common.Split,
             batch_size: int) -> np.ndarray:
  """Answer ids `[N]` of `split`, in fixed-size batches (the last one padded by wrapping)."""
  out = []
  for start in range(0, len(split), batch_size):
    index = np.arange(start, start + batch_size) % len(split)
    out.append(np.asarray(predict_fn(params, _batch(split, index)))[:len(split) - start])
  return np.concatenate(out)


def _by_type(split: common.Split, values: np.ndarray) -> dict[int, np.ndarray]:
  types = split.extra["question_type"]
  return {int(t): values[types == t] for t in np.unique(types)}


def qa_probe(train: common.Split, test: common.TestLoader, *, epochs: int = 20,
             batch_size: int = 64, lr: float | Sequence[float] = (3e-4, 1e-3),
             weight_decay: float = 1e-4, val_fraction: float = 0.2, seed: int = 0,
             width: int = 64, depth: int = 2) -> common.ProbeResult:
  """Trains a small question-answering decoder on frozen tokens; exact-match accuracy.

  A validation split is carved from `train`; the decoder is trained on the rest for a fixed
  number of epochs (AdamW, cosine decay to zero, softmax cross-entropy) once per learning rate
  in `lr`, and the rate with the best validation accuracy after the last epoch is kept (no
  best-epoch picking, no refit on the validation part). Only then is `test()` called, once.

  Args:
    train: a split from `build_qa_split`: `x [N, L, D]` tokens, `y [N]` answer ids, extra
      `question [N, Q]`, `question_type [N]` and optionally `token_mask [N, L]`.
    test: returns the test split, of the same form.
    epochs: training epochs per learning rate; each reshuffles and drops the last partial batch.
    batch_size: examples per step (capped at the number of training examples).
    lr: one peak learning rate, or a grid to select from on validation.
    weight_decay: AdamW decay of the parameters with two or more axes (not biases, norm scales).
    val_fraction: fraction of `train` held out for validation.
    seed: seeds the validation carve-out, the initialisation and the batch order.
    width: decoder width (a multiple of 16).
    depth: decoder blocks.

  Returns:
    metric "accuracy" on test; `selected["lr"]`; `val_value` (validation accuracy);
    curves `val_accuracy_vs_lr` and `train_loss` (per epoch, selected rate); details `per_type`
    (test accuracy per question type), `majority_per_type` (test accuracy of each type's most
    frequent training answer) and `count_per_type` (test questions per type).

  Raises:
    ValueError: for `epochs` < 1, or a validation fraction that leaves a part empty.
  """
  if epochs < 1:
    raise ValueError(f"epochs={epochs} must be at least 1")
  lrs = (lr,) if isinstance(lr, (int, float)) else tuple(lr)

  def with_mask(split: common.Split) -> common.Split:
    if "token_mask" in split.extra:
      return split
    return common.Split(split.x, split.y,
                        {**split.extra, "token_mask": np.ones(split.x.shape[:2], bool)})

  train = with_mask(train)
  fit, val = common.carve_validation(train, val_fraction, seed)
  batch_size = min(batch_size, len(fit))
  steps_per_epoch = len(fit) // batch_size
  total_steps = epochs * steps_per_epoch
  with nnx.use_eager_sharding(False):
    graphdef, init_params = nnx.split(
      QADecoder(train.x.shape[-1], width, depth, rngs=nnx.Rngs(seed)))
  tx = optax.adamw(1.0, weight_decay=weight_decay,
                   mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))

  def logits_fn(params: nnx.State, batch: Mapping[str, jax.Array]) -> jax.Array:
    return nnx.merge(graphdef, params)(batch["tokens"], batch["token_mask"], batch["question"])

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state: _TrainState, batch: Mapping[str, jax.Array]
                 ) -> tuple[_TrainState, jax.Array]:
    def loss_fn(params):
      return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(params, batch), batch["answer"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    rate = state.lr * 0.5 * (1 + jnp.cos(jnp.pi * state.step / total_steps))
    updates = jax.tree.map(lambda u: rate * u, updates)
    return _TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state,
                       state.lr), loss

  @jax.jit
  def predict_fn(params: nnx.State, batch: Mapping[str, jax.Array]) -> jax.Array:
    return jnp.argmax(logits_fn(params, batch), axis=-1)

  runs = []
  for rate in lrs:
    params = jax.tree.map(jnp.copy, init_params)
    state = _TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                        jnp.asarray(rate, jnp.float32))
    order_rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
      order = order_rng.permutation(len(fit))
      epoch_loss = []
      for k in range(steps_per_epoch):
        state, loss = train_step(state, _batch(fit, order[k * batch_size:(k + 1) * batch_size]))
        epoch_loss.append(loss)
      losses.append(float(np.mean(jax.device_get(epoch_loss))))
    val_accuracy = metrics.accuracy(val.y, _predict(predict_fn, state.params, val, batch_size))
    runs.append((val_accuracy, rate, state.params, losses))
  best = max(range(len(runs)), key=lambda i: runs[i][0])  # The first of equal accuracies.
  val_accuracy, rate, params, losses = runs[best]

  test_split = with_mask(test())
  predictions = _predict(predict_fn, params, test_split, batch_size)
  correct = _by_type(test_split, predictions == test_split.y)
  test_answers = _by_type(test_split, test_split.y)
  train_answers = _by_type(train, train.y)
  return common.ProbeResult(
    metric="accuracy",
    value=metrics.accuracy(test_split.y, predictions),
    selected={"lr": rate},
    val_value=val_accuracy,
    curves={"val_accuracy_vs_lr": [[r[1], r[0]] for r in runs], "train_loss": losses},
    details={
      "per_type": {QUESTION_TYPES[t]: float(c.mean()) for t, c in correct.items()},
      "majority_per_type": {
        QUESTION_TYPES[t]: metrics.majority_rate(train_answers[t], answers)
        for t, answers in test_answers.items() if t in train_answers},
      "count_per_type": {QUESTION_TYPES[t]: int(len(c)) for t, c in correct.items()},
    })
