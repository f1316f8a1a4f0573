"""Frame sampling and PyAV decoding of real H.264 files (encoded here), bad videos skipped."""

import itertools
import json

import av
import numpy as np
import pytest

from helpers import encode_video as _encode
from univit_jax import config_lib
from univit_jax.data import pipeline, sources, video
from univit_jax.run_config import data_config


def _frame_ids(frames):
  return np.round(frames.reshape(len(frames), -1).mean(-1) / 8).astype(int).tolist()


def test_sample_indices():
  idx, mask = video.sample_indices(20, 4, "uniform", 1, None)
  assert idx.tolist() == [2, 7, 12, 17] and mask.all()
  idx, _ = video.sample_indices(20, 4, "uniform", 1, np.random.default_rng(0))
  assert all(5 * k <= i < 5 * (k + 1) for k, i in enumerate(idx))
  idx, _ = video.sample_indices(20, 4, "random_window", 3, None)
  assert np.diff(idx).tolist() == [3, 3, 3] and idx[0] == (20 - 10) // 2
  idx, _ = video.sample_indices(7, 4, "random_window", 5, np.random.default_rng(1))
  assert np.diff(idx).tolist() == [2, 2, 2] and 0 <= idx[0] and idx[-1] < 7  # stride shrunk
  idx, mask = video.sample_indices(3, 5, "uniform", 1, None)
  assert idx.tolist() == [0, 1, 2, 2, 2] and mask.tolist() == [True] * 3 + [False] * 2
  assert video.sample_indices(9, 1, "uniform", 1, None)[0].tolist() == [4]
  with pytest.raises(ValueError, match="frame sampling 'nope'"):
    video.sample_indices(4, 2, "nope", 1, None)


def test_read_real_h264(tmp_path):
  path = _encode(tmp_path / "clip.mp4", 20)
  frames, mask = video.read_clip(path, 4, "uniform", 1, None)
  assert frames.shape == (4, 64, 64, 3) and frames.dtype == np.uint8 and mask.all()
  assert _frame_ids(frames) == [2, 7, 12, 17]
  frames, _ = video.read_clip(path, 3, "random_window", 2, np.random.default_rng(0))
  ids = _frame_ids(frames)
  assert np.diff(ids).tolist() == [2, 2]
  # A 0.5 s window at 10 fps holds frames 10..14; 8 wanted: 5 real + 3 repeated, masked.
  frames, mask = video.read_clip(path, 8, "uniform", 1, None, start=1.0, end=1.5)
  assert _frame_ids(frames) == [10, 11, 12, 13, 14, 14, 14, 14]
  assert mask.tolist() == [True] * 5 + [False] * 3


def test_bad_videos_raise_bad_record(tmp_path):
  good = _encode(tmp_path / "good.mp4", 12)
  data = open(good, "rb").read()
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes(data[: len(data) // 2])
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(np.random.default_rng(0).bytes(3000))
  empty = _encode(tmp_path / "empty.mp4", 0)
  for path in (truncated, garbage, empty, tmp_path / "missing.mp4"):
    with pytest.raises(sources.BadRecordError) as e:
      sources.load_clip(dict(path=str(path), kind="video"), 4, "uniform", 1, None)
    assert str(path) in str(e.value)


def test_video_folder_pipeline_skips_and_counts_bad_files(tmp_path, caplog):
  for i in range(3):
    _encode(tmp_path / f"v{i}.mp4", 6 + 4 * i)
  data = open(tmp_path / "v2.mp4", "rb").read()
  (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
  (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
  rows = [dict(path="v0.mp4", label=0), dict(path="cut.mp4", label=1),
          dict(path="v1.mp4", label=1, start=0.0, end=0.5), dict(path="junk.mp4", label=2),
          dict(path="v2.mp4", label=2)]
  manifest = tmp_path / "clips.jsonl"
  manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
  spec = config_lib.SourceSpec.from_dict("clips", dict(type="video_folder", path=str(manifest)))
  cfg = data_config.DataConfig(
    sources=(spec,), frames=(1, 4), bucket_weights=(1, 1), tokens_per_batch=4 * 16 * 4,
    image_size=16, patch_size=4, transform=data_config.TransformConfig(16),
    max_bad_fraction=0.6)
  ds = pipeline.build_train_dataset(cfg, process_index=0, process_count=1)
  with caplog.at_level("WARNING"):
    batches = list(itertools.islice(iter(ds), 6))
  ids = set(np.concatenate([b["id"] for b in batches]).tolist())
  assert ids <= {0, 2, 4} and len(ids) >= 2
  assert "cut.mp4" in caplog.text and "junk.mp4" in caplog.text
  four = [b for b in batches if b["frames"].shape[1] == 4]
  assert four and all(b["frames"].shape == (4, 4, 16, 16, 3) for b in four)


def test_window_late_in_a_longer_clip_is_sought(tmp_path):
  path = _encode(tmp_path / "long.mp4", 30)
  frames, mask = video.read_clip(path, 4, "random_window", 1, None, start=2.0, end=2.8)
  # Frames 20..27; the centred 4-frame window is 22..25.
  assert _frame_ids(frames) == [22, 23, 24, 25] and mask.all()
  frames, _ = video.read_clip(path, 3, "uniform", 1, None, start=2.5)
  assert _frame_ids(frames) == [25, 27, 29]


@pytest.mark.parametrize("suffix", [".mkv", ".ts"])
def test_container_without_frame_count_decodes_only_up_to_the_last_frame_needed(
    tmp_path, monkeypatch, suffix):
  path = _encode(tmp_path / f"clip{suffix}", 20)
  with av.open(path) as container:
    assert container.streams.video[0].frames == 0  # the header does not state its frame count
  decoded = []
  indexed_frames = video._indexed_frames

  def recording(*args):
    for i, frame in indexed_frames(*args):
      decoded.append(i)
      yield i, frame

  monkeypatch.setattr(video, "_indexed_frames", recording)
  frames, mask = video.read_clip(path, 4, "uniform", 1, None)
  assert _frame_ids(frames) == [2, 7, 12, 17] and mask.all()
  assert max(decoded) == 17  # not the whole clip: decoding stopped at the last frame needed
  decoded.clear()
  frames, _ = video.read_clip(path, 3, "random_window", 1, None)  # the centred window 8..10
  assert _frame_ids(frames) == [8, 9, 10] and max(decoded) == 10
  frames, mask = video.read_clip(path, 8, "uniform", 1, None, start=1.0, end=1.5)
  assert _frame_ids(frames) == [10, 11, 12, 13, 14, 14, 14, 14]
  assert mask.tolist() == [True] * 5 + [False] * 3
