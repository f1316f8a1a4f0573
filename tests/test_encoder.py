"""`univit_jax.load_encoder`: an export as a frozen feature extractor, and train mode's export."""

import jax
import numpy as np
import pytest
from flax import nnx

import univit_jax
from helpers import load_config
from univit_jax import checkpointing, config_lib
from univit_jax.data import demo, pipeline, transforms, video
from univit_jax.models import vit


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  config = load_config("demo")
  graphdef, params = vit.init_encoder(config_lib.model_config(config), seed=3)
  path = tmp_path_factory.mktemp("run") / "export"
  checkpointing.save_export(path, params, config.to_json_best_effort())
  return path, jax.tree.map(np.asarray, params), graphdef, config


def test_embed_of_a_record_equals_what_training_saw(export):
  """uint8 frames of a record into `embed` == the pipeline's normalised frames into the model."""
  path, params, graphdef, config = export
  encoder = univit_jax.load_encoder(path)
  source = demo.DemoSource("events", "test", num_examples=2, image_size=config.data.image_size)
  data_cfg = pipeline.DataConfig.from_config(config)
  batch = next(iter(pipeline.build_eval_dataset(
    data_cfg, 4, 2, source_names=["events"], sources={"digits": source, "events": source,
                                                      "objects": source})))
  trained, _ = jax.jit(lambda p, f: nnx.merge(graphdef, p)(f))(params, batch["frames"])
  records = np.stack([source[i]["frames"] for i in range(2)])  # uint8 [2, 16, S, S, 3]
  picked = records[:, video.sample_indices(records.shape[1], 4, "uniform", 2, None)[0]]
  np.testing.assert_allclose(encoder.embed(picked), trained, atol=1e-5)


def test_loaded_encoder_embeds_images_and_clips_like_the_model(export):
  path, params, graphdef, config = export
  encoder = univit_jax.load_encoder(path)
  assert encoder.model.width == config.model.width and str(path) in encoder.name
  size = config.data.image_size
  frames = np.random.default_rng(0).uniform(size=(2, 3, size, size, 3)).astype(np.float32)
  normalized = transforms.normalize(frames, config.data.mean, config.data.std)
  expected, _ = jax.jit(lambda p, f: nnx.merge(graphdef, p)(f))(params, normalized)
  np.testing.assert_allclose(encoder.embed(frames), expected, atol=1e-5)
  np.testing.assert_allclose(encoder.apply(normalized)[0], expected, atol=1e-5)
  image = frames[:, 0]
  np.testing.assert_allclose(encoder.embed(image), encoder.embed(image[:, None]), atol=1e-6)
  embedding, aux = encoder(frames, segments=(3,))
  assert embedding.shape == (2, config.model.width)
  assert aux["segments"][3].shape == (2, 3, config.model.width)


def test_missing_export_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*not an export"):
    univit_jax.load_encoder(tmp_path)


def test_train_mode_exports_the_trained_encoder(tmp_path, capsys):
  import train_fixtures  # pylint: disable=import-outside-toplevel
  from univit_jax import main  # pylint: disable=import-outside-toplevel
  config = train_fixtures.tiny_config()
  config.total_steps = 2
  train_fixtures.write_clusters(str(tmp_path))
  main._train(config, str(tmp_path))  # pylint: disable=protected-access
  assert f"Encoder export (univit_jax.load_encoder): {tmp_path}/export" in capsys.readouterr().out
  encoder = univit_jax.load_encoder(tmp_path / "export")
  size = config.data.image_size
  assert encoder.embed(np.zeros((2, size, size, 3), np.float32)).shape == (2, config.model.width)
