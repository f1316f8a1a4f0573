"""`--mode=embed`: an export's embeddings of every record of a source (`univit_jax/embed.py`)."""

import json
import os

import numpy as np
import pytest

import helpers
import univit_jax
from test_data_kinds import write_images
from univit_jax import config_lib, embed
from univit_jax import encoder as encoder_lib
from univit_jax.data import sources
from univit_jax.evaluation import tasks
from univit_jax.models import vit

WIDTH, SIZE = 64, 32  # the demo encoder's


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
  """A random-init export of the demo encoder."""
  run = helpers.typed(helpers.demo_config())
  _, params = vit.init_encoder(run.model, seed=2)
  return encoder_lib.export_encoder(run, str(tmp_path_factory.mktemp("run")), params)


def _run(export_path: str, output, source: dict, **fields):
  """The demo run embedding `source` with `export_path` into `output` (8 records a batch, one
  per fake device)."""
  config = helpers.demo_config()
  config.embed.encoder, config.embed.output, config.embed.batch_size = export_path, str(output), 8
  config.embed.source = source
  for key, value in fields.items():
    config.embed[key] = value
  return helpers.typed(config)


def _load(folder: str) -> dict:
  arrays = {f[:-4]: np.load(os.path.join(folder, f)) for f in os.listdir(folder)
            if f.endswith(".npy")}
  for name in ("keys", "embed"):
    with open(os.path.join(folder, f"{name}.json")) as f:
      arrays[name] = json.load(f)
  return arrays


def _frames(spec: dict, count: int, num_frames: int) -> tuple[list[dict], np.ndarray]:
  """The records of a source spec and their uint8 frames as evaluation reads them."""
  source = sources.build_source(config_lib.SourceSpec.from_dict("test", spec))
  records = [source[i] for i in range(count)]
  return records, np.stack([tasks.eval_frames(r, num_frames, SIZE) for r in records])


@pytest.mark.slow
def test_embeds_an_image_folder_like_load_encoder(export, tmp_path):
  """Row i of an image folder's embeddings is `load_encoder(export).embed` of image i (40 x 48
  PNGs: centre square, resized); 11 images make a full and a padded batch."""
  spec = dict(type="image_folder", path=write_images(tmp_path / "images", count=11))
  out = embed.run_embed(_run(export, tmp_path / "out", spec), None)
  result = _load(out)
  assert result["embeddings"].shape == (11, WIDTH) and result["embeddings"].dtype == np.float32
  np.testing.assert_array_equal(result["ids"], np.arange(11))
  records, frames = _frames(spec, 11, 1)
  assert result["keys"] == [r["key"] for r in records]
  np.testing.assert_allclose(result["embeddings"], univit_jax.load_encoder(export).embed(frames),
                             atol=1e-5)
  assert {k: result["embed"][k] for k in ("rows", "skipped", "frames", "export")} == dict(
    rows=11, skipped=0, frames=1, export=export)


@pytest.mark.slow
def test_embeds_clips_with_segment_and_region_embeddings(export, tmp_path):
  """Clips get per-segment embeddings, images with boxes per-box ones, as the encoder pools
  them; the keys of in-memory records are their indices."""
  encoder = univit_jax.load_encoder(export)
  clips = dict(type="demo", kind="events", split="test", num_examples=3, image_size=SIZE,
               num_frames=8)
  result = _load(embed.run_embed(_run(export, tmp_path / "clips", clips, frames=4,
                                         segments=(2,)), None))
  _, frames = _frames(clips, 3, 4)
  embedding, aux = encoder(frames, segments=(2,))
  np.testing.assert_allclose(result["embeddings"], embedding, atol=1e-5)
  np.testing.assert_allclose(result["segments_2"], aux["segments"][2], atol=1e-5)
  assert result["segment_mask_2"].all() and result["keys"] == ["0", "1", "2"]

  images = dict(type="demo", kind="objects", split="test", num_examples=3, image_size=SIZE)
  result = _load(embed.run_embed(_run(export, tmp_path / "boxes", images, regions=True), None))
  records, frames = _frames(images, 3, 1)
  max_boxes = helpers.demo_config().data.max_boxes
  boxes = np.zeros((3, max_boxes, 4), np.float32)
  mask = np.zeros((3, max_boxes), bool)
  for i, record in enumerate(records):
    n = min(len(record["boxes"]), max_boxes)
    boxes[i, :n], mask[i, :n] = record["boxes"][:n], record["box_mask"][:n]
  _, aux = encoder(frames, boxes=boxes)
  assert result["regions"].shape == (3, max_boxes, WIDTH)
  np.testing.assert_array_equal(result["region_mask"], mask)
  np.testing.assert_allclose(result["regions"][mask], np.asarray(aux["regions"])[mask], atol=1e-5)


def test_bad_embed_settings_are_named(export, tmp_path):
  folder = dict(type="image_folder", path=write_images(tmp_path / "images", count=2))
  with pytest.raises(config_lib.ConfigError, match="embed.source is empty"):
    embed.run_embed(helpers.typed(helpers.demo_config()), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match="embed.source: .*needs fields"):
    _run(export, tmp_path, dict(type="image_folder"))
  with pytest.raises(config_lib.ConfigError, match="embed.batch_size=3 must be a multiple of 8"):
    embed.run_embed(_run(export, tmp_path / "out", folder, batch_size=3), None)
  with pytest.raises(sources.SourceError, match="embed.regions=True, but .* no boxes"):
    embed.run_embed(_run(export, tmp_path / "out", folder, regions=True), None)
  with pytest.raises(config_lib.ConfigError, match="embed.output is empty: set it or pass"):
    embed.run_embed(_run(export, "", folder), None)


@pytest.mark.slow
def test_embed_mode_runs_from_the_command_line(export, tmp_path):
  folder = write_images(tmp_path / "images", count=3)
  result = helpers.run_main(
    "--config=configs/demo.py", f"--workdir={os.path.dirname(export)}", "--mode=embed",
    f"--config.embed.source={json.dumps(dict(type='image_folder', path=folder))}",
    "--config.embed.batch_size=2")
  assert result.returncode == 0, result.stderr
  out = os.path.join(os.path.dirname(export), "embeddings")
  assert f"Embeddings: {out}" in result.stdout
  assert np.load(os.path.join(out, "embeddings.npy")).shape == (3, WIDTH)
