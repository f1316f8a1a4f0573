"""The teachers a user brings: precomputed features (`features:<folder>`) and a big_vision SigLIP
image tower (`siglip:<file.npz>`), on a small demo source set."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_siglip
from helpers import demo_config, typed
from univit_jax import config_lib, preflight, sharding, specs
from univit_jax.clustering import extract, store
from univit_jax.data import pipeline
from univit_jax.models import siglip
from univit_jax.run_config import data_config

# Sources sort by name, so ids are digits 0-4, events 5-7, objects 8-14: the image group's first
# chunk (batch 8) holds digits and objects.
COUNTS = dict(digits=5, events=3, objects=7)
DIM = 6


def small_config(teacher: str = "pixels"):
  c = demo_config()
  c.mesh.shape = (-1, 1, 1)
  for name, count in COUNTS.items():
    c.data.sources[name].num_examples = count
  c.extract.batch_size = 8
  c.extract.teacher = teacher
  return c


def write_features(folder, seed=0, **replace) -> dict[str, np.ndarray]:
  """`<folder>/<source>.npy` for the sources of `small_config` (entries of `replace` instead)."""
  rng = np.random.default_rng(seed)
  arrays = dict(digits=rng.normal(size=(5, DIM)), objects=rng.normal(size=(7, DIM)),
                events=rng.normal(size=(3, 16, DIM)))
  arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
  arrays.update(replace)
  os.makedirs(folder, exist_ok=True)
  for name, array in arrays.items():
    if array is not None:
      np.save(os.path.join(folder, f"{name}.npy"), array)
  return arrays


def read_bank(workdir, bank):
  reader = store.BankReader(str(workdir), bank)
  return np.concatenate(list(reader.rows(0, reader.num_rows))), reader.ids(), reader.teacher


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_id_ranges_are_the_ids_batches_carry():
  data_cfg = data_config.DataConfig.from_config(small_config())
  ranges = pipeline.id_ranges(data_cfg, pipeline.open_sources(data_cfg))
  assert ranges == dict(digits=range(0, 5), events=range(5, 8), objects=range(8, 15))
  batch = next(iter(pipeline.build_eval_dataset(data_cfg, 1, 8, source_names=["objects"],
                                                process_index=0, process_count=1)))
  np.testing.assert_array_equal(batch["id"][batch["example_mask"]], np.arange(8, 15))


def test_precomputed_features_become_rows_keyed_by_example_id(tmp_path, monkeypatch):
  arrays = write_features(tmp_path / "feats")

  def no_frames(*args, **kwargs):
    raise AssertionError("the features teacher decoded frames")

  monkeypatch.setattr(pipeline, "build_eval_dataset", no_frames)
  config = small_config(f"features:{tmp_path / 'feats'}")
  teachers = extract.run_extract(typed(config), str(tmp_path / "run"))
  assert set(teachers) == {"object", "event_1", "event_2", "event_4", "event_8"}
  assert all(t.startswith(f"features:{tmp_path / 'feats'}:") for t in teachers.values())

  feats, ids, _ = read_bank(tmp_path / "run", "object")
  assert (ids[:, 1] == -1).all(), "a features teacher gives images no region rows"
  np.testing.assert_array_equal(ids[:, 0], [*range(0, 5), *range(8, 15)])
  np.testing.assert_allclose(feats, unit(np.concatenate([arrays["digits"], arrays["objects"]])),
                             rtol=1e-6, atol=1e-6)
  for g in (1, 2, 4, 8):
    feats, ids, _ = read_bank(tmp_path / "run", f"event_{g}")
    expected = np.asarray(extract.event_features(jnp.asarray(arrays["events"]), g, 2))
    np.testing.assert_allclose(feats, expected.reshape(3 * g, -1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ids, [(5 + i, s) for i in range(3) for s in range(g)])


@pytest.mark.parametrize("replace,message", [
  (dict(objects=None), r"no features for the data source 'objects': .*feats/objects.npy does "
                       "not exist"),
  (dict(digits=np.zeros((4, DIM), np.float32)),
   r"feats/digits.npy: 4 rows, but the image source 'digits' has 5 records \(expected "
   r"\[N=5, D\]\)"),
  (dict(events=np.zeros((3, DIM), np.float32)),
   r"feats/events.npy: a float32 array of shape \(3, 6\); the clip source 'events' needs a "
   r"float array \[N=3, F=16, D\]"),
  (dict(digits=np.zeros((5, DIM), np.int32)), r"feats/digits.npy: a int32 array"),
  (dict(events=np.zeros((3, 8, DIM), np.float32)),
   r"feats/events.npy: F=8 frame embeddings per clip, but extract.clip_frames=16"),
  (dict(objects=np.zeros((7, DIM + 1), np.float32)), r"the files differ in width D")])
def test_malformed_feature_files_are_named(tmp_path, replace, message):
  write_features(tmp_path / "feats", **replace)
  config = small_config(f"features:{tmp_path / 'feats'}")
  with pytest.raises(extract.TeacherError, match=message):
    extract.run_extract(typed(config), str(tmp_path / "run"))


def test_non_finite_features_name_the_file_and_first_bad_row(tmp_path):
  objects = np.ones((7, DIM), np.float32)
  objects[4, 2], objects[6, 0] = np.nan, np.inf
  write_features(tmp_path / "feats", objects=objects)
  config = small_config(f"features:{tmp_path / 'feats'}")
  with pytest.raises(extract.TeacherError, match=r"feats/objects.npy: row 4 holds non-finite"):
    extract.run_extract(typed(config), str(tmp_path / "run"))


@pytest.fixture
def tiny_siglip(tmp_path, monkeypatch):
  """A random tiny SigLIP checkpoint (test_siglip's) and its unscanned image arrays."""
  monkeypatch.setitem(siglip.SIZES, "tiny", specs.Size(
    test_siglip.WIDTH, test_siglip.DEPTH, test_siglip.HEADS, test_siglip.MLP))
  ckpt, params = test_siglip.big_vision_checkpoint()
  return test_siglip.write(tmp_path / "siglip.npz", ckpt), params


@pytest.mark.parametrize("image_size", [32, 16])
@pytest.mark.slow
def test_siglip_teacher_feeds_the_tower_pixels_in_minus_one_to_one(tiny_siglip, image_size):
  path, params = tiny_siglip
  config = small_config()
  config.data.image_size = image_size
  data_cfg = data_config.DataConfig.from_config(config)
  mesh_cfg = config_lib.MeshConfig.from_config(config)
  teacher = extract.siglip_teacher(path, test_siglip.VARIANT, data_cfg,
                                   sharding.make_mesh(mesh_cfg), mesh_cfg.rules)
  assert teacher.dim == test_siglip.WIDTH and teacher.name.startswith("siglip:")
  pixels = np.random.default_rng(0).uniform(0, 1, (2, 3, image_size, image_size, 3))
  mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
  frames = jnp.asarray(((pixels - mean) / std).astype(np.float32))  # as the pipeline gives them
  tower_input = jax.image.resize(jnp.asarray(2 * pixels - 1, jnp.float32).reshape(
    6, image_size, image_size, 3), (6, 32, 32, 3), "bilinear")  # the tower's 32 px
  with jax.default_matmul_precision("highest"):
    embedded = np.asarray(teacher.embed(frames))
    whole = np.asarray(teacher.regions(frames[:, 0], jnp.broadcast_to(
      jnp.asarray(extract.FULL_FRAME), (2, 1, 4))))
    expected, _ = test_siglip.reference_tower(params, tower_input)
  np.testing.assert_allclose(embedded.reshape(6, -1), expected, atol=1e-4, rtol=1e-4)
  # The full-frame region is the image embedding (MAP pooling over every patch), normalised.
  np.testing.assert_allclose(whole[:, 0], unit(embedded[:, 0]), atol=1e-5)


def test_siglip_teacher_extracts_every_bank(tiny_siglip, tmp_path):
  path, _ = tiny_siglip
  config = small_config(f"siglip:{path}")
  config.extract.siglip_variant = test_siglip.VARIANT
  teachers = extract.run_extract(typed(config), str(tmp_path / "run"))
  feats, ids, teacher = read_bank(tmp_path / "run", "object")
  assert teacher.startswith(f"siglip:{path}:{test_siglip.VARIANT}:") and feats.shape[1] == 32
  assert (ids[:, 1] == -1).sum() == 12 and (ids[:, 1] >= 0).sum() >= 12  # images and regions
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
  feats, ids, _ = read_bank(tmp_path / "run", "event_4")
  assert feats.shape == (3 * 4, 2 * 32) and set(teachers.values()) == {teacher}


def test_unknown_siglip_variant_is_a_config_error(tiny_siglip):
  path, _ = tiny_siglip
  config = small_config(f"siglip:{path}")
  config.extract.siglip_variant = "Q/16"
  run = typed(config)
  with pytest.raises(config_lib.ConfigError, match="extract.siglip_variant='Q/16'"):
    preflight.check(run, "extract")  # before any stage runs
  with pytest.raises(config_lib.ConfigError, match="extract.siglip_variant='Q/16'"):
    extract.make_teacher(run.extract, run.data, sharding.make_mesh(run.mesh), run.mesh.rules,
                         run.seed)
