"""The run's config as typed sections, built once at the entry.

`main` loads the user's `ml_collections.ConfigDict` (configs/<name>.py plus overrides) and calls
`build` once; every stage then takes the `RunConfig`, or only the sections it reads:

  run = run_config.build(config, jax.device_count())
  mesh = sharding.make_mesh(run.mesh)
  tx = optim.make_optimizer(run.optim, run.train.total_steps)

Sections: `model`, `parts`, `loss`, `mesh` and `optim` are `config_lib`'s views, `data` is
`data_config.DataConfig`, the stages' sections are in `stage_config`. Below this package nothing
reads a ConfigDict. `build` runs every check that holds whatever the mode; what only some modes
need (a data source, an `embed.source`, something to probe, the pipeline's banks) is checked by
`preflight`.
"""

import copy
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import ml_collections

from univit_jax import config_lib
from univit_jax.run_config import data_config, stage_config


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Every section of a run's config as the stages read it (see `build`).

  Attributes:
    num_devices: the devices the sections were built and checked for (the mesh is laid over
      them): this process's, or the `summary.devices` a summary simulates.
    seed: seeds the parameters and the pixels teacher.
    rounds: extract -> cluster -> train rounds of --mode=pipeline (and so where a workdir's newest
      export or checkpoint is looked for).
    model: the encoder.
    parts: what the data sources feed: banks and buckets.
    data: the input pipeline.
    mesh: the device mesh and the sharding rules.
    optim: the optimiser.
    train: the training loop (and `total_steps`).
    loss: the loss terms, for the banks the data feeds.
    extract, cluster, eval, embed, export, summary: the stages' sections.
    record: the config as given, a JSON-able dict (read only): what an export keeps as its
      config.json.
  """
  num_devices: int
  seed: int
  rounds: int
  model: config_lib.ModelConfig
  parts: config_lib.ActiveParts
  data: data_config.DataConfig
  mesh: config_lib.MeshConfig
  optim: config_lib.OptimConfig
  train: stage_config.TrainConfig
  loss: config_lib.LossConfig
  extract: stage_config.ExtractConfig
  cluster: stage_config.ClusterConfig
  eval: stage_config.EvalConfig
  embed: stage_config.EmbedConfig
  export: stage_config.ExportConfig
  summary: stage_config.SummaryConfig
  record: Mapping[str, Any]

  def record_json(self) -> str:
    """`record` as JSON, byte for byte what `ConfigDict.to_json_best_effort` gives."""
    return json.dumps(self.record)

  def with_fields(self, section: str, **changes: Any) -> "RunConfig":
    """This run with fields of one section changed, in the typed section and in `record` alike
    (e.g. `with_fields("extract", teacher=path)`); the section checks its new values."""
    record = copy.deepcopy(dict(self.record))
    record[section].update(changes)
    return dataclasses.replace(self, record=record, **{
      section: dataclasses.replace(getattr(self, section), **changes)})


def build(config: ml_collections.ConfigDict, num_devices: int) -> RunConfig:
  """The typed sections of `config` for a run on `num_devices` devices.

  Checks the model, the data buckets and sources and the mesh for the device count
  (`config_lib.validate`), and every section's own values.

  Raises:
    config_lib.ConfigError: naming the first invalid field.
  """
  model = config_lib.validate(config, num_devices)
  if config.rounds < 1:
    raise config_lib.ConfigError(f"rounds={config.rounds} must be >= 1")
  return RunConfig(
    num_devices=num_devices, seed=int(config.seed), rounds=int(config.rounds), model=model,
    parts=config_lib.active_parts(config), data=data_config.DataConfig.from_config(config),
    mesh=config_lib.MeshConfig.from_config(config),
    optim=config_lib.OptimConfig.from_config(config),
    train=stage_config.TrainConfig.from_config(config), loss=config_lib.loss_config(config),
    extract=stage_config.ExtractConfig.from_config(config),
    cluster=stage_config.ClusterConfig.from_config(config),
    eval=stage_config.EvalConfig.from_config(config),
    embed=stage_config.EmbedConfig.from_config(config),
    export=stage_config.ExportConfig.from_config(config),
    summary=stage_config.SummaryConfig.from_config(config),
    record=json.loads(config.to_json_best_effort()))


def from_record(record: Mapping[str, Any], num_devices: int) -> RunConfig:
  """`build` of the config a run's `record` holds, for `num_devices` devices: how a process
  given only the record (`--mode=summary`'s child on simulated devices) gets the run's sections.

  Raises:
    config_lib.ConfigError: naming the first invalid field.
  """
  return build(ml_collections.ConfigDict(copy.deepcopy(dict(record))), num_devices)


def export_sections(record: Mapping[str, Any]
                    ) -> tuple[config_lib.ModelConfig, data_config.DataConfig,
                               config_lib.MeshConfig]:
  """The sections an export needs of the run that wrote it (`encoder.EncoderSpec`), read from
  the run's `record` (its config.json): how exports written before encoder.json load. No device
  count is checked: the export may load on other devices than it was trained on.

  Raises:
    config_lib.ConfigError: naming the field, for a record these sections cannot be read from.
  """
  config = ml_collections.ConfigDict(record)
  return (config_lib.model_config(config), data_config.DataConfig.from_config(config),
          config_lib.MeshConfig.from_config(config))
