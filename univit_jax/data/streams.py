"""Variable Spatiotemporal Streams: one batched stream per frame count, mixed deterministically.

A bucket of T frames has a global batch of `tokens_per_batch // (T * tokens_per_frame)` clips, so
every step costs about the same number of tokens whatever its frame count (`data.bucket_tokens`
sets a budget per bucket instead, e.g. more images a step than the clips'). Each bucket reads the
records of the sources that feed it (an index range of the concatenated sources, never a
`filter`), decodes and augments them into examples of exactly T frames, and batches them; the
batched bucket streams are then mixed by weight. Mixing is a deterministic function of the step
and the weights, so every host emits the same bucket at the same step.

An example (before batching) is a dict:
  frames      float32 `[T, S, S, 3]` normalised
  frame_mask  bool `[T]`; False on frames repeated to pad a short clip
  id          int64; the record's position in the concatenation of all configured sources
  label       int32 (-1 when unknown)
  boxes       float32 `[R, 4]`, box_labels int32 `[R]`, box_mask bool `[R]`: only when a source
              has boxes (sources without get all-masked boxes)
  skipped     tuple of "path: reason" strings for records replaced because they were unreadable
`batch_examples` stacks them and adds `positions` float32 `[B, T * gh * gw, 3]` (U-RoPE
(t, h, w) of every patch token, from `positions.frame_times` / `positions.grid_positions`) and
`token_mask` bool `[B, T * gh * gw]` (the frame mask repeated over the frame's patches).
"""

import bisect
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from univit_jax import config_lib, positions
from univit_jax.data import sources as sources_lib
from univit_jax.data import transforms
from univit_jax.run_config import data_config

# A record whose decode fails is replaced by the next record of the same source; after this many
# failures in a row the source is deemed broken.
MAX_CONSECUTIVE_BAD = 16


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
  """How a record becomes an example of a bucket.

  Attributes:
    num_frames: T of the bucket.
    transform: crop / flip / jitter / normalisation settings.
    sampling: frame sampling of clips ("uniform" or "random_window").
    stride: frame step of "random_window".
    max_boxes: R, boxes kept per example; 0 when no source has boxes (no box fields).
  """
  num_frames: int
  transform: data_config.TransformConfig
  sampling: str = "uniform"
  stride: int = 2
  max_boxes: int = 0


class ExampleLoader:
  """Maps a global record index to an example (a grain random-map callable, picklable).

  The index runs over the concatenation of `sources`; `offsets[i]` is where source i starts.
  An unreadable record is replaced by the next index of the same source (wrapping), so the
  replacement is deterministic and stays eligible for the bucket; the replaced record's name (its
  path, its key, or its index in its source) and reason travel with the example in `skipped`. Any
  exception raised while reading or preparing one record counts as an unreadable record: a
  defect that hits every record still stops the run (MAX_CONSECUTIVE_BAD, `max_bad_fraction`).
  """

  def __init__(self, sources: Sequence[sources_lib.Source], cfg: ExampleConfig):
    self._sources = tuple(sources)
    self._offsets = np.cumsum([0] + [len(s) for s in self._sources]).tolist()
    self._cfg = cfg

  def __call__(self, index: int, rng: np.random.Generator | None) -> dict[str, Any]:
    index = int(index)
    s = bisect.bisect_right(self._offsets, index) - 1
    source, start = self._sources[s], self._offsets[s]
    skipped = []
    for attempt in range(MAX_CONSECUTIVE_BAD):
      local = (index - start + attempt) % len(source)
      try:
        example = self._example(source, local, rng)
      except sources_lib.BadRecordError as e:
        skipped.append(str(e))
        continue
      example["id"] = np.int64(start + local)
      example["skipped"] = tuple(skipped)
      return example
    raise sources_lib.BadRecordError(
      f"source {s} records {index - start}..{index - start + MAX_CONSECUTIVE_BAD - 1}",
      f"{MAX_CONSECUTIVE_BAD} unreadable records in a row; first ones: {skipped[:3]}")

  def _example(self, source: sources_lib.Source, local: int, rng: np.random.Generator | None
               ) -> dict[str, Any]:
    """The example of record `local` of `source`.

    Raises:
      BadRecordError: keyed by the record's path (file records), its key (ArrayRecord records) or
        its index in its source, for any failure of the source's reader, the decoder or the
        transforms on this record.
    """
    key = f"record {local} of {source!r}"
    try:
      record = source[local]
      key = str(record.get("path", record.get("key", key)))
      return self._load(record, rng)
    except sources_lib.BadRecordError as e:
      raise sources_lib.BadRecordError(key, e.reason) from e
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise sources_lib.BadRecordError(key, f"{type(e).__name__}: {e}") from e

  def _load(self, record: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
    cfg = self._cfg
    frames, frame_mask = sources_lib.load_clip(
      record, cfg.num_frames, cfg.sampling, cfg.stride, rng)
    boxes, box_labels, box_mask = _pad_boxes(record, cfg.max_boxes)
    frames, boxes, box_mask = transforms.apply(frames, boxes, box_mask, cfg.transform, rng)
    example = dict(frames=frames, frame_mask=frame_mask,
                   label=np.int32(record.get("label", -1)))
    if cfg.max_boxes:
      example.update(boxes=boxes, box_labels=box_labels, box_mask=box_mask)
    return example


def _pad_boxes(record: dict[str, Any], max_boxes: int):
  """Boxes `[R, 4]`, labels `[R]`, mask `[R]` of a record, truncated or zero-padded to R."""
  boxes = np.zeros((max_boxes, 4), np.float32)
  labels = np.zeros(max_boxes, np.int32)
  mask = np.zeros(max_boxes, bool)
  if max_boxes and "boxes" in record:
    src = np.asarray(record["boxes"], np.float32).reshape(-1, 4)[:max_boxes]
    n = len(src)
    boxes[:n] = src
    labels[:n] = np.asarray(record.get("box_labels", np.zeros(n)), np.int32)[:n]
    mask[:n] = np.asarray(record.get("box_mask", np.ones(n, bool)), bool)[:n]
  return boxes, labels, mask


def bucket_positions(num_frames: int, image_size: int, patch_size: int,
                     virtual_frames: int) -> np.ndarray:
  """The `[T * gh * gw, 3]` (t, h, w) positions every example of a T-frame bucket carries.

  A padded frame keeps its position (the token mask hides it), so shapes stay static.
  """
  grid = image_size // patch_size
  return positions.grid_positions(positions.frame_times(num_frames, virtual_frames), grid, grid)


class BatchBuilder:
  """Stacks examples of one bucket and adds U-RoPE positions and the token mask."""

  def __init__(self, num_frames: int, image_size: int, patch_size: int, virtual_frames: int):
    self._positions = bucket_positions(num_frames, image_size, patch_size, virtual_frames)
    self._patches = config_lib.tokens_per_frame(image_size, patch_size)

  def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "skipped"}
    batch["skipped"] = tuple(s for e in examples for s in e["skipped"])
    batch["positions"] = np.tile(self._positions[None], (len(examples), 1, 1))
    batch["token_mask"] = np.repeat(batch["frame_mask"], self._patches, axis=1)
    return batch
