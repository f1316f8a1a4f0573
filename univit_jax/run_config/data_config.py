"""Typed views of `config.data`: what the input pipeline reads and how frames become model input.

`univit_jax.data` builds its datasets from a `DataConfig` and its transforms from a
`TransformConfig`; both are built here, in the config layer, so the data code never reads a
ConfigDict.
"""

import dataclasses

import ml_collections

from univit_jax import config_lib

# `data.frame_sampling`: see `univit_jax.data.video.sample_indices`.
SAMPLINGS = ("uniform", "random_window")


@dataclasses.dataclass(frozen=True)
class TransformConfig:
  """How frames are turned into model input; built from `config.data` by `DataConfig`.

  Attributes:
    image_size: output side S; frames come out `[T, S, S, 3]`.
    augment: training augmentation on (crop, flip, jitter); off gives the evaluation transform.
    crop_scale: range of the crop area as a fraction of the frame area.
    crop_ratio: range of the crop aspect ratio (width / height).
    flip: random horizontal flip.
    color_jitter: strength s of brightness, contrast and saturation factors in [1 - s, 1 + s].
    mean: per-channel mean of frames scaled to [0, 1].
    std: per-channel standard deviation.
  """
  image_size: int
  augment: bool = True
  crop_scale: tuple[float, float] = (0.35, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  color_jitter: float = 0.4
  mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
  std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Typed view of `config.data` (plus the two model fields the pipeline needs).

  Attributes:
    sources: the record sources, sorted by name (their order defines example ids).
    frames: the frame-count buckets.
    bucket_weights: mixing weight of each bucket.
    tokens_per_batch: global token budget per step.
    bucket_tokens: token budget per bucket, in place of `tokens_per_batch` (() for none).
    image_size: frame side S.
    patch_size: model patch size (tokens per frame = (S / patch_size)^2).
    virtual_frames: U-RoPE temporal grid length (`model.rope.virtual_frames`).
    transform: training transform settings (evaluation turns `augment` off).
    frame_sampling: one of SAMPLINGS.
    frame_stride: frame step of "random_window".
    max_boxes: boxes kept per example when a source has boxes.
    worker_count: grain worker processes per host (0: decode in the main process).
    read_threads: threads decoding records of each bucket, per worker (or in the main process);
      each bucket reads ahead one batch, so memory stays bounded by about one batch per bucket.
    worker_buffer_size: batches each worker keeps ready.
    shuffle_seed: seed of shuffling and augmentation.
    max_bad_fraction: stop once more than this fraction of attempted records were unreadable.
    bad_check_after: attempted records before the fraction is checked.
  """
  sources: tuple[config_lib.SourceSpec, ...]
  frames: tuple[int, ...]
  bucket_weights: tuple[float, ...]
  tokens_per_batch: int
  image_size: int
  patch_size: int
  bucket_tokens: tuple[int, ...] = ()
  virtual_frames: int = 64
  transform: TransformConfig | None = None
  frame_sampling: str = "uniform"
  frame_stride: int = 2
  max_boxes: int = 4
  worker_count: int = 0
  read_threads: int = 2
  worker_buffer_size: int = 2
  shuffle_seed: int = 0
  max_bad_fraction: float = 0.05
  bad_check_after: int = 100

  def __post_init__(self):
    if self.transform is None:
      object.__setattr__(self, "transform", TransformConfig(self.image_size))
    if self.transform.image_size != self.image_size:
      raise config_lib.ConfigError(
        f"transform image_size={self.transform.image_size} differs from "
        f"data.image_size={self.image_size}")
    if self.frame_sampling not in SAMPLINGS:
      raise config_lib.ConfigError(
        f"data.frame_sampling={self.frame_sampling!r}: expected one of {SAMPLINGS}")
    config_lib.check_buckets(self.image_size, self.patch_size, tuple(self.frames),
                             tuple(self.bucket_weights), tuple(self.bucket_tokens))
    if not 0 <= self.max_bad_fraction <= 1:
      raise config_lib.ConfigError(
        f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
    if self.worker_count < 0 or self.read_threads < 1:
      raise config_lib.ConfigError(
        f"data.worker_count={self.worker_count} must be >= 0 and "
        f"data.read_threads={self.read_threads} >= 1")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "DataConfig":
    """Reads `config.data` (and `config.model.patch_size` / `rope.virtual_frames`); the buckets
    are those `config_lib.active_parts` keeps for the sources.

    Raises:
      config_lib.ConfigError: naming the offending field.
    """
    d = config.data
    parts = config_lib.active_parts(config)
    specs = tuple(config_lib.SourceSpec.from_dict(name, spec.to_dict())
                  for name, spec in sorted(d.sources.items()))
    return cls(
      sources=specs, frames=parts.frames, bucket_weights=parts.bucket_weights,
      tokens_per_batch=d.tokens_per_batch, bucket_tokens=parts.bucket_tokens,
      image_size=d.image_size,
      patch_size=config.model.patch_size, virtual_frames=config.model.rope.virtual_frames,
      transform=TransformConfig(
        image_size=d.image_size, augment=d.augment, crop_scale=tuple(d.crop_scale),
        crop_ratio=tuple(d.crop_ratio), flip=d.flip, color_jitter=d.color_jitter,
        mean=tuple(d.mean), std=tuple(d.std)),
      frame_sampling=d.frame_sampling, frame_stride=d.frame_stride, max_boxes=d.max_boxes,
      worker_count=d.worker_count, read_threads=d.read_threads,
      worker_buffer_size=d.worker_buffer_size,
      shuffle_seed=d.shuffle_seed, max_bad_fraction=d.max_bad_fraction,
      bad_check_after=d.bad_check_after)

  def source_buckets(self, spec: config_lib.SourceSpec) -> tuple[int, ...]:
    """The buckets a source feeds (`SourceSpec.buckets` of these frames)."""
    return spec.buckets(self.frames)

  def batch_sizes(self, batch_multiple: int = 1) -> dict[int, int]:
    """Global batch size per bucket (see `config_lib.bucket_batch_sizes`)."""
    return config_lib.bucket_batch_sizes(
      self.frames, self.tokens_per_batch, self.image_size, self.patch_size, batch_multiple,
      self.bucket_tokens)
