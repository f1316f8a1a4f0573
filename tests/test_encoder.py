"""`univit_jax.load_encoder`: an export as a frozen feature extractor; train mode's and
`--mode=export`'s exports; encoder.json and the encoder.safetensors name map."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from scipy import special

import helpers
import univit_jax
from helpers import demo_config
from univit_jax import checkpointing, config_lib, encoder as encoder_lib
from univit_jax import positions as positions_lib
from univit_jax.data import demo, pipeline, transforms, video
from univit_jax.models import rope, vit
from univit_jax.run_config import data_config
from univit_jax.train import state as state_lib


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  config = demo_config()
  config.model.dtype = "auto"
  run = helpers.typed(config)
  graphdef, params = vit.init_encoder(run.model, seed=3)
  path = encoder_lib.export_encoder(run, str(tmp_path_factory.mktemp("run")), params)
  return path, jax.tree.map(np.asarray, params), graphdef, config


def _record_frames(data_cfg: data_config.DataConfig, sources: dict, name: str, num_frames: int,
                   count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` records of the clip source `name` as training's pipeline feeds them
  (normalised, `[count, T, S, S, 3]`) and as a user would (the same frames, uint8)."""
  batch = next(iter(pipeline.build_eval_dataset(
    data_cfg, num_frames, count, sources=sources, source_names=[name], process_index=0,
    process_count=1)))
  records = np.stack([sources[name][i]["frames"] for i in range(count)])  # [count, T0, S, S, 3]
  picked = video.sample_indices(records.shape[1], num_frames, data_cfg.frame_sampling,
                                data_cfg.frame_stride, None)[0]
  return batch["frames"], records[:, picked]


@pytest.mark.slow
def test_embed_of_a_record_equals_what_training_saw(export):
  """uint8 frames of a record into `embed` == the pipeline's normalised frames into the model."""
  path, params, graphdef, config = export
  encoder = univit_jax.load_encoder(path)
  source = demo.DemoSource("events", "test", num_examples=2, image_size=config.data.image_size)
  normalized, frames = _record_frames(
    helpers.typed(config).data,
    {"digits": source, "events": source, "objects": source}, "events", 4, 2)
  trained, _ = jax.jit(lambda p, f: nnx.merge(graphdef, p)(f))(params, normalized)
  np.testing.assert_allclose(encoder.embed(frames), trained, atol=1e-5)


@pytest.mark.slow
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


def test_encoder_json_holds_what_loading_needs(export):
  path, _, _, config = export
  with open(os.path.join(path, encoder_lib.SPEC_FILE)) as f:
    data = json.load(f)
  assert (data["format"], data["version"]) == ("univit_jax.export", 2)
  assert data["model"]["width"] == config.model.width
  assert data["model"]["embedding_center"]  # loss.center_embeddings
  # model.dtype="auto" is recorded as the dtype it resolved to where the encoder was exported.
  assert data["model"]["dtype"] == config_lib.resolve_compute_dtype("auto")
  assert data["model"]["rope"]["split"] == [4, 6, 6]
  assert data["preprocessing"] == dict(
    image_size=32, mean=list(config.data.mean), std=list(config.data.std), patch_size=8,
    frames=list(config_lib.active_parts(config).frames))
  spec = encoder_lib.EncoderSpec.from_json(data, "encoder.json")
  run = helpers.typed(config)
  assert spec == encoder_lib.EncoderSpec.from_sections(run.model, run.data, run.mesh)
  assert univit_jax.load_encoder(path).spec == spec


@pytest.mark.parametrize("change, message", [
  (dict(version=3), "version 3, newer than the 2 this univit_jax reads"),
  (dict(format="other"), "not a univit_jax.export file"),
  (dict(model=dict(width=64, wings=2)), r"unknown ModelConfig fields \['wings'\]"),
])
def test_unreadable_encoder_json_is_refused_naming_it(export, tmp_path, change, message):
  shutil.copytree(export[0], tmp_path / "copy")
  spec_file = tmp_path / "copy" / encoder_lib.SPEC_FILE
  spec_file.write_text(json.dumps({**json.loads(spec_file.read_text()), **change}))
  with pytest.raises(encoder_lib.ExportError, match=f"{re.escape(str(spec_file))}: .*{message}"):
    univit_jax.load_encoder(tmp_path / "copy")


@pytest.mark.slow
def test_export_without_encoder_json_still_loads(export, tmp_path):
  """Exports written before encoder.json (params/ and config.json only) load from config.json."""
  path, params, _, config = export
  checkpointing.save_export(tmp_path / "old", params, config.to_json_best_effort())
  frames = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), np.uint8)
  old = univit_jax.load_encoder(tmp_path / "old")
  assert old.spec == univit_jax.load_encoder(path).spec
  np.testing.assert_allclose(old.embed(frames), univit_jax.load_encoder(path).embed(frames),
                             atol=1e-6)


# --- encoder.safetensors: the whole forward pass rebuilt in NumPy from the file alone. ---------


def _layer_norm(x: np.ndarray, p: dict, name: str) -> np.ndarray:
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p[f"{name}.scale"] + p[f"{name}.bias"]


def _mlp(x: np.ndarray, p: dict, name: str) -> np.ndarray:
  h = x @ p[f"{name}.fc1.kernel"] + p[f"{name}.fc1.bias"]
  h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))  # exact GELU
  return h @ p[f"{name}.fc2.kernel"] + p[f"{name}.fc2.bias"]


def _rotate(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
  """Rotary pairs (j, j + K/2) of `x [N, H, K]` turned by `angles [N, K/2]`."""
  half = x.shape[-1] // 2
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _attention(p: dict, name: str, queries: np.ndarray, tokens: np.ndarray,
               angles: np.ndarray | None = None) -> np.ndarray:
  """Multi-head attention of `queries [Q, D]` over `tokens [N, D]`, every token visible."""
  q, k, v = (np.einsum("nd,dhk->nhk", x, p[f"{name}.{proj}.kernel"]) + p[f"{name}.{proj}.bias"]
             for x, proj in ((queries, "query"), (tokens, "key"), (tokens, "value")))
  if angles is not None:
    q, k = _rotate(q, angles), _rotate(k, angles)
  logits = np.einsum("qhk,nhk->hqn", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("hqn,nhk->qhk", weights, v)
  return np.einsum("qhk,hkd->qd", out, p[f"{name}.out.kernel"]) + p[f"{name}.out.bias"]


def _numpy_forward(export_path: str, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(tokens `[T * gh * gw, D]`, embedding `[D]`) of one uint8 clip `[T, H, W, 3]`, from
  encoder.safetensors and encoder.json alone, as docs/export.md describes the computation."""
  with open(os.path.join(export_path, "encoder.json")) as f:
    spec = json.load(f)
  model, pre = spec["model"], spec["preprocessing"]
  tensors = safetensors.numpy.load_file(os.path.join(export_path, "encoder.safetensors"))
  p = {name: array.astype(np.float64) for name, array in tensors.items()}
  t, h, w, c = frames.shape
  size, grid_h, grid_w = model["patch_size"], h // model["patch_size"], w // model["patch_size"]
  x = (frames / 255.0 - np.asarray(pre["mean"])) / np.asarray(pre["std"])
  patches = x.reshape(t, grid_h, size, grid_w, size, c).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(t * grid_h * grid_w, size * size * c) @ p["patch_embed.kernel"]
  frames_t = positions_lib.frame_times(t, model["rope"]["virtual_frames"]).astype(np.float64)
  freqs = (np.pi / model["rope"]["virtual_frames"]) ** (np.arange(16) / 15)
  time = np.concatenate([np.sin(frames_t[:, None] * freqs), np.cos(frames_t[:, None] * freqs)],
                        axis=-1)
  x = x + np.repeat(time @ p["time_embed.kernel"], grid_h * grid_w, axis=0)
  x = _layer_norm(x, p, "norm_pre")
  positions = positions_lib.grid_positions(frames_t, grid_h, grid_w)  # [N, 3] (t, h, w)
  r = model["rope"]
  pair_freqs, pair_axes = rope.rope_table(
    model["width"] // model["num_heads"], r["mode"], r["base"], tuple(r["split"]),
    r["temporal_span"], r["virtual_frames"])
  angles = positions[:, pair_axes] * pair_freqs
  for i in range(model["depth"]):
    y = _layer_norm(x, p, f"blocks.{i}.norm1")
    x = x + _attention(p, f"blocks.{i}.attn", y, y, angles)
    x = x + _mlp(_layer_norm(x, p, f"blocks.{i}.norm2"), p, f"blocks.{i}.mlp")
  tokens = _layer_norm(x, p, "norm_post")
  pooled = _attention(p, "head.attn", p["head.probe"], tokens)
  pooled = pooled + _mlp(_layer_norm(pooled, p, "head.norm"), p, "head.mlp")
  if model["embedding_center"]:
    lengths = 2.0 ** np.arange(len(p["embedding_center"]))
    distance = np.where(p["embedding_center_count"] > 0, np.abs(np.log(lengths / t)), np.inf)
    if np.isfinite(distance).any():
      pooled = pooled - p["embedding_center"][np.argmin(distance)]
  return tokens, pooled[0]


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.slow
def test_safetensors_name_map_rebuilds_the_forward_pass_in_numpy(tmp_path, scan):
  """The names and layouts docs/export.md gives, read by plain NumPy, compute what the model
  computes: patch embedding, time embedding, every pre-LN block with U-RoPE, the MAP head and
  the running mean embedding it subtracts."""
  config = demo_config()
  config.model.scan = scan
  run = helpers.typed(config)
  graphdef, params = vit.init_encoder(run.model, seed=4)
  model = nnx.merge(graphdef, params)
  model.embedding_center[...] = jax.random.normal(  # as training leaves it: one row per length
    jax.random.key(5), model.embedding_center[...].shape)
  model.embedding_center_count[...] = jnp.array([1.0, 0, 0, 2, 0, 0, 0])  # 1 and 8 frames
  path = encoder_lib.export_encoder(run, str(tmp_path), nnx.state(model))
  names = set(safetensors.numpy.load_file(os.path.join(path, "encoder.safetensors")))
  assert {"blocks.0.attn.query.kernel", "blocks.1.mlp.fc2.bias", "head.probe",
          "embedding_center", "embedding_center_count"} <= names
  assert not any(n.startswith("blocks.attn") for n in names)  # scanned layers are unstacked
  frames = np.random.default_rng(0).integers(0, 256, (1, 2, 32, 32, 3), np.uint8)
  embedding, aux = univit_jax.load_encoder(path)(frames)
  tokens, pooled = _numpy_forward(path, frames[0])
  np.testing.assert_allclose(tokens, aux["tokens"][0], atol=2e-4)
  np.testing.assert_allclose(pooled, embedding[0], atol=2e-4)


# --- Exports of a trained run: at the end of training, and by --mode=export. -------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step run of `train_fixtures.tiny_config` by --mode=train (checkpoint and export at
  step 2): its config, workdir and printed output."""
  import train_fixtures  # pylint: disable=import-outside-toplevel
  from univit_jax import main  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("trained")
  config = train_fixtures.tiny_config()
  config.total_steps = 2
  train_fixtures.write_clusters(str(workdir))
  with contextlib.redirect_stdout(io.StringIO()) as out:
    main._train(helpers.typed(config), str(workdir))  # pylint: disable=protected-access
  return config, workdir, out.getvalue()


@pytest.mark.slow
def test_train_mode_exports_the_trained_encoder(trained):
  config, workdir, out = trained
  assert f"Encoder export (univit_jax.load_encoder): {workdir}/export" in out
  encoder = univit_jax.load_encoder(workdir / "export")
  size = config.data.image_size
  assert encoder.embed(np.zeros((2, size, size, 3), np.float32)).shape == (2, config.model.width)
  assert {"encoder.json", "encoder.safetensors"} <= set(os.listdir(workdir / "export"))


_EMBED_IN_A_FRESH_PROCESS = """
import sys
import numpy as np
import univit_jax
encoder = univit_jax.load_encoder(sys.argv[1])
np.save(sys.argv[3], np.asarray(encoder.embed(np.load(sys.argv[2]))))
"""


@pytest.mark.slow
def test_export_mode_exports_the_checkpoint_loadable_anywhere(trained, tmp_path):
  """--mode=export writes the checkpoint's encoder; copied elsewhere and loaded in a fresh
  process, it embeds a training record as the training-time model did."""
  config, workdir, _ = trained
  graphdef, _ = vit.abstract_encoder(config_lib.model_config(config))
  training_params, _ = checkpointing.load_export(workdir / "export")  # the end-of-train state's
  shutil.rmtree(workdir / "export")
  result = helpers.run_main("--config=configs/demo.py", *helpers.DEMO_TEST_SCALE,
                            f"--workdir={workdir}", "--mode=export")
  assert result.returncode == 0, result.stderr
  assert f"Encoder export of {workdir} at step 2" in result.stdout
  copy = shutil.copytree(workdir / "export", tmp_path / "elsewhere" / "export")

  data_cfg = helpers.typed(config).data
  normalized, frames = _record_frames(data_cfg, pipeline.open_sources(data_cfg), "events", 2, 2)
  trained_embedding, _ = jax.jit(lambda p, f: nnx.merge(graphdef, p)(f))(training_params,
                                                                         normalized)
  np.save(tmp_path / "frames.npy", frames)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  subprocess.run([sys.executable, "-c", _EMBED_IN_A_FRESH_PROCESS, str(copy),
                  str(tmp_path / "frames.npy"), str(tmp_path / "embedding.npy")],
                 cwd=helpers.ROOT, env=env, check=True, timeout=300)
  np.testing.assert_allclose(np.load(tmp_path / "embedding.npy"), trained_embedding, atol=1e-5)


@pytest.mark.slow
def test_export_reads_the_chosen_checkpoint_of_the_newest_round(trained, tmp_path):
  """Only the encoder is restored (equal to the training state's); a pipeline workdir gives its
  newest round's checkpoint; a missing step is named."""
  config, workdir, _ = trained
  for r in (1, 2):
    shutil.copytree(workdir / "checkpoints", tmp_path / f"round_{r}" / "checkpoints")
  config = config.copy_and_resolve_references()
  config.rounds = 2
  run = helpers.typed(config)
  folder, step, params = state_lib.checkpoint_encoder(run, str(tmp_path))
  assert (folder, step) == (str(tmp_path / "round_2"), 2)
  _, shapes = encoder_lib.inference_shapes(
    encoder_lib.EncoderSpec.from_sections(run.model, run.data, run.mesh))
  expected, _ = checkpointing.load_export(encoder_lib.export_dir(str(workdir)), shapes)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params),
               jax.tree.map(np.asarray, expected))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 1 .*\(have \[2\]\)"):
    state_lib.checkpoint_encoder(run, str(tmp_path), step=1)
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    state_lib.checkpoint_encoder(run, str(tmp_path / "empty"))
