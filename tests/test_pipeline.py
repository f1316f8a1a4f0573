"""Pipeline: exact resume through checkpointing.py, host sharding, bad input, global arrays."""

import itertools
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from fakes import FakeSource

from helpers import demo_config
from univit_jax import checkpointing, config_lib
from univit_jax.data import pipeline, sources
from univit_jax.run_config import data_config


def _config(**kw):
  specs = (config_lib.SourceSpec("img", "demo", None, (("kind", "objects"),)),
           config_lib.SourceSpec("vid", "demo", None, (("kind", "events"),)))
  defaults = dict(sources=specs, frames=(1, 2, 4), bucket_weights=(2, 1, 1),
                  tokens_per_batch=16 * 16, image_size=16, patch_size=4,
                  transform=data_config.TransformConfig(16))
  return data_config.DataConfig(**defaults | kw)


def _sources():
  return dict(img=FakeSource(30, boxes=True), vid=FakeSource(12, num_frames=3))


def _assert_batches_equal(want, got):
  for a, b in zip(want, got, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resume_through_checkpointer_is_exact(tmp_path):
  cfg = _config()
  build = lambda: pipeline.build_train_dataset(  # noqa: E731
    cfg, sources=_sources(), process_index=0, process_count=1)
  it = iter(build())
  for _ in range(5):
    next(it)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, dict(step=np.int32(5)), it)
    ckpt.wait_until_finished()
  expected = list(itertools.islice(it, 6))

  fresh = iter(build())
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    state = ckpt.restore(5, jax.eval_shape(lambda: dict(step=np.int32(0))), fresh)
  assert int(state["step"]) == 5
  _assert_batches_equal(expected, itertools.islice(fresh, 6))


@pytest.mark.parametrize("count", [2, 4])
def test_host_shards_are_disjoint_complete_and_agree_on_buckets(count):
  cfg = _config()
  sizes = cfg.batch_sizes(count)
  eligible = {1: set(range(42)), 2: set(range(30, 42)), 4: set(range(30, 42))}
  schedules, shards = [], {t: [] for t in cfg.frames}
  for index in range(count):
    it = iter(pipeline.build_train_dataset(
      cfg, sources=_sources(), process_index=index, process_count=count))
    schedule, ids = [], {t: [] for t in cfg.frames}
    for batch in itertools.islice(it, 24):
      t = batch["frames"].shape[1]
      assert batch["frames"].shape[0] == sizes[t] // count
      schedule.append(t)
      ids[t].extend(batch["id"].tolist())
    schedules.append(schedule)
    for t in cfg.frames:
      # The first epoch of this host's shard of bucket t: each record exactly once.
      shard_len = len(range(index, len(eligible[t]), count))
      assert len(ids[t]) >= shard_len, (t, index)
      first_epoch = ids[t][:shard_len]
      assert len(set(first_epoch)) == shard_len
      shards[t].append(set(first_epoch))
  assert all(s == schedules[0] for s in schedules)
  for t in cfg.frames:
    assert set().union(*shards[t]) == eligible[t]
    assert sum(len(s) for s in shards[t]) == len(eligible[t])


class _PartlyMissing:
  """Image files; every third one is missing (removed after the manifest was read)."""

  def __init__(self, folder, n):
    from PIL import Image
    self.paths = []
    for i in range(n):
      path = os.path.join(folder, f"{i}.png")
      if i % 3 != 1:
        Image.fromarray(np.full((20, 24, 3), i, np.uint8)).save(path)
      self.paths.append(path)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    return dict(path=self.paths[index], kind="image", label=index)


def test_unreadable_records_are_replaced_counted_and_logged(tmp_path, caplog):
  specs = (config_lib.SourceSpec("img", "image_folder", (1,), ()),)
  cfg = _config(sources=specs, frames=(1,), bucket_weights=(1,), tokens_per_batch=16 * 4,
                max_bad_fraction=0.5)
  src = dict(img=_PartlyMissing(str(tmp_path), 9))
  ds = pipeline.build_train_dataset(cfg, sources=src, process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING):
    ids = np.concatenate([b["id"] for b in itertools.islice(iter(ds), 6)])
  assert not set(ids.tolist()) & {1, 4, 7}
  assert {0, 2, 3, 5, 6, 8} == set(ids.tolist())
  assert "1.png" in caplog.text and "FileNotFoundError" in caplog.text

  # The counts travel with the iterator state: a resumed iterator goes on counting.
  whole = iter(ds)
  for _ in range(6):
    next(whole)
  first = iter(pipeline.build_train_dataset(cfg, sources=src, process_index=0, process_count=1))
  for _ in range(3):
    next(first)
  resumed = iter(pipeline.build_train_dataset(cfg, sources=src, process_index=0,
                                              process_count=1))
  resumed.set_state(first.get_state())
  for _ in range(3):
    next(resumed)
  assert whole.tracker.bad > 0
  assert (resumed.tracker.attempted, resumed.tracker.bad, resumed.tracker.examples) == (
    whole.tracker.attempted, whole.tracker.bad, whole.tracker.examples)

  strict = _config(sources=specs, frames=(1,), bucket_weights=(1,), tokens_per_batch=16 * 4,
                   max_bad_fraction=0.1, bad_check_after=4)
  ds = pipeline.build_train_dataset(strict, sources=src, process_index=0, process_count=1)
  with pytest.raises(pipeline.BadInputError, match=r"max_bad_fraction=0.1(.|\n)*\.png"):
    list(itertools.islice(iter(ds), 6))


def test_to_global_batch_shards_the_batch_axis():
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  cfg = _config()
  batch = next(iter(pipeline.build_train_dataset(
    cfg, sources=_sources(), process_index=0, process_count=1, batch_multiple=4)))
  arrays = pipeline.to_global_batch(batch, sharding)
  shapes = pipeline.example_shapes(cfg, 1, 16, with_boxes=True)
  assert arrays.keys() == shapes.keys()
  for k, v in arrays.items():
    assert v.shape == shapes[k].shape and v.dtype == shapes[k].dtype, k
    assert v.sharding == sharding
  np.testing.assert_array_equal(arrays["frames"], batch["frames"])


def test_data_config_from_demo_config():
  cfg = data_config.DataConfig.from_config(demo_config())
  assert [s.name for s in cfg.sources] == ["digits", "events", "objects"]
  digits, events, _ = cfg.sources
  assert cfg.source_buckets(events) == (1, 2, 4, 8, 16)
  assert cfg.source_buckets(digits) == (1,)
  c = config_lib.default_config("mu/8")
  c.data.sources.bad = dict(type="nope")
  with pytest.raises(ValueError, match="data.sources.bad.type='nope'"):
    data_config.DataConfig.from_config(c)
  c.data.sources.bad = dict(type="image_folder", path="/x", colour=1)
  with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
    data_config.DataConfig.from_config(c)
  c.data.sources.bad = dict(type="tfds", name="mnist")
  with pytest.raises(ValueError, match=r"needs fields \['split'\]"):
    data_config.DataConfig.from_config(c)


def test_sources_fingerprint_changes_when_the_ids_would_name_other_records(tmp_path):
  """Issue 13: ids are positions over the sources, so an output keyed by id is valid only for the
  sources it records: their specs, record counts and, for file lists, the files in order."""
  spec = config_lib.SourceSpec.from_dict("files", dict(type="image_folder", path=str(tmp_path)))
  cfg = _config(sources=(spec,), frames=(1,), bucket_weights=(1,))
  entries = [sources.FileEntry(str(tmp_path / f"{i}.png")) for i in range(3)]

  def fingerprint(listed):
    return pipeline.sources_fingerprint(cfg, dict(files=sources.FileSource(listed, "image")))

  base = fingerprint(entries)["files"]
  assert base["spec"] == dict(type="image_folder", path=str(tmp_path)) and base["records"] == 3
  renamed = fingerprint(entries[:2] + [sources.FileEntry(str(tmp_path / "x.png"))])["files"]
  reordered = fingerprint(entries[::-1])["files"]
  assert renamed["records"] == reordered["records"] == 3
  assert len({base["content"], renamed["content"], reordered["content"]}) == 3
  assert fingerprint(list(entries))["files"] == base


def test_demo_source_wiring():
  demo = pytest.importorskip("univit_jax.data.demo")
  del demo
  spec = config_lib.SourceSpec.from_dict(
    "events", dict(type="demo", kind="events", split="val", num_examples=4, num_frames=8))
  source = sources.build_source(spec)
  assert len(source) == 4 and source[0]["frames"].shape[0] == 8
  cfg = _config(sources=(spec,), image_size=32, patch_size=8, tokens_per_batch=16 * 16,
                transform=data_config.TransformConfig(32))
  batch = next(iter(pipeline.build_train_dataset(cfg, process_index=0, process_count=1)))
  t = batch["frames"].shape[1]
  assert batch["frames"].shape == (16 // t, t, 32, 32, 3)
  assert batch["boxes"].shape == (16 // t, 4, 4)


@pytest.mark.slow
def test_resume_with_worker_processes():
  """Grain workers need a __main__ guard and parsed absl flags: run as a script."""
  script = os.path.join(os.path.dirname(__file__), "worker_resume_check.py")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get(
      "PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                          timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed exactly" in result.stdout
