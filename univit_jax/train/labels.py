"""Cluster pseudo-labels for training batches, attached to records by their stable key.

The cluster stage writes, per bank, `clusters/<bank>/{centroids.npy, labels.npy [N, k],
ids.npy [N, 2], keys.npy [N], stats.json}` (`univit_jax/clustering/labels.py`). Row j of
`labels.npy` holds the top-k clusters of the feature of record `keys[j]` (`pipeline.example_keys`:
`<source name>/<record key>`) and sub-index `ids[j, 1]`. Bank conventions:
  object     sub = -1: the whole image; sub = r: region (box) r of the image.
  event_<g>  sub = s: temporal segment s of the clip cut into g ordered segments (g = 1: the clip).
`load_bank` translates the keys into this run's example ids (the batch's `id`), so a record gets
exactly its own labels even when records were added, removed or reordered since extraction; a
record whose key has no labels gets none (masked as padding is), and too many such records
refuse the bank (`train.max_unlabelled_fraction`). Sources that number their records (TFDS, the
demo: `sources.names_records` is False) have keys that are indices, so for them the labels must
have been made for the same source (`check_sources`).

`LabelAttacher` adds to a host batch (B examples of one T-frame bucket):
  labels_global          int32 [B, kg] the clip / image embedding's labels: the clip's `event_1`
                                       row when the example is a clip; for an image, with
                                       `image_labels="objects"` the set of its valid regions' top-1
                                       `object` clusters (kg = max(k, R) then), falling back to
                                       the whole-image row when it has none; with "whole" the
                                       whole-image row; -1 padding
  global_bank            int32 [B]     which bank those labels index: 0 = object, 1 = event_1,
                                       -1 = no label (the row is ignored)
  labels_segments_<g>    int32 [B, g, k], segments_valid_<g> bool [B, g]: the `event_g` rows, for
                                       every event bank with 2 <= g <= T
  labels_regions         int32 [B, R, k], regions_valid bool [B, R]: the `object` region rows, for
                                       batches with boxes; invalid where the box is masked
k is the largest top-k over the banks; banks with fewer labels are padded with -1.
"""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from univit_jax import provenance, specs
from univit_jax.clustering import labels as cluster_labels
from univit_jax.data import pipeline
from univit_jax.data import sources as sources_lib
from univit_jax.run_config import data_config

GLOBAL_BANKS = (specs.OBJECT_BANK, specs.event_bank_name(1))
_SUB_SPAN = 1 << 20  # sub + 1 fits below this; ids below 2**43


class LabelError(ValueError):
  """Cluster outputs that training cannot use; the message names the bank and file."""


@dataclasses.dataclass(frozen=True)
class Examples:
  """The run's examples that labels are attached to (`examples_of`).

  Attributes:
    keys: bytes [E], the stable key of each example id (`pipeline.example_keys`).
    clips: bool [E], whether the example is a clip (labelled by the event banks) rather than an
      image (labelled by the object bank).
    sources: `pipeline.sources_fingerprint` of the data.
  """
  keys: np.ndarray
  clips: np.ndarray
  sources: Mapping[str, Any]


def examples_of(cfg: data_config.DataConfig, opened: Mapping[str, sources_lib.Source]
                ) -> Examples:
  """The `Examples` of the configured sources (`pipeline.open_sources`)."""
  return Examples(
    keys=pipeline.example_keys(cfg, opened),
    clips=np.concatenate([np.full(len(opened[spec.name]), spec.is_video) for spec in cfg.sources]),
    sources=pipeline.sources_fingerprint(cfg, opened))


@dataclasses.dataclass(frozen=True)
class BankLabels:
  """One bank's centroids and its (example id, sub) -> top-k labels table.

  Attributes:
    name: bank name.
    centroids: float32 [K, D].
    keys: int64 [N] sorted combined keys id * _SUB_SPAN + sub + 1 (this run's example ids).
    labels: int32 [N, k] in key order.
    version: the cluster stage's version id of these outputs.
    teacher: the feature extractor named in stats.json ("" when not recorded).
    unlabelled: records of the bank's kind (images or clips) whose key has no labels.
  """
  name: str
  centroids: np.ndarray
  keys: np.ndarray
  labels: np.ndarray
  version: str
  teacher: str = ""
  unlabelled: int = 0

  @property
  def num_classes(self) -> int:
    return self.centroids.shape[0]

  @property
  def top_k(self) -> int:
    return self.labels.shape[1]

  def lookup(self, ids: np.ndarray, subs: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of rows (ids[b], subs[s]): `[B, S, k]` int32 (-1 when absent) and found `[B, S]`."""
    query = np.asarray(ids, np.int64)[:, None] * _SUB_SPAN + np.asarray(subs, np.int64)[None] + 1
    pos = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
    found = self.keys[pos] == query
    out = np.full(query.shape + (k,), -1, np.int32)
    out[..., :self.top_k] = np.where(found[..., None], self.labels[pos], -1)
    return out, found


def match_keys(row_keys: np.ndarray, example_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Pairs every example with the stored rows of its key.

  Args:
    row_keys: bytes [N], the record key of each stored row (`clusters/<bank>/keys.npy`).
    example_keys: bytes [E], this run's key of each example id (`pipeline.example_keys`).

  Returns:
    (example ids, rows): int64 [M] each, one pair per (example, row) whose keys are equal; a key
    listed twice in the data (a file named twice) gets the rows of its key for each id.
  """
  order = np.argsort(row_keys, kind="stable")
  ordered = row_keys[order]
  lo = np.searchsorted(ordered, example_keys, side="left")
  counts = np.searchsorted(ordered, example_keys, side="right") - lo
  ids = np.repeat(np.arange(len(example_keys), dtype=np.int64), counts)
  starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
  return ids, order[starts + np.arange(len(ids))].astype(np.int64)


def load_bank(clusters_workdir: str, bank: str, examples: Examples,
              max_unlabelled_fraction: float) -> BankLabels:
  """Reads and checks one bank's cluster outputs under `clusters_workdir/clusters/<bank>/`, with
  their rows keyed by this run's example ids (`match_keys`).

  Raises:
    LabelError: naming the bank and folder: labels of a source that numbers its records made
      for another such source (`check_sources`); more than `max_unlabelled_fraction` of the
      records of the bank's kind without labels (naming the counts and a few keys); missing
      files, inconsistent shapes, labels outside [0, K), subs out of range or non-finite
      centroids.
  """
  where = cluster_labels.clusters_dir(clusters_workdir, bank)
  try:
    out = cluster_labels.load_clusters(clusters_workdir, bank)
  except (FileNotFoundError, OSError) as e:
    raise LabelError(f"bank {bank!r}: cannot read cluster outputs in {where}: {e} (outputs of "
                     "an older version have no keys.npy: cluster again)") from e
  centroids, labels, ids, row_keys = out["centroids"], out["labels"], out["ids"], out["keys"]
  version = out["stats"].get("version")
  if not version:
    raise LabelError(f"bank {bank!r}: {where}/stats.json has no 'version'")
  check_sources(bank, where, out["stats"], examples.sources)
  if centroids.ndim != 2 or not np.all(np.isfinite(centroids)):
    raise LabelError(f"bank {bank!r}: {where}/centroids.npy must be finite [K, D], "
                     f"got shape {centroids.shape}")
  if (labels.ndim != 2 or ids.shape != (labels.shape[0], 2) or
      row_keys.shape != (labels.shape[0],) or row_keys.dtype.kind != "S"):
    raise LabelError(f"bank {bank!r}: labels.npy {labels.shape}, ids.npy {ids.shape} and "
                     f"keys.npy {row_keys.dtype} {row_keys.shape} in {where} must be [N, k], "
                     "[N, 2] and bytes [N]")
  if labels.size and (labels.min() < 0 or labels.max() >= centroids.shape[0]):
    raise LabelError(f"bank {bank!r}: labels.npy in {where} has ids outside [0, "
                     f"{centroids.shape[0]}) (the number of centroids)")
  subs = np.asarray(ids[:, 1], np.int64)
  if subs.size and (subs.min() < -1 or subs.max() >= _SUB_SPAN - 1):
    raise LabelError(f"bank {bank!r}: ids.npy in {where} has sub-indices out of range")
  example_ids, rows = match_keys(np.asarray(row_keys), examples.keys)
  unlabelled = _unlabelled(bank, where, examples, example_ids, max_unlabelled_fraction)
  # One row per (example, sub): a record extracted twice (a file named twice) has equal rows.
  keys, first = np.unique(example_ids * _SUB_SPAN + subs[rows] + 1, return_index=True)
  return BankLabels(name=bank, centroids=centroids.astype(np.float32), keys=keys,
                    labels=np.asarray(labels)[rows[first]].astype(np.int32),
                    version=str(version), teacher=str(out["stats"].get("teacher", "")),
                    unlabelled=unlabelled)


def _unlabelled(bank: str, where: str, examples: Examples, labelled: np.ndarray,
                max_fraction: float) -> int:
  """How many examples of the bank's kind (clips for event banks, images for the object bank)
  have no labelled row; logged, and refused above `max_fraction`.

  Raises:
    LabelError: naming the bank, `where`, the counts and a few of the keys.
  """
  kind = examples.clips if specs.event_granularity(bank) is not None else ~examples.clips
  missing = kind.copy()
  missing[labelled] = False
  count, total = int(missing.sum()), int(kind.sum())
  if not count:
    return 0
  names = [k.decode() for k in examples.keys[missing][:3]]
  what = "clip" if specs.event_granularity(bank) is not None else "image"
  message = (f"bank {bank!r}: {count} of the {total} {what} records of the data "
             f"({count / total:.1%}) have no labels in {where}, e.g. {names}: records added or "
             "renamed since the features were extracted, or unreadable then")
  if count > max_fraction * total:
    raise LabelError(
      f"{message}; more than train.max_unlabelled_fraction={max_fraction}. Extract and "
      "cluster again for this data (in a new workdir), or raise train.max_unlabelled_fraction "
      "to train them without cluster labels")
  logging.warning("%s; they train without this bank's labels", message)
  return count


def check_sources(bank: str, where: str, stats: Mapping[str, Any],
                  sources: Mapping[str, Any]) -> None:
  """Refuses cluster outputs (their `stats.json`) made for another version of a source that
  numbers its records (a fingerprint entry without `content`: TFDS, the demo), whose keys are
  indices and would name other records. Other changes (records added, removed or reordered in a
  source that names its records, sources added or removed) are logged: labels follow the keys.

  Raises:
    LabelError: naming the bank, its folder `where` and what changed.
  """
  recorded = (stats.get("inputs") or {}).get("data", {}).get("sources")
  changed = provenance.differences(recorded, sources, "data.sources")
  if not changed:
    return
  numbered = [name for name in sorted(sources) if "content" not in sources[name]
              and isinstance(recorded, Mapping) and name in recorded
              and provenance.differences(recorded[name], sources[name])]
  if numbered or not isinstance(recorded, Mapping):
    raise LabelError(
      f"bank {bank!r}: the labels in {where} were made for other data than the config now "
      f"gives: {'; '.join(changed)}; the sources {numbered} number their records, so their "
      "keys would name other records. Extract and cluster again in a new workdir (or delete "
      "its features/ and clusters/)")
  logging.warning("bank %r: the labels in %s were made for other data (%s); they are attached "
                  "by record key", bank, where, "; ".join(changed))


def load_banks(clusters_workdir: str, names: Sequence[str], examples: Examples,
               max_unlabelled_fraction: float) -> dict[str, BankLabels]:
  """Every named bank (see `load_bank`).

  Raises:
    LabelError: as `load_bank`, or when no bank is named.
  """
  if not names:
    raise LabelError("no bank to train on: give some bank a positive loss.bank_weights entry")
  return {name: load_bank(clusters_workdir, name, examples, max_unlabelled_fraction)
          for name in names}


def segment_granularities(banks: Iterable[str], num_frames: int) -> tuple[int, ...]:
  """Event granularities g with 2 <= g <= T that have a bank (of these names, or keys): the
  segment terms of a bucket."""
  return tuple(sorted(g for g in map(specs.event_granularity, banks)
                      if g is not None and 2 <= g <= num_frames))


def global_width(top_k: int, num_boxes: int | None, image_labels: str) -> int:
  """kg, the width of `labels_global` for `top_k` labels per row: room for one label per region
  when images take theirs."""
  return max(top_k, num_boxes or 0) if image_labels == "objects" else top_k


def object_set(regions: np.ndarray, valid: np.ndarray, width: int) -> np.ndarray:
  """The distinct top-1 clusters of each example's valid regions, `[B, width]`, -1 padded."""
  out = np.full((regions.shape[0], width), -1, np.int32)
  for b in range(regions.shape[0]):
    distinct = np.unique(regions[b, valid[b], 0])
    out[b, :len(distinct)] = distinct
  return out


class LabelAttacher:
  """Adds the label fields of the module docstring to a host batch (a grain map transform)."""

  def __init__(self, banks: Mapping[str, BankLabels], image_labels: str = "objects"):
    self._banks = dict(banks)
    self.top_k = max(b.top_k for b in self._banks.values())
    self.image_labels = image_labels

  def _rows(self, bank: str, ids: np.ndarray, subs: Sequence[int]
            ) -> tuple[np.ndarray, np.ndarray]:
    if bank not in self._banks:
      return (np.full((len(ids), len(subs), self.top_k), -1, np.int32),
              np.zeros((len(ids), len(subs)), bool))
    return self._banks[bank].lookup(ids, subs, self.top_k)

  def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    ids = np.asarray(batch["id"], np.int64)
    clip, is_clip = self._rows(GLOBAL_BANKS[1], ids, (0,))
    image, is_image = self._rows(GLOBAL_BANKS[0], ids, (-1,))
    is_clip = is_clip[:, 0]
    num_boxes = batch["boxes"].shape[1] if "boxes" in batch else None
    width = global_width(self.top_k, num_boxes, self.image_labels)
    image = _pad(image[:, 0], width)
    if num_boxes is not None:
      rows, found = self._rows(specs.OBJECT_BANK, ids, range(num_boxes))
      batch["labels_regions"] = rows
      batch["regions_valid"] = found & np.asarray(batch["box_mask"], bool)
      if self.image_labels == "objects":
        has_regions = batch["regions_valid"].any(axis=1)
        image = np.where(has_regions[:, None],
                         object_set(rows, batch["regions_valid"], width), image)
        is_image = is_image | has_regions[:, None]
    is_image = is_image[:, 0] & ~is_clip
    batch["labels_global"] = np.where(is_clip[:, None], _pad(clip[:, 0], width), image)
    batch["global_bank"] = np.where(is_clip, 1, np.where(is_image, 0, -1)).astype(np.int32)
    for g in segment_granularities(self._banks, batch["frames"].shape[1]):
      rows, found = self._rows(specs.event_bank_name(g), ids, range(g))
      batch[f"labels_segments_{g}"], batch[f"segments_valid_{g}"] = rows, found
    return batch


def _pad(labels: np.ndarray, width: int) -> np.ndarray:
  """`[B, k]` labels padded with -1 to `[B, width]`."""
  return np.pad(labels, ((0, 0), (0, width - labels.shape[1])), constant_values=-1)


def label_shapes(banks: Sequence[str], top_k: int, num_frames: int, batch_size: int,
                 num_boxes: int | None, image_labels: str = "objects"
                 ) -> dict[str, tuple[tuple[int, ...], Any]]:
  """(shape, dtype) of the fields `LabelAttacher` adds to a batch of one bucket, for banks of
  these names whose largest top-k is `top_k` (`LabelAttacher.top_k`): known before any label is
  read, so a step compiles from the config alone."""
  shapes = dict(labels_global=((batch_size, global_width(top_k, num_boxes, image_labels)),
                               np.int32),
                global_bank=((batch_size,), np.int32))
  for g in segment_granularities(banks, num_frames):
    shapes[f"labels_segments_{g}"] = ((batch_size, g, top_k), np.int32)
    shapes[f"segments_valid_{g}"] = ((batch_size, g), np.bool_)
  if num_boxes:
    shapes["labels_regions"] = ((batch_size, num_boxes, top_k), np.int32)
    shapes["regions_valid"] = ((batch_size, num_boxes), np.bool_)
  return shapes
