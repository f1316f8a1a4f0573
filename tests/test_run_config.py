"""`run_config.build`: the config as typed sections, built once; derived runs; the record."""

import dataclasses
import json

import pytest

from helpers import demo_config, load_config, typed
from univit_jax import config_lib, run_config
from univit_jax.clustering import labels
from univit_jax.clustering.kmeans import lloyd
from univit_jax.run_config import stage_config


def test_sections_follow_the_config():
  config = demo_config()
  run = typed(config)
  assert run.model == config_lib.model_config(config)
  assert run.parts == config_lib.active_parts(config)
  assert run.data.frames == run.parts.frames and run.data.patch_size == config.model.patch_size
  assert run.mesh.axes == tuple(config.mesh.axes) and dict(run.mesh.rules)["embed"] == "fsdp"
  assert run.train.total_steps == config.total_steps and run.optim.lr == config.optim.lr
  assert dict(run.cluster.num_clusters) == config.cluster.num_clusters.to_dict()
  assert "num_clusters" not in dict(run.cluster.fields)
  assert run.summary == stage_config.SummaryConfig(
    compile=config.summary.compile, step=config.summary.step, devices=config.summary.devices)
  assert run.embed.source is None  # only --mode=embed needs one
  with pytest.raises(config_lib.ConfigError, match="embed.source is empty"):
    run.embed.required_source()
  # The record is the config as given, byte for byte what exports wrote before it existed.
  assert run.record_json() == config.to_json_best_effort()


def test_a_run_is_rebuilt_from_its_record_for_other_devices():
  """What `--mode=summary`'s child does with the record it is given: the same sections, checked
  for its own device count."""
  config = load_config("vit_l")
  run = run_config.build(config, 8)
  again = run_config.from_record(json.loads(run.record_json()), 64)
  assert again.num_devices == 64 and run.num_devices == 8
  assert dataclasses.replace(again, num_devices=8) == run
  with pytest.raises(config_lib.ConfigError, match="multiple of the 65536 batch shards"):
    run_config.from_record(run.record, 65_536)


def test_a_derived_run_changes_section_and_record_and_is_checked():
  run = typed(demo_config())
  later = run.with_fields("train", init_encoder="/r1/export", log_every=5)
  assert (later.train.init_encoder, later.train.log_every) == ("/r1/export", 5)
  assert json.loads(later.record_json())["train"]["log_every"] == 5
  assert run.train.log_every != 5 and run.record["train"]["init_encoder"] == ""  # unchanged
  with pytest.raises(config_lib.ConfigError, match="train.log_every=0"):
    run.with_fields("train", log_every=0)


def test_cluster_fields_are_carried_for_the_kmeans_spec_to_check():
  """The `cluster` section's fields besides `num_clusters` reach every bank's `ClusterSpec` as
  given, so a field the spec does not have is refused by the k-means code, naming it."""
  cfg = stage_config.ClusterConfig(num_clusters=(("object", 4),),
                                   fields=(("iterations", 3), ("colour", "red")))
  with pytest.raises(lloyd.KMeansError, match="bank 'object'.*colour"):
    labels.cluster_specs(cfg)
  spec = labels.cluster_specs(stage_config.ClusterConfig(
    (("object", 4),), (("iterations", 3), ("top_k", 2))))["object"]
  assert (spec.num_clusters, spec.iterations, spec.top_k) == (4, 3, 2)
