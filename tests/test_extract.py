"""Teacher-feature extraction: feature definitions, the stage on demo data, resume after a kill."""

import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, demo_config, typed, xla_flags
from univit_jax.clustering import extract, store
from univit_jax.data import pipeline
from univit_jax.evaluation import features, tasks
from univit_jax.run_config import stage_config


def test_event_features_have_the_documented_shapes():
  rng = np.random.default_rng(0)
  frames = rng.normal(size=(3, 16, 5)).astype(np.float32)
  for g in (1, 2, 4, 8):
    feats = np.asarray(extract.event_features(jnp.asarray(frames), g, 2))
    assert feats.shape == (3, g, 10)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=-1), 1.0, rtol=1e-5)
  # Segment s of g = 4 concatenates the normalised frames 4s and 4s + 3, in time order.
  unit = frames / np.linalg.norm(frames, axis=-1, keepdims=True)
  expected = np.concatenate([unit[:, 4], unit[:, 7]], axis=-1) / np.sqrt(2)
  np.testing.assert_allclose(np.asarray(extract.event_features(jnp.asarray(frames), 4, 2))[:, 1],
                             expected, rtol=1e-5)
  np.testing.assert_array_equal(extract.segment_frame_indices(16, 8, 2)[3], [6, 7])
  np.testing.assert_array_equal(extract.segment_frame_indices(4, 8, 2)[5], [2, 2])


def test_encoder_teacher_regions_are_its_region_embeddings(tmp_path):
  """An export's region row is what its object term trained: the box's MAP-pooled embedding, so
  the full-frame box gives exactly the image embedding (round 2 clusters one space)."""
  import jax  # pylint: disable=import-outside-toplevel
  from univit_jax import encoder as encoder_lib, sharding  # pylint: disable=import-outside-toplevel
  from univit_jax.models import vit  # pylint: disable=import-outside-toplevel
  run = typed(demo_config())
  _, params = vit.init_encoder(run.model, seed=3)
  path = encoder_lib.export_encoder(run, str(tmp_path), params)
  teacher = extract.encoder_teacher(path, sharding.make_mesh(run.mesh))
  frames = jnp.asarray(np.random.default_rng(0).normal(size=(2, 1, 32, 32, 3)), jnp.float32)
  full, quarter = [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]
  boxes = jnp.asarray([[full, quarter]] * 2, jnp.float32)
  with jax.default_matmul_precision("highest"):
    whole = np.asarray(teacher.embed(frames))[:, 0]
    regions = np.asarray(teacher.regions(frames[:, 0], boxes))
    _, aux = encoder_lib.load_encoder(path).apply(frames, boxes=boxes)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(regions[:, 0], unit(whole), atol=1e-5)
  np.testing.assert_allclose(regions[:, 1], unit(np.asarray(aux["regions"])[:, 1]), atol=1e-5)
  assert np.abs(regions[:, 0] - regions[:, 1]).max() > 1e-3


def test_crop_of_the_full_frame_is_the_frame_and_a_box_is_its_pixels():
  frames = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8)).astype(np.float32))
  full = jnp.broadcast_to(jnp.asarray(extract.FULL_FRAME), (2, 1, 4))
  np.testing.assert_allclose(extract.crop_boxes(frames, full, 8)[:, 0], frames, atol=1e-5)
  quarter = jnp.asarray([[[0.5, 0.0, 1.0, 0.5]]] * 2)  # bottom-left 4 x 4 pixels
  np.testing.assert_allclose(extract.crop_boxes(frames, quarter, 4)[:, 0], frames[:, 4:, :4],
                             atol=1e-5)


def test_pixels_teacher_puts_images_and_regions_in_one_space_blind_to_colour():
  from univit_jax.data import demo
  source = demo.DemoSource("items", "train", num_examples=64, image_size=32)
  frames = np.stack([source[i]["frames"][0] for i in range(64)]).astype(np.float32) / 255
  teacher = extract.pixels_teacher(frames, 16, seed=0)
  embedded = np.asarray(teacher.embed(jnp.asarray(frames[:4, None])))[:, 0]
  whole = np.asarray(teacher.regions(jnp.asarray(frames[:4]), jnp.broadcast_to(
    jnp.asarray(extract.FULL_FRAME), (4, 1, 4))))[:, 0]
  np.testing.assert_allclose(whole, embedded, atol=1e-4)  # the full-frame region is the image
  np.testing.assert_allclose(np.linalg.norm(embedded, axis=-1), 1.0, rtol=1e-5)
  # Another canvas colour and tint (an affine change per channel) leaves the grey view intact.
  recoloured = frames[:4] * np.array([0.5, 0.9, 0.7], np.float32) + 0.2
  np.testing.assert_allclose(np.asarray(teacher.embed(jnp.asarray(recoloured[:, None])))[:, 0],
                             embedded, atol=0.05)


def test_proposals_only_for_images_without_boxes():
  batch = dict(frames=np.zeros((2, 1, 8, 8, 3)), boxes=np.zeros((2, 4, 4), np.float32),
               box_mask=np.array([[True, False, False, False], [False] * 4]))
  batch["boxes"][0, 0] = [0.1, 0.2, 0.3, 0.4]
  proposals = extract.grid_proposals((2,))
  boxes, valid = extract.object_boxes(batch, proposals)
  np.testing.assert_array_equal(valid, [[True, False, False, False], [True] * 4])
  np.testing.assert_allclose(boxes[0, 0], [0.1, 0.2, 0.3, 0.4])
  np.testing.assert_allclose(boxes[1], proposals)


def small_demo(num_images=48, num_clips=24):
  config = demo_config()
  config.mesh.shape = (-1, 1, 1)
  config.data.sources.digits.num_examples = num_images
  config.data.sources.objects.num_examples = num_images
  config.data.sources.events.num_examples = num_clips
  config.extract.batch_size = 8
  config.extract.pixels_fit_examples = 32
  config.extract.pixels_dim = 16
  return config


def read_bank(workdir, bank):
  reader = store.BankReader(str(workdir), bank)
  return np.concatenate(list(reader.rows(0, reader.num_rows))), reader.ids()


@pytest.mark.slow
def test_demo_extraction_writes_every_bank(tmp_path):
  run = typed(small_demo())
  teachers = extract.run_extract(run, str(tmp_path))
  assert sorted(teachers) == ["event_1", "event_2", "event_4", "event_8", "object"]
  feats, ids = read_bank(tmp_path, "object")
  assert feats.shape[1] == 16
  images = np.unique(ids[:, 0])
  assert len(images) == 96 and (ids[:, 1] == -1).sum() == 96  # one global row per image
  assert ((ids[:, 1] >= 0).sum()) >= 96  # at least one region each
  for g in (1, 2, 4, 8):
    feats, ids = read_bank(tmp_path, f"event_{g}")
    assert feats.shape == (24 * g, 2 * 16)
    np.testing.assert_array_equal(ids[:g, 1], np.arange(g))
  # Each row's record key: the sample id's source name and index (the demo numbers its records).
  np.testing.assert_array_equal(store.BankReader(str(tmp_path), "event_1").keys(),
                                [f"events/{i}".encode() for i in range(24)])
  # A second run finds every bank complete and does nothing.
  before = os.path.getmtime(tmp_path / "features" / "object" / "meta.json")
  extract.run_extract(run, str(tmp_path))
  assert os.path.getmtime(tmp_path / "features" / "object" / "meta.json") == before


@pytest.mark.slow
def test_teacher_baseline_reproduces_the_rows_round_1_clusters(tmp_path):
  """The evaluation's "teacher" row (`features.pixels_teacher`) embeds a record exactly as the
  extract stage wrote it: an image's whole-image object row, a clip's event_1 row."""
  config = small_demo(num_images=16, num_clips=8)
  run = typed(config)
  extract.run_extract(run, str(tmp_path))
  teacher = features.pixels_teacher(run.extract, run.data, run.seed)
  data_cfg = run.data
  opened = pipeline.open_sources(data_cfg)
  ids = pipeline.id_ranges(data_cfg, opened)
  for source, bank, sub in (("digits", "object", -1), ("events", "event_1", 0)):
    feats, row_ids = read_bank(tmp_path, bank)
    by_id = {(int(i), int(j)): f for (i, j), f in zip(row_ids, feats)}
    num_frames = config.extract.clip_frames if bank == "event_1" else 1
    records = [opened[source][i] for i in range(4)]
    frames = np.stack([tasks.eval_frames(r, num_frames, config.data.image_size)
                       for r in records])
    embedding = teacher(frames)["embedding"]
    expected = np.stack([by_id[(ids[source][i], sub)] for i in range(4)])
    np.testing.assert_allclose(embedding, expected, atol=2e-3, err_msg=source)


@pytest.mark.slow
def test_extraction_resumes_after_sigkill(tmp_path):
  args = ["--config=configs/demo.py", "--mode=extract", "--config.extract.batch_size=8",
          "--config.data.sources.digits.num_examples=96",
          "--config.data.sources.objects.num_examples=96",
          "--config.data.sources.events.num_examples=16",
          "--config.extract.pixels_fit_examples=32", "--config.extract.pixels_dim=16"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")

  def run(workdir):
    return subprocess.Popen([sys.executable, "-m", "univit_jax.main", *args,
                             f"--workdir={workdir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  killed = tmp_path / "killed"
  proc = run(killed)
  first_chunk = killed / "features" / "object" / "chunk_00002.npy"
  deadline = time.time() + 240
  while not first_chunk.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  meta = store.BankReader(str(killed), "object", require_complete=False).meta
  assert not meta["complete"] and len(meta["chunks"]) < 24, "the kill came too late"
  assert run(killed).wait(timeout=300) == 0
  whole = tmp_path / "whole"
  assert run(whole).wait(timeout=300) == 0
  for bank in ("object", "event_1", "event_8"):
    for a, b in zip(read_bank(killed, bank), read_bank(whole, bank)):
      np.testing.assert_array_equal(a, b)


def test_bad_extract_config_names_the_field():
  config = small_demo()
  config.extract.granularities = (1, 32)
  from univit_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match="extract.granularities"):
    stage_config.ExtractConfig.from_config(config)


def test_features_made_from_other_inputs_are_refused_never_reused(tmp_path):
  """Issue 13: the stage skips complete banks and resumes unfinished ones, but only for the
  inputs they record (`extract.feature_inputs`); another data source or extract setting is
  refused, naming the change, before any work."""
  config = small_demo(num_images=8, num_clips=4)
  run = typed(config)
  inputs = extract.feature_inputs(run.extract, run.data)
  banks = run.parts.banks
  for bank in banks:
    writer = store.BankWriter(str(tmp_path), bank, 4, "t", inputs)
    writer.write_chunk(0, np.eye(4, dtype=np.float32), np.arange(4))
    writer.finish()
  assert extract.run_extract(run, str(tmp_path)) == {b: "t" for b in banks}  # kept as is
  more = typed(small_demo(num_images=9, num_clips=4))
  with pytest.raises(store.FeatureStoreError,
                     match=r"features in \S+/features/\w+ were extracted from other inputs.*"
                           r"data\.sources\.digits\.records was 8, now 9.*delete \S+/features"):
    extract.run_extract(more, str(tmp_path))
  config.extract.pixels_dim = 8
  with pytest.raises(store.FeatureStoreError, match="extract.pixels_dim was 16, now 8"):
    extract.run_extract(typed(config), str(tmp_path))
  # An unfinished bank is not resumed for other inputs, nor one that records none.
  unfinished = tmp_path / "unfinished"
  store.BankWriter(str(unfinished), "object", 4, "t", inputs).write_chunk(
    0, np.eye(4, dtype=np.float32), np.arange(4))
  with pytest.raises(store.FeatureStoreError, match="data.sources.objects.records was 8, now 9"):
    extract.run_extract(more, str(unfinished))
  store.BankWriter(str(tmp_path / "old"), "object", 4, "t")
  with pytest.raises(store.FeatureStoreError, match="nothing was recorded"):
    extract.run_extract(more, str(tmp_path / "old"))
