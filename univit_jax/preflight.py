"""What the stages of a mode need of the config beyond valid sections, checked before the first
of them starts.

`run_config.build` checks every section's own values; what only some modes need (data sources
to train on, an `embed.source`, something to probe, a SigLIP tower's variant, an optimiser
schedule, clusters for every trained bank, class counts the mesh splits) is checked here. Run
stage by stage, a mistake found only where a stage reads it would surface after extraction and
clustering had run, so `check(run, mode)` runs every check the stages of `mode` make, up front:
`main` calls it before dispatching a mode, `rounds.run_pipeline` before its first round. Files
and data are not read here; a missing path is reported by the stage that opens it, as it
starts.
"""

from collections.abc import Callable

from univit_jax import config_lib, optim, run_config
from univit_jax.clustering import extract, labels
from univit_jax.clustering.kmeans import lloyd
from univit_jax.models import siglip

Check = Callable[[run_config.RunConfig], None]


def _data(run: run_config.RunConfig) -> None:
  """At least one training data source."""
  if not run.data.sources:
    raise config_lib.ConfigError("data.sources is empty: configure at least one source")


def _extract(run: run_config.RunConfig) -> None:
  _data(run)
  if run.extract.teacher.startswith(extract.SIGLIP):
    siglip.decode_variant(run.extract.siglip_variant)


def _cluster(run: run_config.RunConfig) -> None:
  try:
    labels.cluster_specs(run.cluster)
  except lloyd.KMeansError as e:
    raise config_lib.ConfigError(f"cluster: {e}") from e


def _optimizer(run: run_config.RunConfig) -> None:
  optim.make_optimizer(run.optim, run.train.total_steps)


def _train(run: run_config.RunConfig) -> None:
  _data(run)
  _optimizer(run)
  if run.eval.every:
    run.eval.check_probed()


def _eval(run: run_config.RunConfig) -> None:
  run.eval.check_probed()


def _embed(run: run_config.RunConfig) -> None:
  run.embed.required_source()


def _rounds(run: run_config.RunConfig) -> None:
  """What the pipeline adds: every trained bank extracted and given a cluster count (else
  training would miss its clusters after extraction and clustering ran)."""
  extracted = run.parts.banks
  trained = run.loss.trained_banks
  missing = [b for b in trained if b not in extracted]
  if missing:
    raise config_lib.ConfigError(
      f"loss.bank_weights trains {missing}, which extraction does not write for this data "
      f"(extract.granularities={run.extract.granularities}); add their granularities "
      "or set their weights to 0")
  counted = dict(run.cluster.num_clusters)
  missing = [b for b in trained if b not in counted]
  if missing:
    raise config_lib.ConfigError(
      f"loss.bank_weights trains {missing}, which cluster.num_clusters gives no cluster count")


# The per-device bytes of a replicated bank's float32 centres, gradient and two Adam moments
# (16 bytes per class and dimension) above which a pipeline refuses it.
REPLICATED_BANK_LIMIT = 256 * 2**20


def _split_banks(run: run_config.RunConfig) -> None:
  """Every large trained bank split over the mesh's class shards. A class count the shards do
  not divide leaves the bank whole on every device (`config_lib.replicated_bank`), silently
  and for the whole run: 1.5 GiB per device for a 100,000-class bank at width 1,024, where a
  split one takes 24 MiB on 64 devices. A pipeline chooses its class counts here, so it is
  refused before extraction starts when that would cost more than REPLICATED_BANK_LIMIT; a
  smaller replicated bank (tests, the demo on several devices) costs little, and training
  logs a warning for it. (`--mode=train` reads class counts made earlier and only warns.)"""
  shards = run.mesh.shards("classes", run.num_devices)
  for bank, k in run.cluster.num_clusters:
    replicated = config_lib.replicated_bank(bank, k, shards)
    held = 16 * k * run.model.width
    if bank in run.loss.trained_banks and replicated and held > REPLICATED_BANK_LIMIT:
      raise config_lib.ConfigError(
        f"cluster.num_clusters.{bank}={k}: {replicated} ({held / 2**30:.2f} GiB per device "
        f"at width {run.model.width}; a pipeline refuses replicated banks over "
        f"{REPLICATED_BANK_LIMIT // 2**20} MiB)")


# The checks of each mode of `main.MODES`, beyond `run_config.build` (every section's values).
MODE_CHECKS: dict[str, tuple[Check, ...]] = {
  "summary": (_optimizer,),
  "extract": (_extract,),
  "cluster": (_cluster,),
  "train": (_train,),
  "pipeline": (_extract, _cluster, _train, _rounds, _split_banks),
  "eval": (_eval,),
  "export": (),
  "embed": (_embed,),
}


def check(run: run_config.RunConfig, mode: str) -> None:
  """Runs every check the stages of `mode` make beyond the sections' own.

  Raises:
    config_lib.ConfigError: naming the first field `mode` cannot run with.
  """
  for stage_check in MODE_CHECKS[mode]:
    stage_check(run)
