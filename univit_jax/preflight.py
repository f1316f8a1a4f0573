"""Every config check the stages of a mode run, run once before the first of them starts.

Each stage reads its config sections through typed views that raise `config_lib.ConfigError`
naming the field; run stage by stage, a mistake in `loss` would surface only after extraction and
clustering had run. `check(config, mode)` builds every view the stages of `mode` build, up front:
`main` calls it before dispatching a mode, `rounds.run_pipeline` before its first round. Files and
data are not read here; a missing path is reported by the stage that opens it, as it starts.
"""

from collections.abc import Callable

import jax
import ml_collections

from univit_jax import config_lib, embed, optim
from univit_jax.clustering import extract, labels
from univit_jax.clustering.kmeans import lloyd
from univit_jax.data import pipeline
from univit_jax.evaluation import run as eval_run
from univit_jax.train import loop

Check = Callable[[ml_collections.ConfigDict], None]


def _data(config: ml_collections.ConfigDict) -> None:
  """The training data's typed view, with at least one source."""
  if not pipeline.DataConfig.from_config(config).sources:
    raise config_lib.ConfigError("data.sources is empty: configure at least one source")


def _extract(config: ml_collections.ConfigDict) -> None:
  _data(config)
  extract.ExtractConfig.from_config(config)


def _cluster(config: ml_collections.ConfigDict) -> None:
  try:
    labels.cluster_specs(config)
  except lloyd.KMeansError as e:
    raise config_lib.ConfigError(f"cluster: {e}") from e


def _optimizer(config: ml_collections.ConfigDict) -> None:
  optim.make_optimizer(config.optim, config.total_steps)


def _train(config: ml_collections.ConfigDict) -> None:
  _data(config)
  loop.validate_train(config)
  config_lib.loss_config(config)
  _optimizer(config)
  if config.eval.every:
    eval_run.eval_config(config)


def _eval(config: ml_collections.ConfigDict) -> None:
  eval_run.eval_config(config)


def _export(config: ml_collections.ConfigDict) -> None:
  if config.export.step < -1:
    raise config_lib.ConfigError(
      f"export.step={config.export.step}: expected a checkpoint's step, or -1 for the newest")


def _embed(config: ml_collections.ConfigDict) -> None:
  embed.EmbedConfig.from_config(config)


def _rounds(config: ml_collections.ConfigDict) -> None:
  """What the pipeline adds: at least one round, and every trained bank extracted and given a
  cluster count (else training would miss its clusters after extraction and clustering ran)."""
  if config.rounds < 1:
    raise config_lib.ConfigError(f"rounds={config.rounds} must be >= 1")
  extracted = config_lib.active_parts(config).banks
  trained = config_lib.loss_config(config).trained_banks
  missing = [b for b in trained if b not in extracted]
  if missing:
    raise config_lib.ConfigError(
      f"loss.bank_weights trains {missing}, which extraction does not write for this data "
      f"(extract.granularities={tuple(config.extract.granularities)}); add their granularities "
      "or set their weights to 0")
  missing = [b for b in trained if b not in config.cluster.num_clusters]
  if missing:
    raise config_lib.ConfigError(
      f"loss.bank_weights trains {missing}, which cluster.num_clusters gives no cluster count")


# The checks of each mode of `main.MODES`, beyond `config_lib.validate` (model, data, mesh).
MODE_CHECKS: dict[str, tuple[Check, ...]] = {
  "summary": (_optimizer,),
  "extract": (_extract,),
  "cluster": (_cluster,),
  "train": (_train,),
  "pipeline": (_extract, _cluster, _train, _rounds),
  "eval": (_eval,),
  "export": (_export,),
  "embed": (_embed,),
}


def check(config: ml_collections.ConfigDict, mode: str) -> None:
  """Runs every config check the stages of `mode` would run.

  Raises:
    config_lib.ConfigError: naming the first invalid field.
  """
  config_lib.validate(config, jax.device_count())
  for stage_check in MODE_CHECKS[mode]:
    stage_check(config)
