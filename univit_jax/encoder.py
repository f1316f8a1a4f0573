"""Exported UniViT encoders: `export_encoder` writes one, `load_encoder` reads it back as a
frozen feature extractor.

An export (`<workdir>/export/`, or `round_<r>/export/` of a pipeline) holds the encoder's
parameters and the run's config (`checkpointing.save_export`). Loaded, it embeds images
`[B, H, W, C]` and clips `[B, T, H, W, C]` of any length T with one set of weights:

  encoder = univit_jax.load_encoder("/tmp/univit_demo/round_2/export")
  embeddings = encoder.embed(frames)                    # [B, width] float32
  embedding, aux = encoder(frames, segments=(2, 4))     # + tokens, per-segment embeddings

The encoder owns its input contract: frames are uint8 in [0, 255] or floats in [0, 1], and the
normalisation training used (`config.data.mean` / `std`, carried by the export) is applied on
the device, so any caller feeds the model what training fed it. `Encoder.apply` takes frames
already normalised by the data pipeline (the extract stage's teacher). Each input shape (and
choice of segments / boxes) compiles once.
"""

import hashlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from univit_jax import checkpointing, config_lib, sharding
from univit_jax.models import vit


def export_dir(folder: str) -> str:
  """Where the export of a run (or a pipeline round) in `folder` lives."""
  return os.path.join(folder, "export")


def export_encoder(config: ml_collections.ConfigDict, folder: str, encoder_params) -> str:
  """Writes the encoder's parameters and the config to `export_dir(folder)`; returns it."""
  path = export_dir(folder)
  checkpointing.save_export(path, encoder_params, config.to_json_best_effort())
  return path


class Encoder:
  """An exported encoder's weights with a jitted forward pass (see `vit.UniViT.__call__`).

  Attributes:
    config: the exporting run's config.
    model: its `config_lib.ModelConfig` (width, patch size, ...).
    name: identifies the export: its path and a hash of its config.
  """

  def __init__(self, config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
               params: nnx.State, name: str):
    self.config, self.model, self.name = config, config_lib.model_config(config), name
    self.params = params
    mean = np.asarray(config.data.mean, np.float32)
    std = np.asarray(config.data.std, np.float32)

    def forward(params, frames, frame_mask, boxes, segments, normalize):
      if normalize:
        if frames.dtype == jnp.uint8:
          frames = frames.astype(jnp.float32) / 255.0
        frames = (frames - mean) / std
      return nnx.merge(graphdef, params)(frames, frame_mask=frame_mask, segments=segments,
                                         boxes=boxes)

    self._forward = jax.jit(forward, static_argnums=(4, 5))

  def __call__(self, frames: jax.Array | np.ndarray, *, frame_mask: jax.Array | None = None,
               segments: tuple[int, ...] = (), boxes: jax.Array | None = None
               ) -> tuple[jax.Array, dict]:
    """`(embedding [B, width], aux)` of images `[B, H, W, C]` or clips `[B, T, H, W, C]`
    (uint8 pixels, or floats in [0, 1]; H and W multiples of the patch size); the other
    arguments as `vit.UniViT`."""
    return self._forward(self.params, frames, frame_mask, boxes, tuple(segments), True)

  def apply(self, frames: jax.Array | np.ndarray, *, frame_mask: jax.Array | None = None,
            segments: tuple[int, ...] = (), boxes: jax.Array | None = None
            ) -> tuple[jax.Array, dict]:
    """As `__call__`, for frames the data pipeline has already normalised."""
    return self._forward(self.params, frames, frame_mask, boxes, tuple(segments), False)

  def embed(self, frames: jax.Array | np.ndarray) -> jax.Array:
    """float32 `[B, width]` embeddings of images or clips (uint8, or floats in [0, 1])."""
    return self(frames)[0]


def inference_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The run's mesh axes with every device on `data` and the others of size 1: parameters
  replicated, batches split."""
  axes = tuple(config.mesh.axes)
  shape = tuple(jax.device_count() if axis == "data" else 1 for axis in axes)
  devices = jax.devices() if "data" in axes else jax.devices()[:1]
  return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                       devices=devices)


def load_encoder(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> Encoder:
  """The export in `path`, its parameters placed by the run's sharding rules on `mesh`
  (default: every device on the `data` axis, the others of size 1: parameters replicated).

  Raises:
    FileNotFoundError: if `path` holds no export.
  """
  config = ml_collections.ConfigDict(checkpointing.read_export_config(path))
  graphdef, abstract = vit.abstract_encoder(config_lib.model_config(config))
  mesh = inference_mesh(config) if mesh is None else mesh
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
  params, _ = checkpointing.load_export(path, sharding.sharded_shapes(abstract, shardings))
  with open(os.path.join(path, "config.json"), "rb") as f:
    digest = hashlib.sha1(f.read()).hexdigest()[:12]
  return Encoder(config, graphdef, params, name=f"univit:{os.fspath(path)}:{digest}")
