"""Exported UniViT encoders: `export_encoder` writes one, `load_encoder` reads it back as a
frozen feature extractor.

An export (`<workdir>/export/`, or `round_<r>/export/` of a pipeline; docs/export.md) holds
  encoder.json         what loading needs (`EncoderSpec`): a format version, the model
                       (`config_lib.ModelConfig`), the input contract (`Preprocessing`) and the
                       sharding rules;
  params/              the parameters (Orbax, `checkpointing.save_export`);
  encoder.safetensors  the same parameters under flat names, for other frameworks
                       (`flat_params`; `config.export.safetensors`);
  config.json          the exporting run's whole config, kept as a record (not read to load);
so a copy of the folder loads anywhere. Loaded, it embeds images `[B, H, W, C]` and clips
`[B, T, H, W, C]` of any length T with one set of weights:

  encoder = univit_jax.load_encoder("/tmp/univit_demo/round_2/export")
  embeddings = encoder.embed(frames)                    # [B, width] float32
  embedding, aux = encoder(frames, segments=(2, 4))     # + tokens, per-segment embeddings

The encoder owns its input contract: frames are uint8 in [0, 255] or floats in [0, 1], and the
normalisation training used (`Preprocessing.mean` / `std`, from `config.data`) is applied on the
device, so any caller feeds the model what training fed it. `Encoder.apply` takes frames
already normalised by the data pipeline (the extract stage's teacher, `--mode=embed`). Each
input shape (and choice of segments / boxes) compiles once.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from univit_jax import checkpointing, collectives, config_lib, paths, run_config, sharding
from univit_jax.models import vit
from univit_jax.run_config import data_config

EXPORT_FORMAT = "univit_jax.export"
EXPORT_VERSION = 2  # raised when a change to encoder.json or the name map breaks old readers
SPEC_FILE = "encoder.json"
SAFETENSORS_FILE = "encoder.safetensors"


class ExportError(config_lib.ConfigError):
  """An export this version cannot read (another format, a newer version, malformed fields);
  the message names the file."""


def export_dir(folder: str) -> str:
  """Where the export of a run (or a pipeline round) in `folder` lives."""
  return os.path.join(folder, "export")


def run_folders(workdir: str, rounds: int) -> list[str]:
  """The folders of a workdir that may hold a run, newest first: the workdir itself (a `train`
  run, or an export made there), then a pipeline's `round_<r>/` (`rounds.round_dir`) from
  r = `rounds` down to 1."""
  return [workdir] + [os.path.join(workdir, f"round_{r}") for r in range(rounds, 0, -1)]


def find_export(workdir: str, rounds: int) -> str:
  """The export a workdir holds: `export/`, else the newest round's `round_<r>/export/`.

  Raises:
    FileNotFoundError: if none of them is a complete export.
  """
  for folder in run_folders(workdir, rounds):
    if checkpointing.is_export(export_dir(folder)):
      return export_dir(folder)
  raise FileNotFoundError(f"no export in {workdir} (looked for export/ and round_<r>/export/)")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """An export's input contract: how training prepared the frames it saw.

  Attributes:
    image_size: side S of the square frames training fed it (each frame's centre square,
      resized); any H and W that are multiples of `patch_size` are accepted.
    mean: per-channel mean subtracted from frames scaled to [0, 1].
    std: per-channel standard deviation they are divided by.
    patch_size: H and W must be multiples of it (the model's).
    frames: the clip lengths T it was trained on (1: images); clips of any length are
      accepted (they span the same virtual time grid, `model.rope.virtual_frames`).
  """
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  patch_size: int
  frames: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """What loading an export needs, stored as its encoder.json (docs/export.md).

  Attributes:
    model: the architecture.
    preprocessing: the input contract.
    mesh_axes: the exporting run's mesh axis names (`inference_mesh`).
    sharding_rules: logical axis name -> mesh axes, as `config.sharding_rules`.
  """
  model: config_lib.ModelConfig
  preprocessing: Preprocessing
  mesh_axes: tuple[str, ...]
  sharding_rules: sharding.Rules

  @classmethod
  def from_sections(cls, model: config_lib.ModelConfig, data: data_config.DataConfig,
                    mesh: config_lib.MeshConfig) -> "EncoderSpec":
    """The spec of an encoder of `model` trained on `data` (its frame size, normalisation and
    buckets) over `mesh`."""
    t = data.transform
    return cls(
      model=model,
      preprocessing=Preprocessing(
        image_size=int(data.image_size), mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std), patch_size=model.patch_size, frames=data.frames),
      mesh_axes=mesh.axes, sharding_rules=mesh.rules)

  def to_json(self) -> dict[str, Any]:
    """encoder.json's content."""
    return dict(format=EXPORT_FORMAT, version=EXPORT_VERSION,
                model=dataclasses.asdict(self.model),
                preprocessing=dataclasses.asdict(self.preprocessing),
                mesh_axes=list(self.mesh_axes),
                sharding_rules=[list(rule) for rule in self.sharding_rules])

  @classmethod
  def from_json(cls, data: dict[str, Any], where: str) -> "EncoderSpec":
    """Reads encoder.json's content (`where`: its path, for messages).

    Raises:
      ExportError: for another format, a newer version, or fields this version does not know.
    """
    version = data.get("version")
    if data.get("format") != EXPORT_FORMAT or not isinstance(version, int):
      raise ExportError(f"{where}: not a {EXPORT_FORMAT} file (format={data.get('format')!r}, "
                        f"version={version!r})")
    if version > EXPORT_VERSION:
      raise ExportError(f"{where}: export format version {version}, newer than the "
                        f"{EXPORT_VERSION} this univit_jax reads; update univit_jax")
    try:
      p = data["preprocessing"]
      return cls(
        model=config_lib.model_config_from_dict(data["model"]),
        preprocessing=Preprocessing(**{**p, "mean": tuple(p["mean"]), "std": tuple(p["std"]),
                                       "frames": tuple(p["frames"])}),
        mesh_axes=tuple(data["mesh_axes"]),
        sharding_rules=config_lib.sharding_rules(data["sharding_rules"]))
    except (KeyError, TypeError, config_lib.ConfigError) as e:
      raise ExportError(f"{where}: malformed ({type(e).__name__}: {e})") from e


def flat_params(params: nnx.State, model: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """The encoder's parameters as NumPy arrays under flat names, encoder.safetensors' name map.

  A name is the parameter's `nnx.State` path joined by ".", e.g. `blocks.0.attn.query.kernel`;
  a scanned encoder's (`model.scan`) stacked `blocks.<rest>` `[depth, ...]` is split into
  `blocks.<i>.<rest>`, so scanned and unrolled encoders give the same names and shapes.
  docs/export.md lists every name with its layout and the forward pass that reads it. Arrays
  sharded over processes are gathered: every process must call this.
  """
  out = {}
  for path, variable in nnx.to_flat_state(params):
    array = collectives.gather(variable[...])
    keys = [str(k) for k in path]
    if model.scan and keys[0] == "blocks":
      out.update({".".join(["blocks", str(i), *keys[1:]]): layer for i, layer in enumerate(array)})
    else:
      out[".".join(keys)] = array
  return out


def export_encoder(run: run_config.RunConfig, folder: str, encoder_params) -> str:
  """Writes the export of an encoder trained as `run` to `export_dir(folder)` (params/,
  encoder.json, config.json: `run.record` and, with `export.safetensors`, encoder.safetensors);
  returns its path. Every process calls this."""
  path = export_dir(folder)
  spec = EncoderSpec.from_sections(run.model, run.data, run.mesh)
  files = {SPEC_FILE: (json.dumps(spec.to_json(), indent=2) + "\n").encode()}
  if run.export.safetensors:
    tensors = flat_params(encoder_params, spec.model)
    if jax.process_index() == 0:
      files[SAFETENSORS_FILE] = safetensors.numpy.save(
        {name: np.ascontiguousarray(a) for name, a in tensors.items()},
        metadata={"format": EXPORT_FORMAT, "version": str(EXPORT_VERSION),
                  SPEC_FILE: json.dumps(spec.to_json())})
  checkpointing.save_export(path, encoder_params, run.record_json(), files)
  return path


class Encoder:
  """An exported encoder's weights with a jitted forward pass (see `vit.UniViT.__call__`).

  Attributes:
    spec: what the export says of itself (`EncoderSpec`: model, preprocessing, sharding).
    model: its `config_lib.ModelConfig` (width, patch size, ...).
    name: identifies the export: its path and a hash of its config.
  """

  def __init__(self, spec: EncoderSpec, graphdef: nnx.GraphDef, params: nnx.State, name: str,
               mesh: jax.sharding.Mesh | None = None):
    """`mesh`: where `params` were placed by the spec's sharding rules; the forward pass then
    pins its activations to the batch's split (`sharding.activation_sharding`). None: params
    placed otherwise (one device, or a training run's state), activations left to GSPMD."""
    self.spec, self.model, self.name = spec, spec.model, name
    self.params = params
    mean = np.asarray(spec.preprocessing.mean, np.float32)
    std = np.asarray(spec.preprocessing.std, np.float32)
    activations = (None if mesh is None else
                   sharding.activation_sharding(mesh, spec.sharding_rules))

    def forward(params, frames, frame_mask, boxes, segments, normalize):
      if normalize:
        if frames.dtype == jnp.uint8:
          frames = frames.astype(jnp.float32) / 255.0
        frames = (frames - mean) / std
      return nnx.merge(graphdef, params)(frames, frame_mask=frame_mask, segments=segments,
                                         boxes=boxes, activation_sharding=activations)

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


def inference_mesh(axes: Sequence[str]) -> jax.sharding.Mesh:
  """A mesh of a run's axis names with every device on `data` and the others of size 1:
  parameters replicated, batches split."""
  axes = tuple(axes)
  shape = tuple(jax.device_count() if axis == "data" else 1 for axis in axes)
  devices = jax.devices() if "data" in axes else jax.devices()[:1]
  return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                       devices=devices)


def inference_shapes(spec: EncoderSpec, mesh: jax.sharding.Mesh | None = None
                     ) -> tuple[nnx.GraphDef, nnx.State]:
  """The encoder's graph and its parameter shapes placed by the spec's sharding rules on `mesh`
  (default: `inference_mesh`): what an export or a checkpoint is restored onto."""
  graphdef, abstract = vit.abstract_encoder(spec.model)
  mesh = inference_mesh(spec.mesh_axes) if mesh is None else mesh
  shardings = sharding.tree_shardings(abstract, mesh, spec.sharding_rules)
  return graphdef, sharding.sharded_shapes(abstract, shardings)


def read_spec(path: str | os.PathLike) -> EncoderSpec:
  """The `EncoderSpec` of the export at `path`: its encoder.json, or for an export written
  before encoder.json existed, derived from its config.json.

  Raises:
    FileNotFoundError: if `path` holds no complete export.
    ExportError: if its encoder.json is of another format or a newer version.
  """
  spec_file = os.path.join(path, SPEC_FILE)
  if checkpointing.is_export(path) and paths.path(spec_file).exists():
    return EncoderSpec.from_json(json.loads(paths.path(spec_file).read_text()), spec_file)
  return EncoderSpec.from_sections(
    *run_config.export_sections(checkpointing.read_export_config(path)))


def load_encoder(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None) -> Encoder:
  """The export in `path`, its parameters placed by its sharding rules on `mesh` (default:
  every device on the `data` axis, the others of size 1: parameters replicated).

  Raises:
    FileNotFoundError: if `path` holds no export.
    ExportError: if its encoder.json is of another format or a newer version.
  """
  spec = read_spec(path)
  mesh = inference_mesh(spec.mesh_axes) if mesh is None else mesh
  graphdef, shapes = inference_shapes(spec, mesh)
  params, _ = checkpointing.load_export(path, shapes)
  digest = hashlib.sha1(paths.path(os.path.join(path, "config.json")).read_bytes()).hexdigest()[:12]
  return Encoder(spec, graphdef, params, name=f"univit:{os.fspath(path)}:{digest}", mesh=mesh)
