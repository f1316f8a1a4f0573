"""Image-only and video-only data with the default loss settings: the banks, the event schedule,
the buckets and the loss terms follow what the sources yield (`config_lib.active_parts`)."""

import json

import numpy as np
import pytest
from PIL import Image

import helpers
from univit_jax import config_lib, losses


def write_images(folder, count: int = 16) -> str:
  """`count` random 40 x 48 PNGs, unlabelled (directly under `folder`)."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(folder / f"{i}.png")
  return str(folder)


def write_videos(folder, count: int = 8) -> str:
  """`count` short H.264 clips of random pixels (8 to 15 frames), unlabelled."""
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(count):
    helpers.encode_video(folder / f"{i}.mp4", 8 + i, size=32, rng=rng)
  return str(folder)


def _default_loss_config(sources: dict):
  config = config_lib.default_config("mu/8")
  config.data.sources = sources
  return config


def test_images_alone_use_the_object_bank_and_the_one_frame_bucket():
  config = _default_loss_config(dict(imgs=dict(type="image_folder", path="/data/imgs")))
  parts = config_lib.active_parts(config)
  assert (parts.images, parts.clips, parts.banks) == (True, False, ("object",))
  assert (parts.frames, parts.bucket_weights) == ((1,), (4.0,))
  loss = config_lib.loss_config(config)
  assert loss.bank_weights == (("object", 1.0),)
  assert loss.event_schedule == config_lib.NO_EVENT_SCHEDULE
  assert losses.loss_weights(loss, 0.9) == dict(object=1.0, contrastive=1.0)
  # The schedule is not used, so an empty one is accepted too.
  config.loss.event_schedule = ()
  assert config_lib.loss_config(config).trained_banks == ("object",)


def test_videos_alone_use_the_event_banks_and_every_bucket():
  config = _default_loss_config(dict(clips=dict(type="video_folder", path="/data/clips")))
  parts = config_lib.active_parts(config)
  assert (parts.images, parts.clips) == (False, True)
  assert parts.banks == ("event_1", "event_2", "event_4", "event_8")
  assert parts.frames == (1, 2, 4, 8, 16)
  loss = config_lib.loss_config(config)
  assert loss.trained_banks == ("event_1", "event_2", "event_4", "event_8")
  assert losses.loss_weights(loss, 0.3) == dict(
    event_1=1.0, event_2=1.0, event_4=0.0, event_8=0.0, contrastive=1.0)


def test_images_and_clips_keep_every_part_as_before():
  config = helpers.demo_config()
  parts = config_lib.active_parts(config)
  assert parts.banks == ("object", "event_1", "event_2", "event_4", "event_8")
  assert parts.frames == tuple(config.data.frames)
  assert config_lib.loss_config(config).event_schedule == tuple(config.loss.event_schedule)


@pytest.mark.parametrize("sources,weights,message", [
  (dict(imgs=dict(type="image_folder", path="/x")), dict(object=0.0, event_1=1.0),
   "no bank the data feeds has a positive weight"),
  (dict(clips=dict(type="video_folder", path="/x")), dict(object=1.0),
   "no bank the data feeds has a positive weight"),
  (dict(imgs=dict(type="image_folder", path="/x")), dict(object=1.0, ocr=1.0),
   "loss.bank_weights.ocr: unknown bank"),
])
def test_bank_weights_that_leave_nothing_to_train_are_refused(sources, weights, message):
  config = _default_loss_config(sources)
  config.loss.bank_weights = weights
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.loss_config(config)


def test_with_clips_every_bucket_must_be_fed():
  config = helpers.demo_config()
  config.data.sources.events.frames = (16,)
  with pytest.raises(config_lib.ConfigError, match=r"no source feeds the \[2, 4, 8\]-frame"):
    config_lib.active_parts(config)


def _run_pipeline(tmp_path, sources: dict, *overrides: str) -> dict:
  """Runs the tiny pipeline through `main` and returns its round's summary (pipeline.json)."""
  config = helpers.write_tiny_config(tmp_path, sources)
  workdir = tmp_path / "run"
  result = helpers.run_main(f"--config={config}", f"--workdir={workdir}", *overrides,
                            timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "round_1" / "export" / "config.json").exists()
  return json.loads((workdir / "pipeline.json").read_text())["rounds"][0]


@pytest.mark.slow
def test_pipeline_over_an_image_folder_alone(tmp_path):
  images = write_images(tmp_path / "images")
  # The default buckets (1, 2, 4, 8, 16): only the 1-frame one is fed, and trained.
  summary = _run_pipeline(tmp_path, dict(imgs=dict(type="image_folder", path=images)))
  assert set(summary["clusters"]) == {"object"}
  assert "object/loss" in summary["last_losses"]
  assert not any(k.startswith("event_") for k in summary["last_losses"])


@pytest.mark.slow
def test_pipeline_over_a_video_folder_alone(tmp_path):
  videos = write_videos(tmp_path / "videos")
  summary = _run_pipeline(tmp_path, dict(clips=dict(type="video_folder", path=videos)),
                          "--config.data.frames=(1,2)", "--config.data.bucket_weights=(1,1)")
  assert set(summary["clusters"]) == {"event_1", "event_2", "event_4", "event_8"}
  assert "object/loss" not in summary["last_losses"] and "event_1/loss" in summary["last_losses"]
