"""The evaluation stage: temporal probes and order sensitivity on time-blind vs order-aware
extractors, `--mode=eval` end to end, and evaluation during training."""

import json
import os

import numpy as np
import pytest

import helpers
import train_fixtures
from univit_jax import checkpointing, config_lib, train
from univit_jax import encoder as encoder_lib
from univit_jax.evaluation import clusters, features, run, tasks
from univit_jax.models import vit
from univit_jax.run_config import stage_config

_PATTERNS = 4


class _OrderedClips:
  """Clips of 4 frames, each frame one of 4 fixed patterns, every pattern once per clip.

  The label is the pattern of the first frame: content is the same for every clip, so only
  the order tells the label apart.
  """

  def __init__(self, num_examples: int, seed: int):
    self._n, self._seed = num_examples, seed
    grid = np.random.default_rng(99).integers(0, 256, size=(_PATTERNS, 16, 16, 3))
    self._patterns = grid.astype(np.uint8)

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    order = np.random.default_rng((self._seed, i)).permutation(_PATTERNS)
    return dict(frames=self._patterns[order], label=np.int32(order[0]))


def _context(num_train=200, num_test=100, probes=("linear", "order")):
  record_set = tasks.RecordSet("clips", {"train": _OrderedClips(num_train, 0),
                                         "test": _OrderedClips(num_test, 1)}, 4, 16)
  task = tasks.Task("first_pattern", "clips", "multiclass", _PATTERNS,
                    lambda r: int(r["label"]), "the first frame's pattern", temporal=True)
  cfg = stage_config.EvalConfig(encoder="", baselines=(), probes=probes, every=0,
                                train_probes=(), val_fraction=0.2, seed=0, attentive_epochs=2,
                                qa_epochs=1, qa_per_record=1)
  return run.Context(data=tasks.EvalData({"clips": record_set}), tasks=(task,), cfg=cfg)


@pytest.mark.slow
def test_temporal_probe_is_at_majority_when_blind_to_order_and_high_when_not():
  ctx = _context()
  blind = run.evaluate(ctx, features.pixels("pixels_mean", 8), ctx.cfg.probes, log=print)
  ordered = run.evaluate(ctx, features.pixels("pixels_ordered", 8), ctx.cfg.probes, log=print)
  majority = blind["first_pattern/linear"].details["majority"]
  assert abs(blind["first_pattern/linear"].value - majority) < 0.05
  assert ordered["first_pattern/linear"].value > majority + 0.5
  assert blind["clips/order"].value < 1e-6
  assert ordered["clips/order"].value > 0.01  # uncentred raw pixels: cosines stay high


def test_order_sensitivity_of_identical_and_opposite_embeddings():
  x = np.random.default_rng(0).normal(size=(5, 8))
  assert run.order_sensitivity(x, x).value == pytest.approx(0.0, abs=1e-6)
  assert run.order_sensitivity(x, -x).value == pytest.approx(2.0)


def test_demo_tasks_targets_follow_the_records():
  sets = tasks.demo_record_sets(32, 8, num_train=6, num_test=4, seed=1)
  data = tasks.EvalData(sets)
  by_name = {t.name: t for t in tasks.DEMO_TASKS}
  objects = data.records("objects", "test")
  presence = data.targets(by_name["object_presence"], "test")
  for record, hot in zip(objects, presence):
    assert set(np.flatnonzero(hot)) == set(record["box_labels"][record["box_mask"]])
  segmentation = data.targets(by_name["segmentation"], "test")
  assert segmentation.shape == (4, 1, 32, 32)
  assert set(np.unique(segmentation[0])) == {0} | {
    int(c) + 1 for c in objects[0]["item_labels"] if c >= 0}
  events = data.records("events", "train")
  first = data.targets(by_name["first_action"], "train")
  assert data.frames("events", "train").shape == (6, 8, 32, 32, 3)
  for record, action in zip(events, first):
    assert action == record["events"][0] % 4


def _tiny_eval_config():
  config = helpers.demo_config()
  config.eval.num_train = 40
  config.eval.num_test = 20
  config.eval.clip_frames = 4
  return config


@pytest.mark.slow
def test_eval_mode_writes_results_table_and_report(tmp_path):
  config = _tiny_eval_config()
  graphdef, params = vit.init_encoder(config_lib.model_config(config), seed=5)
  checkpointing.save_export(tmp_path / "export", params, config.to_json_best_effort())
  result = helpers.run_main(
    "--config=configs/demo.py", f"--workdir={tmp_path}", "--mode=eval",
    "--config.eval.num_train=40", "--config.eval.num_test=20", "--config.eval.clip_frames=4",
    "--config.eval.probes=('linear','order')", "--config.eval.baselines=('pixels_ordered',)")
  assert result.returncode == 0, result.stderr
  with open(tmp_path / "eval" / "results.json") as f:
    results = json.load(f)
  assert [e["name"] for e in results["encoders"]] == [
    "export export", "raw pixels, 8x8 grey, frames in order"]
  assert "first_action/linear" in results["tasks"] and "events/order" in results["tasks"]
  assert os.path.getsize(tmp_path / "eval" / "report.html") > 10_000
  assert "| export export |" in result.stdout


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_0_writes_the_report_and_all_meet_after(process, tmp_path, monkeypatch):
  """In a job of several processes each evaluates; process 0 alone writes eval/, then every
  process meets the others at the `eval done` barrier."""
  config = _tiny_eval_config()
  config.eval.num_train, config.eval.num_test = 16, 8
  config.eval.probes, config.eval.baselines = ("knn",), ()
  graphdef, params = vit.init_encoder(config_lib.model_config(config), seed=5)
  checkpointing.save_export(tmp_path / "export", params, config.to_json_best_effort())
  barriers = []
  monkeypatch.setattr(run.jax, "process_index", lambda: process)
  monkeypatch.setattr(run.collectives, "barrier", barriers.append)
  out = run.run_eval(helpers.typed(config), str(tmp_path), log=lambda line: None)
  assert out["values"] and barriers[-1] == "eval done"
  assert (tmp_path / "eval").exists() == (process == 0)


def test_eval_mode_without_an_export_fails_with_one_line(tmp_path):
  result = helpers.run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--mode=eval")
  assert result.returncode == 2
  assert result.stderr.strip().startswith("Input error: no export in")
  assert "Traceback" not in result.stderr


def test_unknown_probe_is_refused_naming_it():
  config = _tiny_eval_config()
  config.eval.probes = ("linear", "linaer")
  with pytest.raises(config_lib.ConfigError, match="linaer"):
    helpers.typed(config)


def test_every_probe_name_has_its_evaluator():
  """`eval.probes` is checked against `stage_config.PROBES`; `EVALUATORS` resolves each."""
  assert tuple(run.EVALUATORS) == stage_config.PROBES


@pytest.mark.slow
def test_training_logs_probe_metrics_every_eval_steps(tmp_path):
  config = train_fixtures.tiny_config()
  config.eval.demo = True
  config.eval.every = 3
  config.eval.num_train = 30
  config.eval.num_test = 10
  config.eval.clip_frames = 2
  config.eval.train_probes = ("linear", "order")
  train_fixtures.write_clusters(str(tmp_path))
  run_cfg = helpers.typed(config)
  train.run_train(run_cfg, str(tmp_path), run.training_evaluator(run_cfg))
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  evals = [r for r in records if "eval/first_action/linear" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert 0 <= evals[-1]["eval/digit_class/linear"] <= 1
  assert evals[-1]["eval/events/order"] >= 0
  # --mode=eval's "checkpoint" encoder is the run's newest state: the same features as the live
  # parameters it was saved from.
  result = train.run_train(run_cfg, str(tmp_path))  # resumes at the end: returns the state
  from_checkpoint = run.resolve_extractor(run_cfg, str(tmp_path), "checkpoint")
  spec = encoder_lib.EncoderSpec.from_sections(run_cfg.model, run_cfg.data, run_cfg.mesh)
  live = features.live(spec, result.state.params["encoder"], result.step)
  frames = np.random.default_rng(0).integers(0, 256, (2, 2, 32, 32, 3), dtype=np.uint8)
  assert from_checkpoint.kind == "checkpoint" and "step 6" in from_checkpoint.name
  np.testing.assert_allclose(from_checkpoint(frames)["embedding"], live(frames)["embedding"],
                             atol=1e-6)


def test_image_folder_classification_goes_through_the_same_probes(tmp_path):
  """`eval.datasets`: class folders of real PNGs (demo digits 0 and 1) as a labelled set."""
  from PIL import Image
  from univit_jax.data import demo
  for split, digits_split in (("train", "train"), ("test", "test")):
    source = demo.DemoSource("items", digits_split, num_examples=120, image_size=32)
    for i in range(len(source)):
      record = source[i]
      if record["label"] in (0, 1):
        folder = tmp_path / split / f"digit_{record['label']}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(record["frames"][0]).save(folder / f"{i}.png")
  config = _tiny_eval_config()
  config.eval.demo = False
  config.eval.datasets = {"zero_one": dict(
    train=dict(type="image_folder", path=str(tmp_path / "train")),
    test=dict(type="image_folder", path=str(tmp_path / "test")), num_classes=2, frames=1)}
  ctx = run.make_context(helpers.typed(config).eval, config.data.image_size)
  assert [t.name for t in ctx.tasks] == ["zero_one"]
  results = run.evaluate(ctx, features.pixels("pixels_mean", 8), ("linear", "knn"), log=print)
  assert set(results) == {"zero_one/linear", "zero_one/knn"}
  assert results["zero_one/linear"].value > 0.6  # zeros and ones differ in shape


def test_cluster_quality_refuses_clusters_of_other_data(tmp_path):
  """Cluster NMI pairs each cluster row with the record its key names: clusters made for another
  version of a source that numbers its records (the demo's keys are indices) are refused, not
  scored."""
  config = train_fixtures.tiny_config()
  train_fixtures.write_clusters(str(tmp_path))
  scores = clusters.cluster_quality(helpers.typed(config).data, str(tmp_path))
  assert scores and all(0 <= r.value <= 1 for r in scores.values())
  config.data.sources.events.num_examples += 1
  with pytest.raises(train.LabelError, match="data.sources.events.records was 16, now 17"):
    clusters.cluster_quality(helpers.typed(config).data, str(tmp_path))
