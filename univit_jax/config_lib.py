"""Config helpers: argument parsing for `get_config(arg)`, validation, typed views.

Configs are `ml_collections.ConfigDict`s built by `configs/<name>.py:get_config(arg)`. They import
only `ml_collections` and this module, so they load from any working directory. Modules never see
the whole config: `model_config(config)` and friends turn sections into frozen dataclasses, and
`run_config.build` gathers them, with the stages' sections, into the `RunConfig` the stages take.
"""

import ast
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from univit_jax import specs


class ConfigError(ValueError):
  """A config value is invalid; the message names the field."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "variant=L/14,runlocal" into a ConfigDict over `defaults`.

  Keys must be among `defaults`; each value is converted to its default's type; a bare key sets
  a boolean default to True.

  Raises:
    ConfigError: for an unknown key or a value of the wrong type.
  """
  result = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} is unknown; expected one of {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"config argument {key}={value!r}: expected true or false")
      result[key] = value.lower() in ("true", "1")
    elif isinstance(default, str):
      result[key] = value
    else:
      try:
        result[key] = type(default)(ast.literal_eval(value))
      except (ValueError, SyntaxError, TypeError) as e:
        raise ConfigError(
          f"config argument {key}={value!r}: expected a {type(default).__name__}") from e
  return result


def model_fields(variant: str) -> dict[str, int]:
  """The size fields of `config.model` for a variant such as "L/14"."""
  try:
    return specs.decode_variant(variant)
  except ValueError as e:
    raise ConfigError(str(e)) from e


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  mode: str = "temporal_low"
  base: float = 10_000.0
  split: tuple[int, int, int] = (4, 6, 6)
  virtual_frames: int = 64
  temporal_span: float = math.pi


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What the encoder needs to know; built from `config.model` by `model_config`.

  The last four fields switch the encoder to the layout of a plain ViT whose pretrained weights
  are loaded into it (`models/siglip.py`: a big_vision SigLIP image tower); UniViT's own
  encoders keep the defaults, and `config.model` does not set them.

  Attributes:
    patch_bias: the patch embedding has a bias.
    pos_grid: (gh, gw) of a learned position table `[1, gh * gw, D]` added to every frame's
      patch embeddings (frames must then have exactly that patch grid); None: no table.
    norm_pre: a layer norm between the patch embedding and the first block.
    gelu_approximate: tanh-approximate GELU in the MLPs (else the exact erf form).
    embedding_center: the encoder keeps a running mean of its embeddings per clip length (T =
      1, 2, 4, ... up to `rope.virtual_frames`, `vit.center_lengths`) and subtracts it from
      every pooled output. Set by `loss.center_embeddings`: the loss then scores batch-centred
      embeddings, and the export gives users the embedding the loss shaped.
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int
  channels: int = 3
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan: bool = False
  remat: str = "none"
  rope: RopeConfig = RopeConfig()
  time_embedding: str = "sincos"
  patch_bias: bool = False
  pos_grid: tuple[int, int] | None = None
  norm_pre: bool = True
  gelu_approximate: bool = False
  attention: str = "xla"
  embedding_center: bool = False

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


REMAT_POLICIES = ("none", "full", "dots")
# `model.rope.mode`: one of U-RoPE's allocations (`specs.ROPE_ALLOCATIONS`), or "none": no rotary
# embedding (the identity rotation), for weights trained without one.
ROPE_MODES = (*specs.ROPE_ALLOCATIONS, "none")
TIME_EMBEDDINGS = ("none", "sincos")
# `jax.nn.dot_product_attention` implementations of the encoder's self-attention ("cudnn":
# cuDNN's fused flash attention, NVIDIA GPUs with a 16-bit compute dtype).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
# `model.dtype` may also be AUTO_DTYPE: the compute dtype of `resolve_compute_dtype`.
AUTO_DTYPE = "auto"


def resolve_compute_dtype(name: str, platform: str | None = None) -> str:
  """The compute dtype `model.dtype` names on `platform` (default: JAX's default backend).

  "auto" is bfloat16 on accelerators (their matrix units' input type; parameters, norms and
  softmax stay float32) and float32 on CPU, where XLA's bfloat16 train step measured no faster
  than its float32 one, ViT-Ti/16 on an AMX CPU (docs/performance.md). Other names are
  returned as they are.
  """
  if name != AUTO_DTYPE:
    return name
  return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Validated typed view of `config.model`.

  Raises:
    ConfigError: naming the field, for impossible shapes or unknown options.
  """
  m = config.model
  for field in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "channels"):
    if m[field] <= 0:
      raise ConfigError(f"model.{field}={m[field]} must be positive")
  if m.width % m.num_heads:
    raise ConfigError(
      f"model.width={m.width} is not divisible by model.num_heads={m.num_heads}")
  if m.rope.mode not in ROPE_MODES:
    raise ConfigError(f"model.rope.mode={m.rope.mode!r}: expected one of {ROPE_MODES}")
  if m.rope.mode != "none":
    try:
      specs.rope_axis_pairs(m.width // m.num_heads, tuple(m.rope.split))
    except ValueError as e:
      raise ConfigError(f"model.rope.split / model.num_heads: {e}") from e
  if m.rope.virtual_frames < max(config.data.frames):
    raise ConfigError(
      f"model.rope.virtual_frames={m.rope.virtual_frames} is smaller than the longest "
      f"bucket data.frames={tuple(config.data.frames)}")
  if m.rope.temporal_span < 0:
    raise ConfigError(f"model.rope.temporal_span={m.rope.temporal_span} must be >= 0 (0: off)")
  if m.time_embedding not in TIME_EMBEDDINGS:
    raise ConfigError(
      f"model.time_embedding={m.time_embedding!r}: expected one of {TIME_EMBEDDINGS}")
  if m.attention not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(
      f"model.attention={m.attention!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
  if m.dtype not in (*DTYPES, AUTO_DTYPE):
    raise ConfigError(f"model.dtype={m.dtype!r}: expected one of {(*DTYPES, AUTO_DTYPE)}")
  if m.param_dtype not in DTYPES:
    raise ConfigError(f"model.param_dtype={m.param_dtype!r}: expected one of {DTYPES}")
  dtype = resolve_compute_dtype(m.dtype)
  if m.attention == "cudnn" and dtype == "float32":
    raise ConfigError("model.attention='cudnn' needs model.dtype bfloat16 or float16 "
                      "(cuDNN's fused attention has no float32 kernel)")
  if m.remat not in REMAT_POLICIES:
    raise ConfigError(f"model.remat={m.remat!r}: expected one of {REMAT_POLICIES}")
  return ModelConfig(
    width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
    patch_size=m.patch_size, channels=m.channels, dtype=dtype, param_dtype=m.param_dtype,
    scan=m.scan, remat=m.remat, time_embedding=m.time_embedding, attention=m.attention,
    embedding_center=bool(config.loss.center_embeddings),
    rope=RopeConfig(mode=m.rope.mode, base=float(m.rope.base), split=tuple(m.rope.split),
                    virtual_frames=m.rope.virtual_frames,
                    temporal_span=float(m.rope.temporal_span)))


def model_config_from_dict(fields: Mapping[str, Any]) -> ModelConfig:
  """The `ModelConfig` whose `dataclasses.asdict` is `fields`, also after a JSON round trip
  (tuples read back as lists): how an export's `encoder.json` stores the model.

  Raises:
    ConfigError: naming the fields `ModelConfig` or `RopeConfig` does not have.
  """
  fields = dict(fields)
  rope_fields = dict(fields.pop("rope", {}))
  for cls, given in ((ModelConfig, fields), (RopeConfig, rope_fields)):
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"unknown {cls.__name__} fields {unknown}")
  if "split" in rope_fields:
    rope_fields["split"] = tuple(rope_fields["split"])
  if fields.get("pos_grid") is not None:
    fields["pos_grid"] = tuple(fields["pos_grid"])
  return ModelConfig(**fields, rope=RopeConfig(**rope_fields))


def validate_data(config: ml_collections.ConfigDict) -> None:
  """Checks the shape-defining part of `config.data` against the model.

  Raises:
    ConfigError: naming the field.
  """
  d = config.data
  check_buckets(d.image_size, config.model.patch_size, tuple(d.frames), tuple(d.bucket_weights),
                tuple(d.bucket_tokens))


def check_buckets(image_size: int, patch_size: int, frames: tuple[int, ...],
                  bucket_weights: tuple[float, ...], bucket_tokens: tuple[int, ...] = ()) -> None:
  """Whole patches per frame, distinct positive frame counts, one weight per bucket and none or
  one positive token budget per bucket (for the config and for `data.pipeline.DataConfig`, which
  can be built without one).

  Raises:
    ConfigError: naming the field.
  """
  if image_size % patch_size:
    raise ConfigError(
      f"data.image_size={image_size} is not divisible by model.patch_size={patch_size}")
  if not frames or any(t < 1 for t in frames) or len(set(frames)) != len(frames):
    raise ConfigError(f"data.frames={frames} must be distinct positive frame counts")
  if len(bucket_weights) != len(frames):
    raise ConfigError(
      f"data.bucket_weights={bucket_weights} needs one weight per bucket in "
      f"data.frames={frames}")
  if bucket_tokens and (len(bucket_tokens) != len(frames) or min(bucket_tokens) < 1):
    raise ConfigError(
      f"data.bucket_tokens={bucket_tokens} needs one positive token budget per bucket in "
      f"data.frames={frames}, or none (every bucket: data.tokens_per_batch)")


# `type` of an entry of `config.data.sources`; `data.sources.build_source` builds each.
SOURCE_TYPES = ("tfds", "video_folder", "image_folder", "array_record", "demo")
# What the records of an `array_record` source hold (`univit_jax.data.records`).
RECORD_KINDS = ("image", "video")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One entry of `config.data.sources`.

  Attributes:
    name: the key in `config.data.sources`.
    type: one of SOURCE_TYPES.
    frames: the frame-count buckets this source feeds (None: every bucket for video sources,
      (1,) for image sources).
    options: the type's own fields, as sorted (key, value) pairs (hashable).
  """
  name: str
  type: str
  frames: tuple[int, ...] | None
  options: tuple[tuple[str, Any], ...]

  @classmethod
  def from_dict(cls, name: str, spec: Mapping[str, Any]) -> "SourceSpec":
    """Validates a spec dict.

    Raises:
      ConfigError: naming the source and field.
    """
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in SOURCE_TYPES:
      raise ConfigError(
        f"data.sources.{name}.type={kind!r}: expected one of {SOURCE_TYPES}")
    frames = spec.pop("frames", None)
    if frames is not None:
      frames = tuple(int(t) for t in frames)
    allowed = _SOURCE_FIELDS[kind]
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
      raise ConfigError(
        f"data.sources.{name}: unknown fields {unknown} for type {kind!r}; "
        f"expected some of {sorted(allowed)} plus type, frames")
    missing = sorted(k for k, required in allowed.items() if required and k not in spec)
    if missing:
      raise ConfigError(
        f"data.sources.{name}: type {kind!r} needs fields {missing}")
    if kind == "array_record" and spec["kind"] not in RECORD_KINDS:
      raise ConfigError(
        f"data.sources.{name}.kind={spec['kind']!r}: expected one of {RECORD_KINDS}")
    options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.items()))
    return cls(name=name, type=kind, frames=frames, options=options)

  @property
  def is_video(self) -> bool:
    """Whether records are clips: a video folder's, the demo "events" kind's and an ArrayRecord
    source's of kind "video" are; the others are images."""
    if self.type == "video_folder":
      return True
    kind = dict(self.options).get("kind")
    return (self.type == "demo" and kind == "events") or (
      self.type == "array_record" and kind == "video")

  def buckets(self, frames: tuple[int, ...]) -> tuple[int, ...]:
    """The buckets of `frames` (`data.frames`) this source feeds: its own `frames`, else every
    bucket (clips) or the 1-frame bucket (images)."""
    if self.frames is not None:
      return self.frames
    return frames if self.is_video else (1,)

  def to_dict(self) -> dict[str, Any]:
    """The spec as `config.data.sources.<name>` gives it (the inverse of `from_dict`)."""
    frames = {} if self.frames is None else dict(frames=self.frames)
    return dict(type=self.type, **frames, **dict(self.options))


# Per type: field -> required.
_SOURCE_FIELDS = {
  "tfds": dict(name=True, split=True, data_dir=False, builder_dir=False, image_key=False,
               label_key=False, boxes_key=False, box_labels_key=False),
  "video_folder": dict(path=True),
  "image_folder": dict(path=True),
  "array_record": dict(path=True, kind=True),
  "demo": dict(kind=True, split=True, num_examples=True, image_size=False, num_frames=False,
               seed=False),
}


@dataclasses.dataclass(frozen=True)
class ActiveParts:
  """The parts of the recipe a run uses, decided by what its data sources yield.

  Images feed the object bank; clips feed the event banks, the event schedule (and so the
  contrastive term's event-order form) and the clip buckets. Every stage asks `active_parts`,
  so extraction, clustering, training and the loss agree on the banks.

  Attributes:
    images: some source yields images: the object bank is used.
    clips: some source yields clips: the event banks, the schedule and the clip buckets are.
    frames: the frame-count buckets trained (`data.frames`, see `active_parts`).
    bucket_weights: their mixing weights.
    bucket_tokens: their token budgets (`data.bucket_tokens`; () for `data.tokens_per_batch`
      in every bucket).
    granularities: the event granularities extracted and clustered (`extract.granularities`;
      () without clips).
  """
  images: bool
  clips: bool
  frames: tuple[int, ...]
  bucket_weights: tuple[float, ...]
  bucket_tokens: tuple[int, ...]
  granularities: tuple[int, ...]

  @property
  def banks(self) -> tuple[str, ...]:
    """The feature banks extraction writes and clustering clusters, e.g. ("object", "event_1")."""
    return ((specs.OBJECT_BANK,) if self.images else ()) + tuple(
      specs.event_bank_name(g) for g in self.granularities)

  def feeds(self, bank: str) -> bool:
    """Whether the data feeds a bank named in the config: event banks need clips, the object
    bank images."""
    return self.clips if specs.event_granularity(bank) is not None else self.images


def active_parts(config: ml_collections.ConfigDict) -> ActiveParts:
  """What `config.data.sources` yield, and so the banks and buckets every stage uses.

  Without clips, the buckets no source feeds are dropped (image data leaves the default clip
  buckets empty); with clips, every bucket of `data.frames` must be fed. A config without
  sources (a recipe completed by overrides, or one only summarised) keeps every part.

  Raises:
    ConfigError: naming the field, for malformed buckets or sources, or a bucket no source feeds
      when some source yields clips (or when none of them is fed).
  """
  validate_data(config)
  d = config.data
  sources = [SourceSpec.from_dict(name, spec.to_dict()) for name, spec in sorted(d.sources.items())]
  images = not sources or any(not s.is_video for s in sources)
  clips = not sources or any(s.is_video for s in sources)
  fed = {t for s in sources for t in s.buckets(tuple(d.frames))} if sources else set(d.frames)
  unfed = [t for t in d.frames if t not in fed]
  if unfed and (clips or len(unfed) == len(d.frames)):
    raise ConfigError(
      f"no source feeds the {unfed}-frame bucket(s) of data.frames={tuple(d.frames)}; add a "
      "video source (or a source whose `frames` include them) or remove them")
  kept = [i for i, t in enumerate(d.frames) if t in fed]
  return ActiveParts(
    images=images, clips=clips, frames=tuple(d.frames[i] for i in kept),
    bucket_weights=tuple(float(d.bucket_weights[i]) for i in kept),
    bucket_tokens=tuple(int(d.bucket_tokens[i]) for i in kept) if d.bucket_tokens else (),
    granularities=tuple(int(g) for g in config.extract.granularities) if clips else ())


def tokens_per_frame(image_size: int, patch_size: int) -> int:
  """(image_size / patch_size)^2 patch tokens per frame."""
  return (image_size // patch_size) ** 2


def bucket_budgets(frames: Sequence[int], tokens_per_batch: int,
                   bucket_tokens: Sequence[int] = ()) -> dict[int, tuple[str, int]]:
  """The token budget of each bucket, with the config field that sets it: `data.bucket_tokens`
  (one per bucket) when given, else `data.tokens_per_batch` for every bucket."""
  if bucket_tokens:
    return {t: (f"data.bucket_tokens[{i}]", int(n))
            for i, (t, n) in enumerate(zip(frames, bucket_tokens))}
  return {t: ("data.tokens_per_batch", tokens_per_batch) for t in frames}


def bucket_batch_sizes(
    frames: Sequence[int], tokens_per_batch: int, image_size: int, patch_size: int,
    batch_multiple: int = 1, bucket_tokens: Sequence[int] = ()) -> dict[int, int]:
  """Global batch size of each frame-count bucket under its token budget (`bucket_budgets`).

  `budget // (T * tokens_per_frame)`, rounded down to a multiple of `batch_multiple` (e.g. the
  process count, or the data-parallel device count).

  Raises:
    ConfigError: if some bucket would get no clip, naming the bucket and the budget.
  """
  per_frame = tokens_per_frame(image_size, patch_size)
  sizes = {}
  for t, (field, budget) in bucket_budgets(frames, tokens_per_batch, bucket_tokens).items():
    size = budget // (t * per_frame) // batch_multiple * batch_multiple
    if size < 1:
      raise ConfigError(
        f"{field}={budget} leaves no clip for the {t}-frame bucket "
        f"({t} x {per_frame} tokens, batch a multiple of {batch_multiple}); raise it to at "
        f"least {t * per_frame * batch_multiple}")
    sizes[t] = size
  return sizes


def sharding_rules(rules: Sequence[Sequence[Any]]
                   ) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Sharding rules (logical axis name, mesh axes) as tuples: a JSON or ConfigDict list of
  targets becomes a tuple."""
  return tuple((str(name), tuple(target) if isinstance(target, (list, tuple)) else target)
               for name, target in rules)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Typed view of `config.mesh` and `config.sharding_rules` (`sharding.make_mesh` builds the
  mesh from it).

  Attributes:
    axes: the mesh axis names, e.g. ("data", "fsdp", "model").
    shape: their sizes; one may be -1 (the devices the others leave).
    rules: logical axis name -> mesh axes (or None), as `config.sharding_rules`.
    dcn_axis: the axis split across slices when the devices span several (multislice: only
      this axis's collectives cross the slower data-centre network; `sharding.make_mesh`);
      None: the first axis.
  """
  axes: tuple[str, ...]
  shape: tuple[int, ...]
  rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]
  dcn_axis: str | None = None

  def __post_init__(self):
    if self.dcn_axis is None and self.axes:
      object.__setattr__(self, "dcn_axis", self.axes[0])
    if self.dcn_axis not in self.axes:
      raise ConfigError(f"mesh.dcn_axis={self.dcn_axis!r} is not among mesh.axes={self.axes}")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "MeshConfig":
    """Reads `config.mesh` and `config.sharding_rules`."""
    return cls(axes=tuple(config.mesh.axes), shape=tuple(config.mesh.shape),
               rules=sharding_rules(config.sharding_rules),
               dcn_axis=config.mesh.get("dcn_axis"))

  def resolved_shape(self, num_devices: int) -> tuple[int, ...]:
    """`shape` (one entry may be -1) resolved for `num_devices` devices.

    Raises:
      ConfigError: if the axes and shape disagree or the product cannot equal num_devices.
    """
    axes, shape = self.axes, self.shape
    if len(axes) != len(shape):
      raise ConfigError(f"mesh.axes={axes} and mesh.shape={shape} differ in length")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
      raise ConfigError(f"mesh.shape={shape}: sizes must be positive, with at most one -1")
    fixed = math.prod(s for s in shape if s != -1)
    if num_devices % fixed or (-1 not in shape and fixed != num_devices):
      raise ConfigError(
        f"mesh.shape={shape} (axes {axes}) cannot be laid over {num_devices} devices")
    return tuple(num_devices // fixed if s == -1 else s for s in shape)

  def shards(self, logical: str, num_devices: int) -> int:
    """Ways a logical axis (`batch`, `classes`, ...) is split over the mesh: the product of the
    mesh axes its rule maps it to (1 without a rule).

    Raises:
      ConfigError: as `resolved_shape`, or for a rule naming axes the mesh lacks.
    """
    target = dict(self.rules).get(logical)
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    sizes = dict(zip(self.axes, self.resolved_shape(num_devices)))
    unknown = [a for a in axes if a not in sizes]
    if unknown:
      raise ConfigError(
        f"sharding_rules maps {logical!r} to {unknown}, not among mesh.axes={self.axes}")
    return math.prod(sizes[a] for a in axes)


def replicated_bank(bank: str, num_classes: int, shards: int) -> str | None:
  """Why a class bank is replicated, or None when it is split: its centres `[K, D]` split their
  class axis over the mesh's `shards` class shards (`sharding_rules` "classes"), and a K they do
  not divide is kept whole on every device instead (`sharding.tree_shardings`), with its Adam
  moments and gradient, silently. The message names the bank, K, the shard count and the
  nearest class counts that would be split."""
  if num_classes % shards == 0:
    return None
  below, above = num_classes // shards * shards, (num_classes // shards + 1) * shards
  nearest = f"{below:,} or {above:,}" if below else f"{above:,}"
  return (f"bank {bank!r}: {num_classes:,} classes are not a multiple of the mesh's {shards} "
          f"class shards, so every device holds the whole bank, its gradient and Adam moments; "
          f"{nearest} classes would be split {shards} ways")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Typed view of `config.optim` (see `default_config`; `optim.make_optimizer` builds the
  optimiser and `optim.learning_rate` its schedule, which checks `schedule`)."""
  lr: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip_norm: float
  schedule: str
  warmup_steps: int
  end_lr_fraction: float
  bank_lr_scale: float
  bank_weight_decay: float

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "OptimConfig":
    """Reads `config.optim`."""
    return cls(**{f.name: config.optim[f.name] for f in dataclasses.fields(cls)})


def validate(config: ml_collections.ConfigDict, num_devices: int) -> ModelConfig:
  """Validates the model, the data buckets and sources and the mesh of a config for a device
  count; returns the typed model config. (`run_config.build` runs it with every other check of
  a section's values.)

  Raises:
    ConfigError: naming the first invalid field.
  """
  parts = active_parts(config)
  model = model_config(config)
  shards = MeshConfig.from_config(config).shards("batch", num_devices)
  d = config.data
  per_frame = tokens_per_frame(d.image_size, config.model.patch_size)
  budgets = bucket_budgets(parts.frames, d.tokens_per_batch, parts.bucket_tokens)
  for t, (field, budget) in budgets.items():
    batch = budget // (t * per_frame)
    if batch < 1 or batch % shards:
      raise ConfigError(
        f"{field}={budget} gives a global batch of {batch} for the "
        f"{t}-frame bucket ({per_frame} tokens per frame), which must be a positive multiple "
        f"of the {shards} batch shards of the mesh")
  return model


# Logical axis names used by parameters and activations, mapped to mesh axes. One table; configs
# override it as a whole (`config.sharding_rules`).
DEFAULT_SHARDING_RULES = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("mlp", "model"),
  ("heads", "model"),
  ("kv", None),
  ("tokens", None),
  ("patch", None),
  ("layers", None),
  ("classes", ("fsdp", "model")),
)


def default_config(variant: str) -> ml_collections.ConfigDict:
  """The full default config for a model variant; the files in configs/ start from it."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "summary"

  c.model = ml_collections.ConfigDict(dict(
    variant=variant, **model_fields(variant), channels=3,
    dtype="float32", param_dtype="float32", scan=False, remat="none",
    # Frame order reaches the tokens from the first step: a learned projection of sinusoids of
    # each frame's time on the virtual grid is added to its patch embeddings ("none": RoPE only;
    # see docs/training.md, "Seeing time").
    time_embedding="sincos",
    # The self-attention kernel (ATTENTION_IMPLEMENTATIONS): "cudnn" on NVIDIA GPUs in bf16.
    attention="xla",
    # temporal_span: radians the slowest temporal rotary pair turns across the virtual grid (0:
    # unscaled, which leaves time nearly invisible: see models/rope.py).
    rope=dict(mode="temporal_low", base=10_000.0, split=(4, 6, 6), virtual_frames=64,
              temporal_span=math.pi)))

  c.data = ml_collections.ConfigDict()
  c.data.image_size = 224
  # Variable Spatiotemporal Streams: one bucket per frame count, mixed by weight; the batch of a
  # bucket is tokens_per_batch // (T * tokens per frame), so every step costs about the same.
  c.data.frames = (1, 2, 4, 8, 16)
  c.data.bucket_weights = (4, 1, 1, 1, 1)
  c.data.tokens_per_batch = 16 * 16 * 4096
  # Optional token budget per bucket (one per data.frames entry) in place of tokens_per_batch,
  # e.g. to give images more examples per step than the clips' budget would.
  c.data.bucket_tokens = ()
  # Record sources, by name: each a dict with `type` in SOURCE_TYPES and
  # that type's fields (see `univit_jax.data.sources.build_source`), plus optional `frames`, the
  # buckets it feeds (default: (1,) for images, every bucket for videos).
  c.data.sources = ml_collections.ConfigDict()
  c.data.worker_count = 0  # grain worker processes per host (the same on every host)
  c.data.read_threads = 2  # decoding threads per bucket, in each worker
  c.data.worker_buffer_size = 2  # batches each worker keeps ready
  c.data.shuffle_seed = 0
  c.data.max_boxes = 4  # boxes kept per example when a source has boxes (padded / truncated)
  # Video frame sampling: "uniform" spreads T frames over the clip, "random_window" takes T frames
  # `frame_stride` apart from a random start (evaluation: the centred window).
  c.data.frame_sampling = "uniform"
  c.data.frame_stride = 2
  # Augmentation (training only; evaluation resizes and centre-crops): one random resized crop,
  # flip and colour jitter per clip, the same on every frame.
  c.data.augment = True
  c.data.crop_scale = (0.35, 1.0)
  c.data.crop_ratio = (3 / 4, 4 / 3)
  c.data.flip = True
  c.data.color_jitter = 0.4  # strength of brightness / contrast / saturation jitter; 0 = off
  c.data.mean = (0.485, 0.456, 0.406)  # per-channel, frames scaled to [0, 1] first
  c.data.std = (0.229, 0.224, 0.225)
  # Bad input: an unreadable record is replaced by the next one and counted; once
  # `bad_check_after` records were attempted, more than `max_bad_fraction` bad ones stop the run.
  c.data.max_bad_fraction = 0.05
  c.data.bad_check_after = 100

  # On several slices (multislice) `dcn_axis` is split across them and the others within each.
  c.mesh = ml_collections.ConfigDict(dict(axes=("data", "fsdp", "model"), shape=(-1, 1, 1),
                                          dcn_axis="data"))
  c.sharding_rules = DEFAULT_SHARDING_RULES

  c.optim = ml_collections.ConfigDict(dict(
    lr=1e-3, weight_decay=0.2, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
    schedule="cosine", warmup_steps=1000, end_lr_fraction=0.0,
    # The class-centre banks (partial FC) get their own lr multiplier and weight decay, as in
    # OneVision-Encoder; centres are compared by cosine, so decay only changes their step size.
    bank_lr_scale=1.0, bank_weight_decay=0.0))
  c.total_steps = 100_000
  # The `train` mode (univit_jax/train/): logging, checkpoints and safety checks.
  c.train = ml_collections.ConfigDict(dict(
    log_every=50,  # steps between metrics.jsonl / TensorBoard records
    checkpoint_every=1000,  # steps between Orbax checkpoints (and one at the end)
    keep_checkpoints=3,  # newest checkpoints kept
    collapse_threshold=0.99,  # warn when the mean pairwise cosine of embeddings exceeds this
    clusters_workdir="",  # where clusters/<bank>/ are read; "" = the run's workdir
    # Labels are attached by record key: a record of a bank's kind (image / clip) whose key has
    # no labels (added or renamed since extraction, or unreadable then) trains without them;
    # more than this fraction of such records refuses the bank (train.labels.load_bank).
    max_unlabelled_fraction=0.05,
    # "auto": banks start from their k-means centroids when these have the encoder's width
    # (else N(0, 0.01)); "random": always N(0, 0.01).
    bank_init="auto",
    # An export whose encoder a fresh run starts from ("" = random init); a checkpoint, once
    # written, takes precedence. `--mode=pipeline` sets it to round r - 1's export for round r
    # when `warm_start` (the round's banks still start from its own new clusters).
    init_encoder="",
    warm_start=True,
    # Persistent XLA cache; "" = $JAX_COMPILATION_CACHE_DIR if set, else <workdir>/jax_cache;
    # "none" = off.
    compilation_cache_dir="",
    progress_bar=True,  # tqdm bar with ETA on the terminal
    # Resume from a checkpoint although total_steps or the learning-rate / loss schedule changed:
    # the new schedules then apply from the restored step on (docs/training.md, "Resuming with
    # another config"); without it such a resume is refused.
    allow_schedule_change=False))
  c.rounds = 1  # extract -> cluster -> train rounds of --mode=pipeline
  # --mode=summary (univit_jax/summary.py, docs/scaling.md): compile every bucket ahead of time;
  # step: "train" (the full train step, against the accelerators' HBM) or "forward" (the encoder
  # only); devices: compile for that many simulated devices (0: this process's devices).
  c.summary = ml_collections.ConfigDict(dict(compile=True, step="train", devices=0))
  # --mode=export: the encoder of a run's checkpoint written to <workdir>/export (docs/export.md).
  c.export = ml_collections.ConfigDict(dict(
    step=-1,  # the checkpoint's step; -1 = the newest (of the newest round, for a pipeline)
    safetensors=True))  # also write encoder.safetensors (this and the end-of-train export)
  # --mode=embed: embeddings of every record of `source` by an export (docs/export.md).
  c.embed = ml_collections.ConfigDict(dict(
    encoder="",  # an export folder; "" = the workdir's (export/, else the newest round's)
    # One source spec as in data.sources, e.g. --config.embed.source='{"type": "image_folder",
    # "path": "/images"}'.
    source=ml_collections.ConfigDict(),
    output="",  # "" = <workdir>/embeddings
    batch_size=64,  # global; a multiple of the device count
    frames=0,  # frames sampled from each clip; 0 = the longest clip the export was trained on
    segments=(),  # granularities g: also g ordered per-segment embeddings of each record
    regions=False))  # also one embedding per box (sources with boxes)

  # Teacher features for clustering (--mode=extract), see univit_jax/clustering/extract.py and
  # docs/clustering.md ("Teachers"): "pixels", an export folder, "siglip:<file.npz>" (a big_vision
  # SigLIP image tower of `siglip_variant`) or "features:<folder>" (precomputed embeddings).
  c.extract = ml_collections.ConfigDict(dict(
    teacher="pixels", siglip_variant="B/16", pixels_dim=32, pixels_fit_examples=256,
    batch_size=256, clip_frames=16, granularities=(1, 2, 4, 8), segment_frames=2,
    proposal_grids=(2, 3)))

  # Offline clustering (--mode=cluster), see univit_jax/clustering/labels.py. One bank per
  # granularity: image regions ("object") and clips cut into 1, 2, 4, 8 ordered segments.
  c.cluster = ml_collections.ConfigDict(dict(
    num_clusters=dict(object=1_000_000, event_1=100_000, event_2=100_000, event_4=100_000,
                      event_8=100_000),
    iterations=20, top_k=10, init="kmeans++", backend="auto", seed=0,
    # Candidate screening of the matmul assignment: "auto" = bfloat16 where the hardware has
    # native bf16 (accelerators, AMX / AVX512-BF16 CPUs), else float32 (docs/clustering.md).
    screen_dtype="auto",
    # Cluster features minus their mean (re-normalised): for teachers whose features share one
    # large component (kmeans.lloyd.ClusterSpec.center). Off in the papers' recipe.
    center=False,
    # Candidate lists (kmeans.candidates): each row keeps its nearest centroids from the last
    # full search and is scored only against them on the passes in between, for banks whose
    # clusters overlap so much that the bounds skip few rows; 0 = search all on every pass.
    candidates=8))

  # Evaluation (--mode=eval, and during training every `eval.every` steps), see
  # univit_jax/evaluation/run.py and docs/evaluation.md.
  c.eval = ml_collections.ConfigDict(dict(
    # The encoder under test: an export path, "checkpoint", "random", or "" (the workdir's export).
    encoder="",
    baselines=("random", "pixels_mean", "pixels_ordered"),  # rows to compare against
    probes=("linear", "knn", "attentive", "dense", "qa", "order"),
    every=0,  # steps between evaluations during training (0: off)
    train_probes=("linear", "order"),  # the cheap ones, on live parameters
    demo=False,  # the demo's held-out tasks (digit class, objects, events, segmentation, QA)
    # Labelled sets for classification probes, by name: dict(train=<source spec>, test=<source
    # spec>, num_classes=C, frames=T), source specs as in data.sources.
    datasets=ml_collections.ConfigDict(),
    num_train=1500, num_test=500,  # demo records per probe split (train: fresh placements)
    clip_frames=16, seed=1, val_fraction=0.2, batch_size=64,
    attentive_epochs=10, qa_epochs=20, qa_per_record=2))

  # Cluster discrimination (MLCD Eq. 5 with RICE's scale and margin, or the OneVision-Encoder
  # CosFace-per-slot form) per bank, plus the structured contrastive loss; see losses.py.
  c.loss = ml_collections.ConfigDict(dict(
    kind="mlcd", scale=64.0, margin=0.3, sample_ratio=0.1, num_positive_slots=8,
    filter_threshold=0.75,
    # Score batch-centred embeddings (e - mean of the batch's valid rows) against the banks: the
    # discrimination terms then cannot lower their loss by growing the component that every
    # sample shares, which otherwise collapses encoders whose inputs share most of their content
    # (docs/training.md, "Embedding collapse"). Off in the papers' recipe.
    center_embeddings=False,
    # With center_embeddings: the encoder keeps a running mean of its embeddings per clip length
    # (`ModelConfig.embedding_center`), updated every step with this momentum after a plain
    # average over the first 1 / (1 - momentum) steps, and subtracts it from what it outputs.
    center_momentum=0.9,
    # The object term's targets for an image embedding: "objects", the set of its regions' top-1
    # clusters (the paper: an image carries the set of its objects' clusters; images without
    # regions fall back to their whole-image row); "whole", the top-k of the whole-image row.
    image_labels="objects",
    bank_weights=dict(object=1.0, event_1=1.0, event_2=1.0, event_4=1.0, event_8=1.0),
    contrastive=dict(weight=1.0, temperature=0.1),
    # Curriculum, coarse to fine: (training progress from which it applies, active event
    # granularities).
    event_schedule=((0.0, (1,)), (0.25, (1, 2)), (0.5, (1, 2, 4)), (0.75, (1, 2, 4, 8)))))
  return c


LOSS_KINDS = ("mlcd", "cosface_slot")
IMAGE_LABELS = ("objects", "whole")  # loss.image_labels: see default_config


@dataclasses.dataclass(frozen=True)
class DiscriminationConfig:
  """How embeddings are scored against one class-centre bank (`losses.discrimination_loss`)."""
  kind: str = "mlcd"
  scale: float = 64.0
  margin: float = 0.3
  sample_ratio: float = 0.1
  num_positive_slots: int = 8
  filter_threshold: float = 0.75
  center_embeddings: bool = False


# The event schedule of a run without clips: no event granularity at any time.
NO_EVENT_SCHEDULE = ((0.0, ()),)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Typed view of `config.loss`, built by `loss_config`: `bank_weights` of the banks the data
  feeds, and `NO_EVENT_SCHEDULE` when it has no clips."""
  discrimination: DiscriminationConfig = DiscriminationConfig()
  bank_weights: tuple[tuple[str, float], ...] = ()
  contrastive_weight: float = 1.0
  temperature: float = 0.1
  event_schedule: tuple[tuple[float, tuple[int, ...]], ...] = ((0.0, (1,)),)
  image_labels: str = "objects"
  center_momentum: float = 0.9

  @property
  def trained_banks(self) -> tuple[str, ...]:
    """The banks training reads clusters for and scores against: those with a positive weight."""
    return tuple(name for name, weight in self.bank_weights if weight > 0)


def _bank_weights(bank_weights: ml_collections.ConfigDict, parts: ActiveParts
                  ) -> tuple[tuple[str, float], ...]:
  """`loss.bank_weights` restricted to the banks the data feeds (`ActiveParts.feeds`).

  Raises:
    ConfigError: for an unknown bank or a negative weight, or when no bank the data feeds has a
      positive weight.
  """
  weights = tuple((str(name), float(w)) for name, w in bank_weights.items())
  for name, w in weights:
    if name != specs.OBJECT_BANK and specs.event_granularity(name) is None:
      raise ConfigError(f"loss.bank_weights.{name}: unknown bank; expected "
                        f"{specs.OBJECT_BANK!r} or 'event_<g>'")
    if w < 0:
      raise ConfigError(f"loss.bank_weights.{name}={w} must be >= 0")
  fed = tuple((name, w) for name, w in weights if parts.feeds(name))
  if not any(w > 0 for _, w in fed):
    raise ConfigError(
      f"loss.bank_weights={dict(weights)}: no bank the data feeds has a positive weight "
      f"(images feed {specs.OBJECT_BANK!r}, clips 'event_<g>'); there is nothing to train")
  return fed


def _event_schedule(entries: Sequence, weights: tuple[tuple[str, float], ...]
                    ) -> tuple[tuple[float, tuple[int, ...]], ...]:
  """The validated `loss.event_schedule`.

  Raises:
    ConfigError: for a malformed schedule, or an event granularity without a bank weight.
  """
  schedule = tuple((float(start), tuple(int(g) for g in gs)) for start, gs in entries)
  starts = [start for start, _ in schedule]
  if not schedule or starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:])):
    raise ConfigError(
      f"loss.event_schedule={schedule}: needs entries (start, granularities) with strictly "
      "increasing starts, the first at 0.0")
  for start, gs in schedule:
    if not gs or any(g < 1 for g in gs) or start >= 1:
      raise ConfigError(
        f"loss.event_schedule entry {(start, gs)}: start must be < 1 and the granularities "
        "positive and non-empty")
    missing = [specs.event_bank_name(g) for g in gs
               if specs.event_bank_name(g) not in dict(weights)]
    if missing:
      raise ConfigError(
        f"loss.event_schedule uses granularities without a weight in loss.bank_weights: "
        f"{missing}")
  return schedule


def loss_config(config: ml_collections.ConfigDict) -> LossConfig:
  """Validated typed view of `config.loss`, for the banks the data feeds (`active_parts`):
  without clips the event banks and the event schedule are left out, without images the object
  bank.

  Raises:
    ConfigError: naming the field, for unknown kinds, out-of-range values, bank weights that
      leave nothing to train, or (with clips) a malformed schedule or an event granularity of
      the schedule without a bank weight.
  """
  l = config.loss
  if l.kind not in LOSS_KINDS:
    raise ConfigError(f"loss.kind={l.kind!r}: expected one of {LOSS_KINDS}")
  if l.image_labels not in IMAGE_LABELS:
    raise ConfigError(f"loss.image_labels={l.image_labels!r}: expected one of {IMAGE_LABELS}")
  if l.scale <= 0:
    raise ConfigError(f"loss.scale={l.scale} must be positive")
  if not 0 <= l.margin < 1:
    raise ConfigError(f"loss.margin={l.margin} must be in [0, 1)")
  if not 0 < l.sample_ratio <= 1:
    raise ConfigError(f"loss.sample_ratio={l.sample_ratio} must be in (0, 1]")
  if l.num_positive_slots < 1:
    raise ConfigError(f"loss.num_positive_slots={l.num_positive_slots} must be positive")
  if not -1 <= l.filter_threshold <= 1:
    raise ConfigError(f"loss.filter_threshold={l.filter_threshold} must be a cosine in [-1, 1]")
  if not 0 <= l.center_momentum < 1:
    raise ConfigError(f"loss.center_momentum={l.center_momentum} must be in [0, 1)")
  if l.contrastive.weight < 0:
    raise ConfigError(f"loss.contrastive.weight={l.contrastive.weight} must be >= 0")
  if l.contrastive.temperature <= 0:
    raise ConfigError(f"loss.contrastive.temperature={l.contrastive.temperature} must be positive")
  parts = active_parts(config)
  weights = _bank_weights(l.bank_weights, parts)
  schedule = _event_schedule(l.event_schedule, weights) if parts.clips else NO_EVENT_SCHEDULE
  return LossConfig(
    discrimination=DiscriminationConfig(
      kind=l.kind, scale=float(l.scale), margin=float(l.margin),
      sample_ratio=float(l.sample_ratio), num_positive_slots=int(l.num_positive_slots),
      filter_threshold=float(l.filter_threshold),
      center_embeddings=bool(l.center_embeddings)),
    bank_weights=weights, contrastive_weight=float(l.contrastive.weight),
    temperature=float(l.contrastive.temperature), event_schedule=schedule,
    image_labels=str(l.image_labels), center_momentum=float(l.center_momentum))


def pretraining_config(arg: str | None, variant: str, tokens_per_batch: int
                       ) -> ml_collections.ConfigDict:
  """The accelerator recipe shared by configs/vit_{s,b,l}.py.

  Compute dtype "auto" (bf16 on accelerators, f32 on CPU: `resolve_compute_dtype`), scanned
  layers with dot-saving remat, 224 px frames, FSDP over all devices: the
  `fsdp` axis splits the batch, the encoder's weights (`embed`, DEFAULT_SHARDING_RULES) and the
  banks' classes, and the encoder pins its activations to the batch's split. On 64 simulated
  devices with 1M-class banks (docs/scaling.md) S/16 and B/16 fit a v5p and an H100 in every
  bucket with "dots" (B/16 at most 62.03 GiB per device), so they keep it rather than pay
  whole-block remat's recomputation; L/14 does not (172.85 GiB in its 16-frame bucket) and
  sets `remat="full"` (configs/vit_l.py). `arg` takes `variant=<size>/<patch>` and
  `runlocal`, which keeps the model but shrinks frames and batches so the config compiles and
  runs on one CPU.
  """
  arg = parse_arg(arg, variant=variant, runlocal=False)
  c = default_config(arg.variant)
  c.model.dtype = AUTO_DTYPE
  c.model.scan = True
  c.model.remat = "dots"
  c.data.image_size = 224
  c.data.tokens_per_batch = tokens_per_batch
  c.mesh.shape = (1, -1, 1)
  # The papers' 1M object and 100K event classes, rounded to multiples of 1,024 so that the
  # class shards of any power-of-two mesh up to 1,024 devices split them: a bank they do not
  # divide is kept whole on every device (`replicated_bank`; a pipeline refuses a large one).
  c.cluster.num_clusters = dict(object=1_000_448, event_1=100_352, event_2=100_352,
                                event_4=100_352, event_8=100_352)
  if arg.runlocal:
    c.data.image_size = 4 * c.model.patch_size
    c.data.tokens_per_batch = 16 * 16 * 8
    c.mesh.shape = (-1, 1, 1)
  return c

