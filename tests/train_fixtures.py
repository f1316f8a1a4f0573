"""A tiny training setup for the train tests: a small demo config and synthetic cluster outputs.

The cluster outputs follow the cluster stage's format (`univit_jax/clustering/labels.py`):
`clusters/<bank>/{centroids.npy, labels.npy, ids.npy, stats.json}` with a version id. Labels are
derived from the demo records' ground truth, so a short run can learn them.

Faults the tests inject into a run (`nan_at_step`, `raise_at_step`, `slow_steps`) patch the
data or the compiled step from here, so neither the config nor the compiled program carries
them; so does `batches_of_hosts`, the batches of a multi-process job read by one process.
"""

import contextlib
import itertools
import os
import sys
import time
from unittest import mock

import grain
import helpers
import jax
import numpy as np

from univit_jax import positions, sharding, summary
from univit_jax.clustering import labels as cluster_labels
from univit_jax.data import demo, pipeline
from univit_jax.run_config import data_config
from univit_jax.train import labels as labels_lib
from univit_jax.train import state as state_lib
from univit_jax.train import step as step_lib

NUM_EVENTS, NUM_OBJECTS, TOP_K = 16, 32, 3
BANK_SIZES = dict(object=10, event_1=8, event_2=8)


def tiny_config(**train_overrides):
  """The demo config shrunk: 1- and 2-frame buckets of 16 and 8 examples, 48 records."""
  c = helpers.demo_config()
  c.data.sources = dict(
    events=dict(type="demo", kind="events", split="train", num_examples=NUM_EVENTS,
                num_frames=4),
    objects=dict(type="demo", kind="objects", split="train", num_examples=NUM_OBJECTS,
                 frames=(1,)))
  c.data.frames = (1, 2)
  c.data.bucket_weights = (1, 1)
  c.data.tokens_per_batch = 256
  c.data.augment = False
  c.data.read_threads = 1
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.optim.lr = 2e-3
  c.total_steps = 6
  c.loss.bank_weights = dict(object=1.0, event_1=1.0, event_2=1.0)
  c.loss.event_schedule = ((0.0, (1, 2)),)
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.progress_bar = False
  for key, value in train_overrides.items():
    c.train[key] = value
  return c


def _top_k(first: int, num_classes: int) -> list[int]:
  return [(first + j) % num_classes for j in range(TOP_K)]


def examples(config=None) -> labels_lib.Examples:
  """The examples of `config`'s data (default: `tiny_config`'s) that labels are attached to;
  `.sources` is what the cluster stage records in stats.json."""
  data_cfg = data_config.DataConfig.from_config(config or tiny_config())
  return labels_lib.examples_of(data_cfg, pipeline.open_sources(data_cfg))


def write_clusters(workdir: str, version: str = "v1", width: int = 64, seed: int = 0,
                   regions: bool = True, sources: dict | None = None) -> None:
  """Writes object / event_1 / event_2 cluster outputs for the sources of `tiny_config`.

  Ids follow the pipeline: sources in name order, so events are ids 0..15, objects 16..47; keys
  are `events/<i>` and `objects/<i>` (`pipeline.example_keys`). `regions=False` leaves the object
  bank with whole-image rows only, as a teacher without regions (precomputed features) gives it.
  stats.json records `sources` (default: `examples().sources`) as the data the labels were made
  for.
  """
  inputs = dict(data=dict(sources=sources or examples().sources))
  rng = np.random.default_rng(seed)
  events = demo.DemoSource("events", "train", num_examples=NUM_EVENTS, num_frames=4)
  objects = demo.DemoSource("objects", "train", num_examples=NUM_OBJECTS)
  rows = {bank: ([], []) for bank in BANK_SIZES}
  for i in range(NUM_EVENTS):
    label = int(events[i]["label"])
    rows["event_1"][0].append((i, 0))
    rows["event_1"][1].append(_top_k(label, BANK_SIZES["event_1"]))
    for s in range(2):
      rows["event_2"][0].append((i, s))
      rows["event_2"][1].append(_top_k(label + 3 * s, BANK_SIZES["event_2"]))
  for i in range(NUM_OBJECTS):
    record = objects[i]
    classes = [int(c) for c, m in zip(record["box_labels"], record["box_mask"]) if m]
    rows["object"][0].append((NUM_EVENTS + i, -1))
    rows["object"][1].append(_top_k(classes[0], BANK_SIZES["object"]))
    for r, c in enumerate(record["box_labels"]):
      if regions and record["box_mask"][r]:
        rows["object"][0].append((NUM_EVENTS + i, r))
        rows["object"][1].append(_top_k(int(c), BANK_SIZES["object"]))
  for bank, (ids, labels) in rows.items():
    cluster_labels.write_clusters(
      workdir, bank, centroids=cluster_labels.random_centroids(rng, BANK_SIZES[bank], width),
      labels=labels, ids=ids,
      keys=np.array([f"events/{i}" if i < NUM_EVENTS else f"objects/{i - NUM_EVENTS}"
                     for i, _ in ids], np.bytes_),
      stats=dict(bank=bank, version=version, inputs=inputs))


@contextlib.contextmanager
def _at_batch(index: int, fault):
  """Within it, the `index`-th batch this process reads (counted from 0) becomes
  `fault(batch)` once its labels are attached."""
  attach = labels_lib.LabelAttacher.__call__
  batches = itertools.count()

  def attach_with_fault(self, batch):
    batch = attach(self, batch)
    return fault(batch) if next(batches) == index else batch

  with mock.patch.object(labels_lib.LabelAttacher, "__call__", attach_with_fault):
    yield


def nan_at_step(nan_step: int):
  """Within it, the batch of step `nan_step` (counted from 0, as `TrainState.step`) has NaN
  frames, so every term of that step is NaN inside the real, unchanged step: its guard against a
  non-finite loss and the loop's stop naming step and terms are what a test sees. (A fault in
  the data, not in the step, leaves the compiled program the one the other tests compile.)"""
  return _at_batch(nan_step, lambda batch: dict(
    batch, frames=np.full_like(batch["frames"], np.nan)))


def raise_at_step(step: int, message: str):
  """Within it, reading the batch of step `step` of a run started at step 0 raises
  RuntimeError(message) in this process (as a bug, or a host's failing disk, would), while the
  other processes of its job go on into that step. It first prints `raising at <time.time()>`
  to stderr, for a test to time what follows."""

  def fail(batch):
    print(f"raising at {time.time()}", file=sys.stderr, flush=True)
    raise RuntimeError(message)

  return _at_batch(step, fail)


class _HostsIterator(grain.DatasetIterator):
  """Batches of several host streams, concatenated in process order; its state is theirs."""

  def __init__(self, hosts: list[grain.DatasetIterator]):
    super().__init__()
    self._hosts = hosts

  def __next__(self) -> dict:
    batches = [next(host) for host in self._hosts]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict:
    return dict(hosts=[host.get_state() for host in self._hosts])

  def set_state(self, state: dict) -> None:
    for host, host_state in zip(self._hosts, state["hosts"]):
      host.set_state(host_state)


class _Hosts(grain.IterDataset):

  def __init__(self, hosts: list[grain.IterDataset]):
    super().__init__()
    self._host_datasets = hosts

  def __iter__(self) -> _HostsIterator:
    return _HostsIterator([iter(host) for host in self._host_datasets])


@contextlib.contextmanager
def batches_of_hosts(count: int):
  """Within it, a one-process training run reads the global batches a job of `count` processes
  reads: every process's host batch (`pipeline.build_train_dataset` with its process index),
  concatenated in process order as `pipeline.to_global_batch` lays them over the mesh. (Each
  host reads its own slice of the records, so the batches depend on the process count.)"""
  build = pipeline.build_train_dataset

  def build_hosts(cfg, **kwargs):
    return _Hosts([build(cfg, process_index=i, process_count=count, **kwargs)
                   for i in range(count)])

  with mock.patch.object(pipeline, "build_train_dataset", build_hosts):
    yield


@contextlib.contextmanager
def slow_steps(seconds: float):
  """Within it, every training step sleeps `seconds` once it has run, so that a test can stop a
  run part-way."""
  compile_gradients = step_lib.compile_gradients

  def compile_slow(*args, **kwargs):
    compiled = compile_gradients(*args, **kwargs)

    def slow(*inputs):
      outputs = compiled(*inputs)
      time.sleep(seconds)
      return outputs

    return slow

  with mock.patch.object(step_lib, "compile_gradients", compile_slow):
    yield


def random_batch(shapes: dict, num_classes: int, image_size: int, patch_size: int) -> dict:
  """Arrays for an abstract batch of `step.abstract_batch`: random frames, grid positions, valid
  boxes and labels below `num_classes`, every mask True."""
  rng = np.random.default_rng(0)
  b, t = shapes["frames"].shape[:2]
  grid = image_size // patch_size
  arrays = {}
  for key, s in shapes.items():
    if s.dtype == np.bool_:
      arrays[key] = np.ones(s.shape, bool)
    elif key == "global_bank":
      arrays[key] = rng.integers(0, len(labels_lib.GLOBAL_BANKS), s.shape, dtype=np.int32)
    elif s.dtype == np.int32:
      arrays[key] = rng.integers(0, num_classes, s.shape, dtype=np.int32)
    else:
      arrays[key] = rng.standard_normal(s.shape).astype(np.float32)
  arrays["positions"] = np.broadcast_to(
    positions.grid_positions(positions.frame_times(t), grid, grid), shapes["positions"].shape)
  corners = np.sort(rng.uniform(size=shapes["boxes"].shape[:-1] + (2, 2)), axis=-2)
  arrays["boxes"] = corners.reshape(shapes["boxes"].shape).astype(np.float32)
  return arrays


def bucket_step_inputs(config, num_classes: int, num_frames: int = 1):
  """The `num_frames` bucket's step of `config` on its mesh of this process's devices, with
  boxes in every bucket as the training loop compiles them for box-carrying data: the typed run,
  the mesh, the `summary.TrainSetup`, the bucket's spec, batch shapes, a `random_batch` (labels
  below `num_classes`) on the batch sharding, the term weights and a fresh state."""
  run = helpers.typed(config)
  mesh = sharding.make_mesh(run.mesh)
  setup = summary.TrainSetup.build(run, mesh)
  spec = step_lib.StepSpec.for_bucket(num_frames, tuple(setup.sizes), run.data.max_boxes > 0)
  shapes = step_lib.abstract_batch(run.data, spec, run.data.batch_sizes()[num_frames], setup.top_k,
                                   run.loss.image_labels)
  batch_sharding = sharding.batch_sharding(mesh, run.mesh.rules)
  batch = jax.device_put(
    random_batch(shapes, num_classes, run.data.image_size, run.model.patch_size), batch_sharding)
  weights = step_lib.term_weights(run.loss, 0.0, tuple(setup.sizes))
  state = state_lib.create_state(run.model, setup.sizes, {}, setup.tx, setup.shardings, seed=0)
  return run, mesh, setup, spec, shapes, batch_sharding, batch, weights, state
