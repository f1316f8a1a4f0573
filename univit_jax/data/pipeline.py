"""The input pipeline: sources -> per-host shard -> shuffle -> decode/augment -> VS2 buckets.

  cfg = run.data                                    # run_config.build(config, ...).data
  ds = pipeline.build_train_dataset(cfg)            # grain.IterDataset of host-local batches
  it = iter(ds)                                     # checkpoint it with univit_jax.checkpointing
  batch = pipeline.to_global_batch(next(it), batch_sharding)

Training batches are described in `univit_jax.data.streams`; every host emits the same bucket
(frame count) at the same step. Each host reads the disjoint slice `records[process_index::
process_count]` of every bucket's records, shuffles it with a seeded per-bucket shuffle and
repeats it forever; with `worker_count > 0` decoding runs in grain worker processes (the same
worker count must be used on every host and when resuming). Evaluation batches
(`build_eval_dataset`) visit every record once, in order, without augmentation, padded so that
every host yields the same number of batches.
"""

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from univit_jax import config_lib, provenance
from univit_jax.data import sources as sources_lib
from univit_jax.data import streams
from univit_jax.run_config import data_config


class BadInputError(RuntimeError):
  """Too many unreadable records: the data, not the code, needs fixing."""


def open_sources(cfg: data_config.DataConfig) -> dict[str, sources_lib.Source]:
  """Builds every configured source, by name."""
  return {spec.name: sources_lib.build_source(spec) for spec in cfg.sources}


def id_ranges(cfg: data_config.DataConfig, sources: Mapping[str, sources_lib.Source]
              ) -> dict[str, range]:
  """The example ids of each source's records, by source name.

  Ids number the records of all configured sources concatenated in `cfg.sources` order (by
  name): record j of a source is id `id_ranges(...)[name][j]`, the `id` of its batches here and
  the key of its rows in the feature store and the cluster outputs.
  """
  ranges, start = {}, 0
  for spec in cfg.sources:
    count = len(sources[spec.name])
    ranges[spec.name] = range(start, start + count)
    start += count
  return ranges


def example_keys(cfg: data_config.DataConfig, sources: Mapping[str, sources_lib.Source]
                 ) -> np.ndarray:
  """The stable key of every example id, bytes `[number of examples]` in id order (UTF-8):
  `<source name>/<record key>` (`sources.record_keys`). An id is a position and names another
  record once records are added, removed or reordered; a key stays with its record (for sources
  that name their records: `sources.names_records`), so cluster labels are attached by key."""
  return np.array([f"{spec.name}/{key}".encode() for spec in cfg.sources
                   for key in sources_lib.record_keys(sources[spec.name])], np.bytes_)


def sources_fingerprint(cfg: data_config.DataConfig, sources: Mapping[str, sources_lib.Source]
                        ) -> dict:
  """What the example ids of `id_ranges` stand for, per source name: its spec (`data.sources.
  <name>`), its record count and, for a source that lists its records (`FileSource`,
  `records.ArrayRecordSource`), a digest of them (`content_key`). Every output keyed by example
  id (features, clusters, checkpoints) records it, and a rerun refuses one recorded with another
  (`provenance`): the same id would name another record, and its label another record's."""
  out = {}
  for spec in cfg.sources:
    source = sources[spec.name]
    out[spec.name] = dict(spec=spec.to_dict(), records=len(source))
    if hasattr(source, "content_key"):
      out[spec.name]["content"] = source.content_key()
  return provenance.jsonable(out)


def batches_fingerprint(cfg: data_config.DataConfig, sources: Mapping[str, sources_lib.Source],
                        batch_sizes: Mapping[int, int]) -> dict:
  """What fixes the training batches and the meaning of the data iterator's saved position
  (`build_train_dataset`), by `config.data` field: the sources (`sources_fingerprint`), the
  buckets and their weights, the token budget and frame size that set the batch sizes, the
  global batch sizes themselves (`batch_sizes`: also rounded to the data-parallel size), the
  shuffle seed, the worker count and the process count (grain saves one position per process,
  laid out by workers). A checkpoint's iterator position is resumed only under the same."""
  budgets = dict(bucket_tokens=cfg.bucket_tokens) if cfg.bucket_tokens else {}
  return provenance.jsonable(dict(
    sources=sources_fingerprint(cfg, sources), frames=cfg.frames,
    bucket_weights=cfg.bucket_weights, tokens_per_batch=cfg.tokens_per_batch, **budgets,
    image_size=cfg.image_size, batch_sizes=dict(batch_sizes), shuffle_seed=cfg.shuffle_seed,
    worker_count=cfg.worker_count, processes=jax.process_count()))


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index={index} is not in [0, process_count={count})")
  return index, count


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _read_options(cfg: data_config.DataConfig, batch_size: int) -> grain.ReadOptions:
  # grain's default reads 500 records ahead per stream: with 16-frame clips that is gigabytes.
  return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=batch_size)


class _Layout:
  """Where each source's records sit in the concatenated index space, and whether boxes exist."""

  def __init__(self, cfg: data_config.DataConfig, opened: Mapping[str, sources_lib.Source]):
    missing = [s.name for s in cfg.sources if s.name not in opened]
    if missing:
      raise ValueError(f"no source object for data.sources {missing}")
    if not cfg.sources:
      raise config_lib.ConfigError("data.sources is empty: configure at least one source")
    self.specs = cfg.sources
    self.sources = [opened[s.name] for s in cfg.sources]
    for spec, src in zip(self.specs, self.sources):
      if not len(src):
        raise sources_lib.SourceError(f"data.sources.{spec.name} has no records")
    self.id_ranges = id_ranges(cfg, opened)
    has_boxes = any("boxes" in src[0] for src in self.sources)
    self.max_boxes = cfg.max_boxes if has_boxes else 0

  def indices(self, names: Sequence[str]) -> np.ndarray:
    """Global record indices of the named sources, in source order."""
    return np.concatenate([np.arange(r.start, r.stop) for name, r in self.id_ranges.items()
                           if name in names]).astype(np.int64)

  def ranges(self, names: Sequence[str]) -> grain.MapDataset:
    """The same indices as a MapDataset (index ranges, no materialised list)."""
    return grain.MapDataset.concatenate([grain.MapDataset.range(r.start, r.stop)
                                         for name, r in self.id_ranges.items() if name in names])


class BadInputTracker:
  """Counts and logs records replaced because they were unreadable (runs in the main process).

  Takes a batch, removes its `skipped` list, logs each entry, and raises BadInputError once
  more than `max_fraction` of the attempted records were bad (checked after `check_after`
  attempts). `BadInputDataset` keeps the counts in the data iterator's checkpoint.
  """

  def __init__(self, max_fraction: float, check_after: int):
    self.max_fraction, self.check_after = max_fraction, check_after
    self.attempted = 0
    self.bad = 0
    self.examples: list[str] = []

  def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    skipped = batch.pop("skipped")
    self.bad += len(skipped)
    self.attempted += len(skipped) + len(batch["id"])
    for entry in skipped:
      logging.warning("Skipped unreadable record %s", entry)
      if len(self.examples) < 10:
        self.examples.append(entry)
    if self.attempted >= self.check_after and self.bad > self.max_fraction * self.attempted:
      listed = "\n  ".join(self.examples)
      raise BadInputError(
        f"{self.bad} of {self.attempted} records were unreadable, above "
        f"data.max_bad_fraction={self.max_fraction}. Examples:\n  {listed}")
    return batch


class BadInputDataset(grain.IterDataset):
  """`parent`'s batches through a `BadInputTracker` whose counts are part of the iterator state,
  so a resumed run goes on counting where the checkpoint left off."""

  def __init__(self, parent: grain.IterDataset, max_fraction: float, check_after: int):
    super().__init__(parent)
    self._limits = (max_fraction, check_after)

  def __iter__(self) -> grain.DatasetIterator:
    return _BadInputIterator(self._parent.__iter__(), BadInputTracker(*self._limits))


class _BadInputIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, tracker: BadInputTracker):
    super().__init__(parent)
    self.tracker = tracker

  def __next__(self) -> dict[str, Any]:
    return self.tracker(next(self._parent))

  def get_state(self) -> dict[str, Any]:
    t = self.tracker
    return dict(parent=self._parent.get_state(), attempted=t.attempted, bad=t.bad,
                examples=list(t.examples))

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.tracker.attempted, self.tracker.bad = int(state["attempted"]), int(state["bad"])
    self.tracker.examples = list(state["examples"])


def build_train_dataset(
    cfg: data_config.DataConfig, *, sources: Mapping[str, sources_lib.Source] | None = None,
    process_index: int | None = None, process_count: int | None = None,
    batch_multiple: int = 1) -> grain.IterDataset:
  """The infinite training stream of host-local batches.

  Args:
    cfg: data settings.
    sources: already-built sources by name (default: `open_sources(cfg)`).
    process_index: this host (default `jax.process_index()`).
    process_count: number of hosts (default `jax.process_count()`).
    batch_multiple: global batch sizes are multiples of this and of process_count (pass the
      data-parallel device count).

  Returns:
    A grain IterDataset; each element is a host-local batch (see `streams`) with
    `global batch size / process_count` examples.

  Raises:
    config_lib.ConfigError: a bucket with no source, or an impossible batch size.
    sources_lib.SourceError: an empty source or host shard.
  """
  index, count = _process(process_index, process_count)
  layout = _Layout(cfg, open_sources(cfg) if sources is None else sources)
  sizes = cfg.batch_sizes(math.lcm(batch_multiple, count))
  buckets, weights = {}, {}
  for t, weight in zip(cfg.frames, cfg.bucket_weights):
    names = [s.name for s in cfg.sources if t in cfg.source_buckets(s)]
    if not names:
      raise config_lib.ConfigError(
        f"no source feeds the {t}-frame bucket of data.frames={cfg.frames}; set a video "
        "source or a source's `frames` to include it")
    records = layout.ranges(names)[index::count]
    if not len(records):
      raise sources_lib.SourceError(
        f"host {index} of {count} gets no record of the {t}-frame bucket "
        f"({len(layout.ranges(names))} records)")
    loader = streams.ExampleLoader(layout.sources, streams.ExampleConfig(
      num_frames=t, transform=cfg.transform, sampling=cfg.frame_sampling,
      stride=cfg.frame_stride, max_boxes=layout.max_boxes))
    key, local = f"frames_{t}", sizes[t] // count
    buckets[key] = (
      records.shuffle(seed=_seed(cfg.shuffle_seed, t))
      .repeat()
      .random_map(loader, seed=_seed(cfg.shuffle_seed, t, index))
      .to_iter_dataset(_read_options(cfg, local))
      .batch(local, drop_remainder=True, batch_fn=streams.BatchBuilder(
        t, cfg.image_size, cfg.patch_size, cfg.virtual_frames)))
    weights[key] = float(weight)
  ds = grain.IterDataset.mix(buckets, weights)
  if cfg.worker_count:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
  return BadInputDataset(ds, cfg.max_bad_fraction, cfg.bad_check_after)


class _EvalLoader:
  """(global index, valid) -> example without augmentation; replaced records count as invalid."""

  def __init__(self, loader: streams.ExampleLoader):
    self._loader = loader

  def __call__(self, item: tuple[int, bool]) -> dict[str, Any]:
    index, valid = item
    example = self._loader(index, None)
    example["example_mask"] = np.bool_(valid and not example["skipped"])
    return example


def build_eval_dataset(
    cfg: data_config.DataConfig, num_frames: int, batch_size: int, *,
    source_names: Sequence[str] | None = None,
    sources: Mapping[str, sources_lib.Source] | None = None,
    process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
  """One deterministic pass over the records of some sources, as T-frame batches.

  Every host yields the same number of batches: the host shards are padded (with copies of a
  record marked False in `example_mask`). A record replaced because it was unreadable is also
  marked False, so each valid example is exactly the record named by its `id`.

  Args:
    cfg: data settings (`cfg.transform.augment` is ignored: no augmentation).
    num_frames: T of every batch.
    batch_size: global batch size (a multiple of process_count).
    source_names: which sources (default: all).
    sources, process_index, process_count: as for `build_train_dataset`.

  Returns:
    A finite grain IterDataset of host-local batches, with `example_mask` bool `[B]` added.
  """
  index, count = _process(process_index, process_count)
  if batch_size % count:
    raise ValueError(f"eval batch_size={batch_size} is not a multiple of {count} processes")
  layout = _Layout(cfg, open_sources(cfg) if sources is None else sources)
  names = [s.name for s in cfg.sources] if source_names is None else list(source_names)
  unknown = sorted(set(names) - {s.name for s in cfg.sources})
  if unknown:
    raise ValueError(f"unknown sources {unknown}; configured: {[s.name for s in cfg.sources]}")
  indices = layout.indices(names)
  local = batch_size // count
  per_host = -(-len(indices) // count)
  padded = -(-per_host // local) * local
  shard = indices[index::count]
  items = [(int(i), True) for i in shard] + [(int(indices[0]), False)] * (padded - len(shard))
  loader = streams.ExampleLoader(layout.sources, streams.ExampleConfig(
    num_frames=num_frames, transform=dataclasses.replace(cfg.transform, augment=False),
    sampling=cfg.frame_sampling, stride=cfg.frame_stride, max_boxes=layout.max_boxes))
  ds = (grain.MapDataset.source(items).map(_EvalLoader(loader))
        .to_iter_dataset(_read_options(cfg, local))
        .batch(local, batch_fn=streams.BatchBuilder(
          num_frames, cfg.image_size, cfg.patch_size, cfg.virtual_frames)))
  if cfg.worker_count:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
  return BadInputDataset(ds, cfg.max_bad_fraction, cfg.bad_check_after)


def eval_batches(cfg: data_config.DataConfig, source_names: Sequence[str], num_frames: int,
                 batch_size: int, sources: Mapping[str, sources_lib.Source] | None = None
                 ) -> tuple[int, Iterator[dict[str, Any]]]:
  """One pass of `build_eval_dataset` over `source_names`, clips sampled uniformly (the
  evaluation choice), and the number of host-local batches it yields (the same on every host;
  for progress bars). No source: no batch."""
  if not source_names:
    return 0, iter(())
  opened = open_sources(cfg) if sources is None else sources
  count = sum(len(opened[n]) for n in source_names)
  per_host = batch_size // jax.process_count()
  num_batches = math.ceil(math.ceil(count / jax.process_count()) / per_host)
  ds = build_eval_dataset(dataclasses.replace(cfg, frame_sampling="uniform"), num_frames,
                          batch_size, source_names=source_names, sources=opened)
  return num_batches, iter(ds)


def to_global_batch(
    batch: Mapping[str, np.ndarray],
    sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Assembles host-local batches into global arrays split along the batch (leading) axis.

  Args:
    batch: this host's batch; every leaf has the local batch as its leading dimension.
    sharding: a NamedSharding whose spec names the mesh axes of the batch dimension only (e.g.
      `P(("data", "fsdp"))`); it applies to leaves of any rank.

  Returns:
    The same keys as global `jax.Array`s with leading dimension local batch x process count.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def example_shapes(cfg: data_config.DataConfig, num_frames: int, batch_size: int,
                   with_boxes: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a (global) batch of a T-frame bucket, for compiling ahead of data."""
  s, n = cfg.image_size, num_frames * config_lib.tokens_per_frame(cfg.image_size, cfg.patch_size)
  shapes = dict(
    frames=((batch_size, num_frames, s, s, 3), np.float32),
    frame_mask=((batch_size, num_frames), np.bool_),
    positions=((batch_size, n, 3), np.float32),
    token_mask=((batch_size, n), np.bool_),
    id=((batch_size,), np.int64), label=((batch_size,), np.int32))
  if with_boxes:
    r = cfg.max_boxes
    shapes.update(boxes=((batch_size, r, 4), np.float32), box_labels=((batch_size, r), np.int32),
                  box_mask=((batch_size, r), np.bool_))
  # Without jax_enable_x64 the int64 ids become int32 on the device.
  return {k: jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(dtype))
          for k, (shape, dtype) in shapes.items()}

