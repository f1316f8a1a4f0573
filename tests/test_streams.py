"""VS2 buckets: batch sizes under the token budget, one frame count per batch, positions, masks."""

import collections
import itertools

import numpy as np
import pytest
from fakes import FakeSource

import helpers
from univit_jax import config_lib, positions
from univit_jax.data import pipeline, streams
from univit_jax.run_config import data_config


def test_bucket_batch_sizes_follow_token_budget():
  sizes = config_lib.bucket_batch_sizes((1, 2, 4, 8, 16), 16 * 16 * 4, 32, 8)
  assert sizes == {1: 64, 2: 32, 4: 16, 8: 8, 16: 4}
  assert config_lib.bucket_batch_sizes((1, 2), 160, 16, 4, batch_multiple=4) == {1: 8, 2: 4}
  with pytest.raises(ValueError, match="3-frame bucket"):
    config_lib.bucket_batch_sizes((1, 3), 160, 16, 4, batch_multiple=4)


def test_bucket_tokens_give_each_bucket_its_own_budget():
  """`data.bucket_tokens` replaces `tokens_per_batch` bucket by bucket (here: 4x the images)."""
  sizes = config_lib.bucket_batch_sizes((1, 2, 16), 16 * 16 * 4, 32, 8,
                                        bucket_tokens=(16 * 16 * 16, 16 * 16 * 4, 16 * 16 * 4))
  assert sizes == {1: 256, 2: 32, 16: 4}
  with pytest.raises(ValueError, match=r"data.bucket_tokens\[1\]=16 leaves no clip"):
    config_lib.bucket_batch_sizes((1, 2), 4096, 32, 8, bucket_tokens=(4096, 16))
  # Image-only data drops the clip buckets, and their budgets with them.
  config = helpers.demo_config()
  config.data.bucket_tokens = (8192, 2048, 2048, 2048, 2048)
  del config.data.sources["events"]
  cfg = data_config.DataConfig.from_config(config)
  assert cfg.frames == (1,) and cfg.bucket_tokens == (8192,)
  assert cfg.batch_sizes() == {1: 8192 // 16}


def _config(**kw):
  specs = (config_lib.SourceSpec("img", "demo", None, (("kind", "objects"),)),
           config_lib.SourceSpec("vid", "demo", None, (("kind", "events"),)))
  defaults = dict(sources=specs, frames=(1, 2, 4), bucket_weights=(2, 1, 1),
                  tokens_per_batch=16 * 8, image_size=16, patch_size=4,
                  transform=data_config.TransformConfig(16))
  return data_config.DataConfig(**defaults | kw)


def _sources():
  return dict(img=FakeSource(30, boxes=True), vid=FakeSource(12, num_frames=3))


def test_batches_have_one_bucket_budget_positions_and_masks():
  cfg = _config()
  sizes = cfg.batch_sizes()
  ds = pipeline.build_train_dataset(cfg, sources=_sources(), process_index=0, process_count=1)
  seen = collections.Counter()
  for batch in itertools.islice(iter(ds), 8):
    b, t = batch["frames"].shape[:2]
    seen[t] += 1
    assert b == sizes[t] and batch["frames"].shape == (b, t, 16, 16, 3)
    assert batch["frames"].dtype == np.float32
    assert batch["frame_mask"].shape == (b, t) and batch["id"].dtype == np.int64
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (b,)
    want = positions.grid_positions(positions.frame_times(t, 64), 4, 4)
    np.testing.assert_array_equal(batch["positions"], np.broadcast_to(want, (b, t * 16, 3)))
    np.testing.assert_array_equal(batch["token_mask"], np.repeat(batch["frame_mask"], 16, 1))
    assert batch["boxes"].shape == (b, 4, 4) and batch["box_mask"].shape == (b, 4)
    assert "skipped" not in batch
    if t == 4:
      # 3-frame clips padded by repeating the last frame, which is masked out.
      assert (batch["id"] >= 30).all()
      np.testing.assert_array_equal(batch["frame_mask"], [[True] * 3 + [False]] * b)
    if t == 1:
      video = batch["id"] >= 30
      assert not batch["box_mask"][video].any()
  # Weights 2:1:1 over 8 steps.
  assert seen == {1: 4, 2: 2, 4: 2}


def test_images_only_feed_their_buckets_and_labels_follow_ids():
  cfg = _config()
  ds = pipeline.build_train_dataset(cfg, sources=_sources(), process_index=0, process_count=1)
  for batch in itertools.islice(iter(ds), 8):
    t = batch["frames"].shape[1]
    ids = batch["id"]
    if t > 1:
      assert (ids >= 30).all()
    local = np.where(ids >= 30, ids - 30, ids)
    np.testing.assert_array_equal(batch["label"], local % 7)


def test_a_bucket_without_source_is_rejected():
  specs = (config_lib.SourceSpec("img", "demo", None, (("kind", "items"),)),)
  cfg = _config(sources=specs)
  with pytest.raises(ValueError, match="no source feeds the 2-frame bucket"):
    pipeline.build_train_dataset(cfg, sources=dict(img=FakeSource(4)), process_index=0,
                                 process_count=1)


def test_eval_pass_is_deterministic_complete_and_equal_across_hosts():
  cfg = _config()
  batches = {}
  for index in range(4):
    ds = pipeline.build_eval_dataset(cfg, 2, 8, sources=_sources(), process_index=index,
                                     process_count=4)
    batches[index] = list(ds)
  # 42 records over 4 hosts: 11 slots per host, padded to 6 batches of 2.
  assert {len(b) for b in batches.values()} == {6}
  assert all(b["frames"].shape == (2, 2, 16, 16, 3) for v in batches.values() for b in v)
  ids = np.concatenate([b["id"][b["example_mask"]] for v in batches.values() for b in v])
  assert sorted(ids.tolist()) == list(range(42))
  again = list(pipeline.build_eval_dataset(cfg, 2, 8, sources=_sources(), process_index=0,
                                           process_count=4))
  for a, b in zip(batches[0], again):
    np.testing.assert_array_equal(a["frames"], b["frames"])


class _FlakySource(FakeSource):
  """FakeSource whose record 2 fails in the reader and record 3 holds int32 frames."""

  def __getitem__(self, index: int) -> dict:
    if index == 2:
      raise RuntimeError("reader failed")
    record = super().__getitem__(index)
    if index == 3:
      record["frames"] = record["frames"].astype(np.int32)
    return record

  def __repr__(self) -> str:
    return "FlakySource"


def test_any_exception_of_one_record_is_a_bad_record_named_by_its_key(caplog):
  loader = streams.ExampleLoader([FakeSource(4), _FlakySource(6)], streams.ExampleConfig(
    num_frames=1, transform=data_config.TransformConfig(16, augment=False)))
  example = loader(4 + 2, None)
  assert example["id"] == 4 + 4  # records 2 and 3 replaced by the next readable one
  assert example["skipped"] == ("record 2 of FlakySource: RuntimeError: reader failed",
                                "record 3 of FlakySource: ValueError: frames must be uint8, "
                                "got int32")
  cfg = _config(frames=(1,), bucket_weights=(1,), max_bad_fraction=0.5, bad_check_after=4)
  ds = pipeline.build_train_dataset(
    cfg, sources=dict(img=_FlakySource(6), vid=FakeSource(2, num_frames=3)), process_index=0,
    process_count=1)
  with caplog.at_level("WARNING"):
    batches = list(itertools.islice(iter(ds), 3))
  ids = np.concatenate([b["id"] for b in batches])
  assert not {2, 3} & set(ids.tolist())
  assert "Skipped unreadable record record 2 of FlakySource" in caplog.text
