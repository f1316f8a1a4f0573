"""Typed views of the sections the stages read: `train`, `extract`, `cluster`, `eval`, `embed`,
`export`, `summary`.

Each is a frozen dataclass that checks its own values when built (`config_lib.ConfigError`
naming the field), so a derived section (`dataclasses.replace`) is checked the same way. What a
section needs only in some modes (an `embed.source`, something for `eval` to probe) is checked by
a method the stage and `preflight` call.
"""

import dataclasses
from typing import Any

import ml_collections

from univit_jax import config_lib

# `train.bank_init`: "auto" starts a bank from its k-means centroids when they fit the encoder,
# "random" never does (`train.loop.initial_centroids`).
BANK_INITS = ("auto", "random")

# The probes `eval.probes` may name; `evaluation.run.EVALUATORS` maps each to its evaluator.
PROBES = ("linear", "knn", "attentive", "dense", "qa", "order")
# Raw-pixel baselines (`evaluation.features.pixels`), and every row `eval.baselines` may add.
PIXEL_BASELINES = ("pixels_mean", "pixels_ordered")
BASELINES = ("random", *PIXEL_BASELINES, "teacher")

# The name of `embed.source` as a data source: its example ids are its record indices.
EMBED_SOURCE = "embed"

# What `summary.step` compiles: the full train step, or the encoder's forward pass only.
SUMMARY_STEPS = ("train", "forward")


def _plain(value: Any) -> Any:
  """A config value without ConfigDicts (nested ones become dicts)."""
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Typed view of `config.train` and `config.total_steps` (see `config_lib.default_config`)."""
  total_steps: int
  log_every: int = 50
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  collapse_threshold: float = 0.99
  clusters_workdir: str = ""
  max_unlabelled_fraction: float = 0.05
  bank_init: str = "auto"
  init_encoder: str = ""
  warm_start: bool = True
  compilation_cache_dir: str = ""
  progress_bar: bool = True
  allow_schedule_change: bool = False

  def __post_init__(self):
    if self.total_steps < 0:
      raise config_lib.ConfigError(f"total_steps={self.total_steps} must be >= 0")
    for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, field) < 1:
        raise config_lib.ConfigError(
          f"train.{field}={getattr(self, field)} must be a positive integer")
    if not 0 <= self.max_unlabelled_fraction <= 1:
      raise config_lib.ConfigError(
        f"train.max_unlabelled_fraction={self.max_unlabelled_fraction} must be in [0, 1]")
    if self.bank_init not in BANK_INITS:
      raise config_lib.ConfigError(
        f"train.bank_init={self.bank_init!r}: expected one of {BANK_INITS}")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "TrainConfig":
    """Reads `config.train` and `config.total_steps`."""
    t = config.train
    return cls(total_steps=int(config.total_steps), **{
      f.name: t[f.name] for f in dataclasses.fields(cls) if f.name != "total_steps"})


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  """Typed view of `config.extract`.

  Attributes:
    teacher: "pixels" for the PCA bootstrap, "siglip:<file.npz>" for a big_vision SigLIP image
      tower, "features:<folder>" for precomputed embeddings, else the folder of an exported
      encoder.
    siglip_variant: big_vision's name of the SigLIP tower, e.g. "B/16" (its sizes and patch;
      checked by `preflight`, which may import the models).
    pixels_dim: PCA components of the pixels teacher (its feature width).
    pixels_fit_examples: training examples whose frames fit the PCA.
    batch_size: global examples per extraction step.
    clip_frames: frames sampled (uniformly) from each clip.
    granularities: segment counts g of the event banks.
    segment_frames: frames per segment in an event feature.
    proposal_grids: n for the n x n grid boxes proposed when an image has no boxes.
  """
  teacher: str = "pixels"
  siglip_variant: str = "B/16"
  pixels_dim: int = 32
  pixels_fit_examples: int = 256
  batch_size: int = 64
  clip_frames: int = 16
  granularities: tuple[int, ...] = (1, 2, 4, 8)
  segment_frames: int = 2
  proposal_grids: tuple[int, ...] = (2,)

  def __post_init__(self):
    for g in self.granularities:
      if g < 1 or g > self.clip_frames:
        raise config_lib.ConfigError(
          f"extract.granularities={self.granularities}: each must be in [1, "
          f"extract.clip_frames={self.clip_frames}]")
    if self.segment_frames < 1 or self.pixels_dim < 1 or self.batch_size < 1:
      raise config_lib.ConfigError(
        f"extract.segment_frames={self.segment_frames}, extract.pixels_dim={self.pixels_dim} "
        f"and extract.batch_size={self.batch_size} must be >= 1")
    if self.teacher == "pixels" and self.pixels_dim % 2:
      raise config_lib.ConfigError(
        f"extract.pixels_dim={self.pixels_dim} must be even (two views)")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ExtractConfig":
    """Reads `config.extract`."""
    e = config.extract
    return cls(teacher=e.teacher, siglip_variant=e.siglip_variant, pixels_dim=e.pixels_dim,
               pixels_fit_examples=e.pixels_fit_examples, batch_size=e.batch_size,
               clip_frames=e.clip_frames, granularities=tuple(e.granularities),
               segment_frames=e.segment_frames, proposal_grids=tuple(e.proposal_grids))


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """Typed view of `config.cluster`.

  Attributes:
    num_clusters: (bank, K) pairs, sorted by bank.
    fields: the section's other fields, as sorted (name, value) pairs: what every bank's k-means
      `ClusterSpec` shares. The k-means code owns their names and checks their values
      (`clustering.labels.cluster_specs`), so they are carried here as the config gives them.
  """
  num_clusters: tuple[tuple[str, int], ...]
  fields: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ClusterConfig":
    """Reads `config.cluster`."""
    c = config.cluster
    return cls(
      num_clusters=tuple((str(bank), int(k)) for bank, k in sorted(c.num_clusters.items())),
      fields=tuple((name, _plain(value)) for name, value in sorted(c.items())
                   if name != "num_clusters"))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Typed view of `config.eval` (see `config_lib.default_config`).

  Attributes:
    encoder: the encoder under test: an export path, "checkpoint", "random", or "" (the
      workdir's export).
    baselines: rows to compare against, some of BASELINES.
    probes: the probes run, some of PROBES.
    every: steps between evaluations during training (0: off).
    train_probes: the probes run during training.
    val_fraction: share of each probe's training split held out to pick its settings.
    seed: seeds the demo records and the probes.
    attentive_epochs, qa_epochs: training epochs of the attentive and QA probes.
    qa_per_record: questions asked per record.
    demo: probe the demo's held-out tasks.
    datasets: labelled sets for classification probes, as (name, spec) pairs: spec holds
      `train` and `test` source specs, `num_classes`, optionally `frames` and `description`.
    num_train, num_test: demo records per probe split.
    clip_frames: frames of the demo's clips.
    batch_size: records per feature-extraction batch.
  """
  encoder: str
  baselines: tuple[str, ...]
  probes: tuple[str, ...]
  every: int
  train_probes: tuple[str, ...]
  val_fraction: float
  seed: int
  attentive_epochs: int
  qa_epochs: int
  qa_per_record: int
  demo: bool = False
  datasets: tuple[tuple[str, dict[str, Any]], ...] = ()
  num_train: int = 1500
  num_test: int = 500
  clip_frames: int = 16
  batch_size: int = 64

  def __post_init__(self):
    for field in ("probes", "train_probes"):
      unknown = sorted(set(getattr(self, field)) - set(PROBES))
      if unknown:
        raise config_lib.ConfigError(
          f"eval.{field} names unknown probes {unknown}; expected some of {sorted(PROBES)}")
    unknown = sorted(set(self.baselines) - set(BASELINES))
    if unknown:
      raise config_lib.ConfigError(
        f"eval.baselines names unknown baselines {unknown}; expected some of {list(BASELINES)}")
    if not 0 < self.val_fraction < 1:
      raise config_lib.ConfigError(f"eval.val_fraction={self.val_fraction} must be in (0, 1)")
    if self.num_train < 10 or self.num_test < 1:
      raise config_lib.ConfigError(
        f"eval.num_train={self.num_train} must be >= 10 and eval.num_test={self.num_test} >= 1")
    if self.every < 0:
      raise config_lib.ConfigError(f"eval.every={self.every} must be >= 0 (0: off)")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "EvalConfig":
    """Reads `config.eval`."""
    e = config.eval
    return cls(
      encoder=e.encoder, baselines=tuple(e.baselines), probes=tuple(e.probes), every=e.every,
      train_probes=tuple(e.train_probes), val_fraction=float(e.val_fraction), seed=e.seed,
      attentive_epochs=e.attentive_epochs, qa_epochs=e.qa_epochs, qa_per_record=e.qa_per_record,
      demo=bool(e.demo), datasets=tuple((name, _plain(spec)) for name, spec in e.datasets.items()),
      num_train=e.num_train, num_test=e.num_test, clip_frames=e.clip_frames,
      batch_size=e.batch_size)

  def check_probed(self) -> None:
    """What evaluating needs beyond valid fields: something to probe.

    Raises:
      config_lib.ConfigError: without the demo's tasks and without `eval.datasets`.
    """
    if not self.demo and not self.datasets:
      raise config_lib.ConfigError(
        "eval.demo is off and eval.datasets is empty: nothing to probe")


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
  """Typed view of `config.embed` (see `config_lib.default_config`).

  Attributes:
    source: the records to embed (named EMBED_SOURCE); None when `embed.source` is empty (only
      --mode=embed needs one: `required_source`).
    encoder: an export folder; "" = the workdir's (`encoder.find_export`).
    output: the output folder; "" = `<workdir>/embeddings`.
    batch_size: global records per forward pass.
    frames: frames sampled from each clip; 0 = the longest clip the export was trained on.
    segments: granularities g of the per-segment embeddings written.
    regions: write one embedding per box of the source's records.
  """
  source: config_lib.SourceSpec | None
  encoder: str = ""
  output: str = ""
  batch_size: int = 64
  frames: int = 0
  segments: tuple[int, ...] = ()
  regions: bool = False

  def __post_init__(self):
    if self.batch_size < 1 or self.frames < 0 or any(g < 1 for g in self.segments):
      raise config_lib.ConfigError(
        f"embed.batch_size={self.batch_size} must be >= 1, embed.frames={self.frames} >= 0 and "
        f"embed.segments={self.segments} positive")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "EmbedConfig":
    """Reads `config.embed`.

    Raises:
      config_lib.ConfigError: naming the field, for a malformed source or a non-positive size.
    """
    e = config.embed
    source = None
    if e.source.keys():
      try:
        source = config_lib.SourceSpec.from_dict(EMBED_SOURCE, e.source.to_dict())
      except config_lib.ConfigError as err:
        raise config_lib.ConfigError(f"embed.source: {err}") from err
    return cls(source=source, encoder=e.encoder, output=e.output, batch_size=int(e.batch_size),
               frames=int(e.frames), segments=tuple(int(g) for g in e.segments),
               regions=bool(e.regions))

  def required_source(self) -> config_lib.SourceSpec:
    """The source to embed.

    Raises:
      config_lib.ConfigError: when `embed.source` is empty.
    """
    if self.source is None:
      raise config_lib.ConfigError(
        "embed.source is empty: give the records to embed as one source spec, e.g. "
        "--config.embed.source='{\"type\": \"image_folder\", \"path\": \"/data/images\"}'")
    return self.source


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """Typed view of `config.export`.

  Attributes:
    step: the checkpoint `--mode=export` exports; -1 = the newest.
    safetensors: exports also write encoder.safetensors.
  """
  step: int = -1
  safetensors: bool = True

  def __post_init__(self):
    if self.step < -1:
      raise config_lib.ConfigError(
        f"export.step={self.step}: expected a checkpoint's step, or -1 for the newest")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ExportConfig":
    """Reads `config.export`."""
    return cls(step=int(config.export.step), safetensors=bool(config.export.safetensors))


@dataclasses.dataclass(frozen=True)
class SummaryConfig:
  """Typed view of `config.summary` (`--mode=summary`, univit_jax/summary.py).

  Attributes:
    compile: lower and compile every bucket.
    step: what is compiled, one of SUMMARY_STEPS.
    devices: simulated device count (0: this process's devices); `main` builds the run's
      sections for that many devices in summary mode.
  """
  compile: bool = True
  step: str = "train"
  devices: int = 0

  def __post_init__(self):
    if self.step not in SUMMARY_STEPS:
      raise config_lib.ConfigError(f"summary.step={self.step!r}: expected one of {SUMMARY_STEPS}")
    if self.devices < 0:
      raise config_lib.ConfigError(
        f"summary.devices={self.devices} must be >= 0 (0: this process's devices)")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SummaryConfig":
    """Reads `config.summary`."""
    s = config.summary
    return cls(compile=bool(s.compile), step=str(s.step), devices=int(s.devices))
