"""Every config error a stage can raise is raised before the first stage starts: by
`run_config.build` (each section's values) or `preflight.check` (what the mode needs)."""

import re

import pytest

import helpers
from univit_jax import config_lib, main, preflight, rounds, train
from univit_jax.clustering import extract, labels

# (field, value, part of the message): one per check a stage of the pipeline runs.
BAD_VALUES = [
  ("model.rope.mode", "spiral", "model.rope.mode='spiral'"),
  ("model.attention", "flash", "model.attention='flash'"),
  ("mesh.shape", (3, 1, 1), "mesh.shape=(3, 1, 1)"),
  ("data.tokens_per_batch", 16 * 16 * 2, "batch shards"),
  ("data.frame_sampling", "sparse", "data.frame_sampling='sparse'"),
  ("data.max_bad_fraction", 2.0, "data.max_bad_fraction"),
  ("data.sources.events.frames", (16,), "no source feeds the [2, 4, 8]-frame"),
  ("data.sources.digits.type", "nope", "data.sources.digits.type='nope'"),
  ("extract.granularities", (1, 32), "extract.granularities"),
  ("extract.pixels_dim", 15, "extract.pixels_dim=15 must be even"),
  ("extract.batch_size", 0, "extract.batch_size=0"),
  ("cluster.backend", "faiss", "backend='faiss'"),
  ("cluster.top_k", 100, "top_k=100"),
  ("loss.kind", "arcface", "loss.kind='arcface'"),
  ("loss.bank_weights.object", -1.0, "loss.bank_weights.object=-1.0"),
  ("loss.event_schedule", (), "loss.event_schedule=()"),
  ("loss.event_schedule", ((0.0, (1, 16)),), "event_16"),
  ("loss.contrastive.temperature", 0.0, "loss.contrastive.temperature"),
  ("train.log_every", 0, "train.log_every=0"),
  ("train.bank_init", "kmeans", "train.bank_init='kmeans'"),
  ("total_steps", -1, "total_steps=-1"),
  ("optim.schedule", "step", "optim.schedule='step'"),
  ("eval.every", -1, "eval.every=-1"),
  ("rounds", 0, "rounds=0"),
  ("extract.granularities", (1, 2), "trains ['event_4', 'event_8'], which extraction"),
  ("cluster.num_clusters", dict(object=8, event_1=4, event_2=4, event_4=4),
   "trains ['event_8'], which cluster.num_clusters"),
]


def _set(config, field: str, value) -> None:
  *path, key = field.split(".")
  target = config
  for part in path:
    target = target[part]
  with config.unlocked():
    target[key] = value


@pytest.fixture
def stages_must_not_run(monkeypatch):
  """Replaces the pipeline's stages by functions that fail the test when called."""
  def fail(*args, **kwargs):
    raise AssertionError("a stage ran before the config was checked")
  for module, name in ((extract, "run_extract"), (labels, "run_cluster_stage"),
                       (train, "run_train")):
    monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize("field,value,message", BAD_VALUES)
def test_pipeline_refuses_a_bad_config_before_any_stage(field, value, message, tmp_path,
                                                         stages_must_not_run):
  config = helpers.demo_config()
  _set(config, field, value)
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    rounds.run_pipeline(helpers.typed(config), str(tmp_path), log=lambda _: None)
  assert not list(tmp_path.iterdir())


def test_every_mode_has_its_checks():
  assert set(preflight.MODE_CHECKS) == set(main.MODES)


def test_checks_follow_the_mode():
  """What evaluating needs, something to probe, is required where it is used: always for
  --mode=eval, for training only when it evaluates (`eval.every`)."""
  config = helpers.demo_config()
  config.eval.demo = False  # and no eval.datasets: nothing to probe
  preflight.check(helpers.typed(config), "train")
  with pytest.raises(config_lib.ConfigError, match="nothing to probe"):
    preflight.check(helpers.typed(config), "eval")
  config.eval.every = 10
  with pytest.raises(config_lib.ConfigError, match="nothing to probe"):
    preflight.check(helpers.typed(config), "train")


def test_main_checks_the_config_before_the_first_stage(tmp_path):
  result = helpers.run_main("--config=configs/demo.py", f"--workdir={tmp_path}",
                            "--mode=pipeline", "--config.loss.kind=arcface")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip() == (
    "Config error: loss.kind='arcface': expected one of ('mlcd', 'cosface_slot')")
  assert not (tmp_path / "round_1").exists()


def test_a_pipeline_refuses_a_large_bank_the_class_shards_would_replicate(tmp_path,
                                                                         stages_must_not_run):
  """On a (1, 8, 1) mesh the banks' class axis has 8 shards: a class count they do not divide
  leaves the bank whole on every device. A small one passes (training warns); one whose
  centres, gradient and Adam moments exceed `preflight.REPLICATED_BANK_LIMIT` per device is
  refused before any stage, naming the field, the shards and the nearest split counts."""
  config = helpers.demo_config()
  config.mesh.shape = (1, 8, 1)
  config.cluster.num_clusters.event_1 = 36
  preflight.check(helpers.typed(config), "pipeline")
  config.cluster.num_clusters.object = 300_001  # 300,001 x 64 x 16 bytes: 293 MiB
  with pytest.raises(config_lib.ConfigError, match=re.escape(
      "cluster.num_clusters.object=300001: bank 'object': 300,001 classes are not a multiple "
      "of the mesh's 8 class shards") + ".*300,000 or 300,008 classes would be split 8 ways"):
    rounds.run_pipeline(helpers.typed(config), str(tmp_path), log=lambda _: None)
  assert not list(tmp_path.iterdir())
  config.cluster.num_clusters.object = 300_000
  preflight.check(helpers.typed(config), "pipeline")
