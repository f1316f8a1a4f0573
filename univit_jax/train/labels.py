"""Cluster pseudo-labels for training batches, looked up by example id.

The cluster stage writes, per bank, `clusters/<bank>/{centroids.npy, labels.npy [N, k],
ids.npy [N, 2], stats.json}` (`univit_jax/clustering/labels.py`). Row j of `labels.npy` holds
the top-k clusters of the feature whose (example id, sub) is `ids[j]`. Bank conventions:
  object     sub = -1: the whole image; sub = r: region (box) r of the image.
  event_<g>  sub = s: temporal segment s of the clip cut into g ordered segments (g = 1: the clip).
The example id is the batch's `id` (the record's position over all configured sources), the same
id extraction used; `load_bank` refuses labels whose stats.json records other data sources
(`pipeline.sources_fingerprint`), for which the same id names another record.

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

from univit_jax import provenance, specs
from univit_jax.clustering import labels as cluster_labels

GLOBAL_BANKS = (specs.OBJECT_BANK, specs.event_bank_name(1))
_SUB_SPAN = 1 << 20  # sub + 1 fits below this; ids below 2**43


class LabelError(ValueError):
  """Cluster outputs that training cannot use; the message names the bank and file."""


@dataclasses.dataclass(frozen=True)
class BankLabels:
  """One bank's centroids and its (example id, sub) -> top-k labels table.

  Attributes:
    name: bank name.
    centroids: float32 [K, D].
    keys: int64 [N] sorted combined keys id * _SUB_SPAN + sub + 1.
    labels: int32 [N, k] in key order.
    version: the cluster stage's version id of these outputs.
    teacher: the feature extractor named in stats.json ("" when not recorded).
  """
  name: str
  centroids: np.ndarray
  keys: np.ndarray
  labels: np.ndarray
  version: str
  teacher: str = ""

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


def load_bank(clusters_workdir: str, bank: str, sources: Mapping[str, Any]) -> BankLabels:
  """Reads and checks one bank's cluster outputs under `clusters_workdir/clusters/<bank>/`.

  `sources` is this run's `pipeline.sources_fingerprint`: labels recorded for other data
  sources are refused, since their example ids would name other records.

  Raises:
    LabelError: labels made for other data sources (naming what changed), missing files,
      inconsistent shapes, labels outside [0, K), duplicate rows or
      non-finite centroids, naming the bank and folder.
  """
  where = cluster_labels.clusters_dir(clusters_workdir, bank)
  try:
    out = cluster_labels.load_clusters(clusters_workdir, bank)
  except (FileNotFoundError, OSError) as e:
    raise LabelError(f"bank {bank!r}: cannot read cluster outputs in {where}: {e}") from e
  centroids, labels, ids = out["centroids"], out["labels"], out["ids"]
  version = out["stats"].get("version")
  if not version:
    raise LabelError(f"bank {bank!r}: {where}/stats.json has no 'version'")
  check_sources(bank, where, out["stats"], sources)
  if centroids.ndim != 2 or not np.all(np.isfinite(centroids)):
    raise LabelError(f"bank {bank!r}: {where}/centroids.npy must be finite [K, D], "
                     f"got shape {centroids.shape}")
  if labels.ndim != 2 or ids.shape != (labels.shape[0], 2):
    raise LabelError(f"bank {bank!r}: labels.npy {labels.shape} and ids.npy {ids.shape} in "
                     f"{where} must be [N, k] and [N, 2]")
  if labels.size and (labels.min() < 0 or labels.max() >= centroids.shape[0]):
    raise LabelError(f"bank {bank!r}: labels.npy in {where} has ids outside [0, "
                     f"{centroids.shape[0]}) (the number of centroids)")
  ids = ids.astype(np.int64)
  if ids.size and (ids[:, 0].min() < 0 or ids[:, 1].min() < -1 or
                   ids[:, 1].max() >= _SUB_SPAN - 1 or ids[:, 0].max() >= 1 << 43):
    raise LabelError(f"bank {bank!r}: ids.npy in {where} has example ids or subs out of range")
  keys = ids[:, 0] * _SUB_SPAN + ids[:, 1] + 1
  order = np.argsort(keys, kind="stable")
  keys = keys[order]
  if np.any(keys[1:] == keys[:-1]):
    raise LabelError(f"bank {bank!r}: ids.npy in {where} lists a (id, sub) row twice")
  return BankLabels(name=bank, centroids=centroids.astype(np.float32), keys=keys,
                    labels=labels[order].astype(np.int32), version=str(version),
                    teacher=str(out["stats"].get("teacher", "")))


def check_sources(bank: str, where: str, stats: Mapping[str, Any],
                  sources: Mapping[str, Any]) -> None:
  """Refuses cluster outputs (their `stats.json`) made for other data sources than `sources`
  (`pipeline.sources_fingerprint`): their example ids would name other records.

  Raises:
    LabelError: naming the bank, its folder `where` and what changed.
  """
  changed = provenance.differences(
    (stats.get("inputs") or {}).get("data", {}).get("sources"), sources, "data.sources")
  if changed:
    raise LabelError(
      f"bank {bank!r}: the labels in {where} were made for other data than the config now "
      f"gives: {'; '.join(changed)}; their example ids would name other records. Extract and "
      "cluster again in a new workdir (or delete its features/ and clusters/)")


def load_banks(clusters_workdir: str, names: Sequence[str], sources: Mapping[str, Any]
               ) -> dict[str, BankLabels]:
  """Every named bank (see `load_bank`).

  Raises:
    LabelError: as `load_bank`, or when no bank is named.
  """
  if not names:
    raise LabelError("no bank to train on: give some bank a positive loss.bank_weights entry")
  return {name: load_bank(clusters_workdir, name, sources) for name in names}


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
