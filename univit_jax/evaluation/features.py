"""Frozen feature extractors the probes compare: UniViT encoders and raw-pixel baselines.

Every extractor maps uint8 frames `[B, T, H, W, 3]` to
  embedding    `[B, D]`       the pooled embedding (UniViT: the MAP head's output);
  mean_tokens  `[B, D']`      the mean of the valid patch tokens;
  tokens       `[B, L, D']`   the patch tokens, L = T * gh * gw, frame-major (UniViT: after the
                              final norm; pixels: each patch's raw pixels);
and reports its token `grid(T, H, W) -> (T, gh, gw)`. UniViT extractors go through
`encoder.Encoder`, so inputs get exactly the normalisation training used.

Kinds (`FeatureExtractor.kind`): "export" (an exported encoder), "checkpoint" (a run's newest
checkpoint), "random" (a fresh encoder of the config's architecture: the baseline every trained
encoder must beat), "live" (parameters of a run in progress), "pixels" (raw-pixel baselines),
"teacher" (the round-1 bootstrap teacher's features, which the first clusters are made of).
"""

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from univit_jax import encoder, run_config
from univit_jax.clustering import extract
from univit_jax.models import vit
from univit_jax.run_config import data_config, stage_config
from univit_jax.train import state as state_lib

_PIXEL_POOL = 8  # frames are average-pooled to 8 x 8 for the pooled pixel embeddings


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """A named frozen feature function (see the module docstring).

  Attributes:
    name: row name in the results table.
    kind: "export", "checkpoint", "random", "live" or "pixels".
    path: where its weights came from, if anywhere.
    patch_size: p; a T-frame clip of H x W frames has T * (H / p) * (W / p) tokens.
    fn: uint8 frames `[B, T, H, W, 3]` -> dict(embedding, mean_tokens, tokens) of NumPy arrays.
  """
  name: str
  kind: str
  path: str | None
  patch_size: int
  fn: Callable[[np.ndarray], dict[str, np.ndarray]]

  def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    return num_frames, height // self.patch_size, width // self.patch_size

  def __call__(self, frames: np.ndarray) -> dict[str, np.ndarray]:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 5:
      raise ValueError(f"{self.name}: frames must be uint8 [B, T, H, W, 3], got "
                       f"{frames.dtype} {frames.shape}")
    return self.fn(frames)


def from_encoder(enc: encoder.Encoder, name: str, kind: str, path: str | None = None
                 ) -> FeatureExtractor:
  """Features of a UniViT `encoder.Encoder` (its input contract normalises the frames)."""

  def fn(frames: np.ndarray) -> dict[str, np.ndarray]:
    embedding, aux = enc(frames)
    tokens = np.asarray(aux["tokens"], np.float32)
    return dict(embedding=np.asarray(embedding, np.float32), tokens=tokens,
                mean_tokens=tokens.mean(axis=1))

  return FeatureExtractor(name=name, kind=kind, path=path, patch_size=enc.model.patch_size,
                          fn=fn)


def from_params(spec: encoder.EncoderSpec, params, name: str, kind: str, encoder_name: str,
                path: str | None = None) -> FeatureExtractor:
  """Features of encoder parameters (`nnx.State` of `vit.UniViT`) of the encoder `spec`
  describes (`EncoderSpec.from_sections` of a run); `encoder_name` is the `encoder.Encoder`'s
  identity, `name` the table's row."""
  graphdef, _ = vit.abstract_encoder(spec.model)
  return from_encoder(encoder.Encoder(spec, graphdef, params, name=encoder_name), name, kind,
                      path)


def export(path: str, name: str | None = None) -> FeatureExtractor:
  """An exported encoder (`univit_jax.load_encoder`)."""
  enc = encoder.load_encoder(path)
  return from_encoder(enc, name or f"export {path}", "export", os.fspath(path))


def random_init(spec: encoder.EncoderSpec, seed: int = 0) -> FeatureExtractor:
  """A freshly initialised encoder of the architecture `spec` describes (no training)."""
  _, params = vit.init_encoder(spec.model, seed)
  return from_params(spec, params, f"random init (seed {seed})", "random", f"random:{seed}")


def live(spec: encoder.EncoderSpec, encoder_params, step: int) -> FeatureExtractor:
  """The encoder parameters of a run in progress (evaluation during training)."""
  return from_params(spec, encoder_params, f"step {step}", "live", f"live:{step}")


def checkpoint(run: run_config.RunConfig, workdir: str) -> FeatureExtractor:
  """The encoder of a run's newest checkpoint (`state_lib.checkpoint_encoder`: the workdir's
  own, else its newest pipeline round's).

  Raises:
    FileNotFoundError: if the workdir holds no checkpoint.
  """
  folder, step, params = state_lib.checkpoint_encoder(run, workdir)
  spec = encoder.EncoderSpec.from_sections(run.model, run.data, run.mesh)
  return from_params(spec, params, f"checkpoint {folder} step {step}", "checkpoint",
                     f"checkpoint:{folder}:{step}", folder)


def _patches(frames: np.ndarray, patch_size: int) -> np.ndarray:
  """Raw pixels of each patch, `[B, T * gh * gw, p * p * 3]` in [0, 1], frame-major."""
  b, t, h, w, c = frames.shape
  p = patch_size
  x = frames.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t * (h // p) * (w // p), p * p * c).astype(np.float32) / 255.0


def _pool(frames: np.ndarray, size: int) -> np.ndarray:
  """`[B, T, size, size, C]` average pools of `[B, T, H, W, C]` (H, W multiples of size)."""
  b, t, h, w, c = frames.shape
  x = frames.astype(np.float32).reshape(b, t, size, h // size, size, w // size, c) / 255.0
  return x.mean(axis=(3, 5))


def pixels(mode: str, patch_size: int) -> FeatureExtractor:
  """Raw-pixel baselines.

  "pixels_mean": each frame average-pooled to 8 x 8 RGB, averaged over time (blind to order).
  "pixels_ordered": each frame pooled to 8 x 8 grey, frames concatenated in time order (a
  time-aware baseline: a linear probe on it can read which frame holds what).
  Tokens are every patch's raw pixels in both.
  """
  if mode not in stage_config.PIXEL_BASELINES:
    raise ValueError(f"pixel baseline {mode!r}: expected one of {stage_config.PIXEL_BASELINES}")

  def fn(frames: np.ndarray) -> dict[str, np.ndarray]:
    pooled = _pool(frames, _PIXEL_POOL)  # [B, T, 8, 8, 3]
    if mode == "pixels_mean":
      embedding = pooled.mean(axis=1).reshape(len(frames), -1)
    else:
      embedding = pooled.mean(axis=-1).reshape(len(frames), -1)
    tokens = _patches(frames, patch_size)
    return dict(embedding=embedding, tokens=tokens, mean_tokens=tokens.mean(axis=1))

  title = {"pixels_mean": "raw pixels, 8x8 mean-pooled",
           "pixels_ordered": "raw pixels, 8x8 grey, frames in order"}[mode]
  return FeatureExtractor(name=title, kind="pixels", path=None, patch_size=patch_size, fn=fn)


def pixels_teacher(cfg: stage_config.ExtractConfig, data_cfg: data_config.DataConfig,
                   seed: int) -> FeatureExtractor:
  """The `pixels` bootstrap teacher fitted as round 1 fits it (`extract.fit_pixels_teacher`).

  The embedding is the feature the first clusters are made of: for an image, its object-bank
  whole-image row (the full-frame box); for a clip, its `event_1` row (`extract.event_features`
  of `extract.segment_frames` frames). A student that learns only its clusters cannot probe much
  above this row. The teacher has no patch tokens: tokens are every patch's raw pixels, as for
  the pixel baselines.
  """
  teacher = extract.fit_pixels_teacher(cfg, data_cfg, seed)
  mean = np.asarray(data_cfg.transform.mean, np.float32)
  std = np.asarray(data_cfg.transform.std, np.float32)
  patch = data_cfg.patch_size

  def fn(frames: np.ndarray) -> dict[str, np.ndarray]:
    x = (frames.astype(np.float32) / 255.0 - mean) / std
    if x.shape[1] == 1:
      whole = np.broadcast_to(extract.FULL_FRAME, (len(x), 1, 4))
      embedding = teacher.regions(x[:, 0], whole)[:, 0]
    else:
      embedding = extract.event_features(teacher.embed(x), 1, cfg.segment_frames)[:, 0]
    tokens = _patches(frames, patch)
    return dict(embedding=np.asarray(embedding, np.float32), tokens=tokens,
                mean_tokens=tokens.mean(axis=1))

  return FeatureExtractor(name=f"bootstrap teacher ({teacher.name})", kind="teacher", path=None,
                          patch_size=patch, fn=fn)
