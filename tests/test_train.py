"""Training tests: labels on batches, the sharded state, and real runs in subprocesses.

The runs (`tests/train_worker.py`) use one CPU device, low XLA optimisation and a persistent
compilation cache shared by the whole module, so only the first run compiles.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grain
import helpers
import jax
import numpy as np
import pytest
import train_fixtures
from jax.sharding import PartitionSpec as P

from univit_jax import checkpointing, config_lib, optim, sharding
from univit_jax.data import pipeline
from univit_jax.train import labels as labels_lib
from univit_jax.train import logs, loop
from univit_jax.train import state as state_lib

WORKER = os.path.join(helpers.ROOT, "tests", "train_worker.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.xla_flags(1))
TIMEOUT = 300


def _start(cache: str, phases: list[dict]) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, WORKER, cache, json.dumps(phases)], cwd=helpers.ROOT,
                          env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> list[dict]:
  out, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-4000:]}"
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _params(workdir: str, phase: int) -> dict[str, np.ndarray]:
  with np.load(os.path.join(workdir, f"params_{phase}.npz")) as f:
    return dict(f)


def _data_state(workdir: str, phase: int) -> dict:
  with open(os.path.join(workdir, f"data_{phase}.json")) as f:
    return json.load(f)


def _wait_until(condition, proc: subprocess.Popen, what: str) -> None:
  deadline = time.monotonic() + TIMEOUT
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"worker exited ({proc.returncode}) before {what}:\n"
                           f"{proc.stderr.read()[-4000:]}")
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


def _logged_steps(workdir: str) -> list[int]:
  return [r["step"] for r in logs.read_metrics(workdir)]


@pytest.fixture(scope="module")
def cache() -> str:
  return os.environ["JAX_COMPILATION_CACHE_DIR"]  # the run's shared cache (conftest.py)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
  """One worker process, several phases in their own workdirs:
  train: 0 steps (initial params), 12 steps, then a rerun with other cluster-label versions;
  nan: NaN at step 3 of 6, then a resume to step 4 (a schedule change, allowed by
  `train.allow_schedule_change`); reference: 6 steps. Every phase runs `tiny_config`'s own
  optimiser and step, so the worker compiles one program per bucket, which the other tests of
  the tiny config find in the run's compilation cache."""
  dirs = {name: str(tmp_path_factory.mktemp(name)) for name in ("train", "nan", "reference")}
  for workdir in dirs.values():
    train_fixtures.write_clusters(workdir)
  phases = [
    dict(workdir=dirs["train"], total_steps=0),
    dict(workdir=dirs["train"], total_steps=12),
    dict(workdir=dirs["train"], total_steps=14, clusters_version="v2"),
    dict(workdir=dirs["nan"], total_steps=6, nan_step=3),
    dict(workdir=dirs["nan"], total_steps=4, train=dict(allow_schedule_change=True)),
    dict(workdir=dirs["reference"], total_steps=6),
  ]
  return dirs, _finish(_start(cache, phases))


def test_label_attacher_looks_up_rows_by_id_and_sub():
  bank = lambda name, ids, labels: labels_lib.BankLabels(
    name=name, centroids=np.zeros((9, 4), np.float32),
    keys=np.array([i * labels_lib._SUB_SPAN + s + 1 for i, s in ids], np.int64),
    labels=np.array(labels, np.int32), version="x")
  banks = dict(
    object=bank("object", [(1, -1), (1, 0), (2, -1)], [[5, 6], [7, 8], [3, 4]]),
    event_1=bank("event_1", [(0, 0)], [[1, 2]]),
    event_2=bank("event_2", [(0, 0), (0, 1)], [[3, 1], [4, 2]]))
  batch = dict(id=np.array([0, 1, 9]), frames=np.zeros((3, 2, 8, 8, 3)),
               boxes=np.zeros((3, 2, 4)), box_mask=np.array([[1, 1], [1, 1], [1, 0]], bool))
  out = labels_lib.LabelAttacher(banks, "whole")(batch)
  np.testing.assert_array_equal(out["labels_global"], [[1, 2], [5, 6], [-1, -1]])
  np.testing.assert_array_equal(out["global_bank"], [1, 0, -1])
  np.testing.assert_array_equal(out["labels_segments_2"][0], [[3, 1], [4, 2]])
  np.testing.assert_array_equal(out["segments_valid_2"], [[1, 1], [0, 0], [0, 0]])
  np.testing.assert_array_equal(out["labels_regions"][1], [[7, 8], [-1, -1]])
  np.testing.assert_array_equal(out["regions_valid"], [[0, 0], [1, 0], [0, 0]])
  shapes = labels_lib.label_shapes(tuple(banks), 2, 2, 3, 2, "whole")
  assert {k: v[0] for k, v in shapes.items()} == {
    k: out[k].shape for k in shapes}


def test_image_labels_are_the_set_of_its_objects_clusters():
  """`image_labels="objects"`: an image's targets are its regions' distinct top-1 clusters (one
  slot per box), and an image without valid regions keeps its whole-image row."""
  bank = labels_lib.BankLabels(
    name="object", centroids=np.zeros((9, 4), np.float32),
    keys=np.array([i * labels_lib._SUB_SPAN + s + 1 for i, s in
                   [(1, -1), (1, 0), (1, 1), (1, 2), (2, -1), (2, 0)]], np.int64),
    labels=np.array([[5, 6], [7, 8], [3, 1], [7, 2], [3, 4], [0, 1]], np.int32), version="x")
  batch = dict(id=np.array([1, 2]), frames=np.zeros((2, 1, 8, 8, 3)),
               boxes=np.zeros((2, 3, 4)), box_mask=np.array([[1, 1, 1], [0, 0, 0]], bool))
  out = labels_lib.LabelAttacher(dict(object=bank))(batch)
  np.testing.assert_array_equal(out["labels_global"], [[3, 7, -1], [3, 4, -1]])
  np.testing.assert_array_equal(out["global_bank"], [0, 0])
  shapes = labels_lib.label_shapes(("object",), 2, 1, 2, 3)
  assert shapes["labels_global"][0] == out["labels_global"].shape


def test_missing_cluster_outputs_name_the_bank(tmp_path):
  with pytest.raises(labels_lib.LabelError, match="bank 'event_4'.*clusters/event_4"):
    labels_lib.load_banks(str(tmp_path), ("event_4",), train_fixtures.examples(), 0.05)


@pytest.mark.slow
def test_state_is_born_sharded_with_banks_from_centroids():
  config = train_fixtures.tiny_config()
  config.mesh.shape = (2, 2, 2)
  config.optim.bank_lr_scale = 10.0
  run = helpers.typed(config)
  cfg = run.model
  centroids = {name: np.random.default_rng(0).normal(size=(8, cfg.width)).astype(np.float32)
               for name in ("object", "event_1")}
  tx = optim.make_optimizer(run.optim, 10)
  mesh = sharding.make_mesh(run.mesh)
  _, abstract = state_lib.abstract_model(cfg, {n: 8 for n in centroids})
  shardings = state_lib.state_shardings(abstract, tx, mesh, run.mesh.rules)
  state = state_lib.create_state(cfg, {n: 8 for n in centroids}, centroids, tx, shardings, 0)
  centres = state.params["heads"]["banks"]["object"]["centres"][...]
  np.testing.assert_array_equal(np.asarray(centres), centroids["object"])
  assert centres.sharding.spec == P(("fsdp", "model"), None)
  moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == centres.shape]
  assert moments and all(m.sharding.spec == centres.sharding.spec for m in moments)
  # Adam's first step moves every parameter by about lr; banks by lr * bank_lr_scale.
  grads = jax.tree.map(np.ones_like, state.params)
  updates, _ = tx.update(grads, state.opt_state, state.params)
  bank_step = np.abs(np.asarray(updates["heads"]["banks"]["object"]["centres"][...])).max()
  bias_step = np.abs(np.asarray(updates["encoder"]["norm_post"]["bias"][...])).max()
  np.testing.assert_allclose(bank_step / bias_step, 10.0, rtol=1e-3)


@pytest.mark.slow
def test_a_fresh_state_starts_from_an_exported_encoder(tmp_path):
  """`train.init_encoder` (the pipeline's warm start): the new state's encoder equals the
  export, on this run's shardings, with fresh banks; an export of another shape is refused."""
  config = train_fixtures.tiny_config()
  config.mesh.shape = (2, 2, 2)
  run = helpers.typed(config)
  cfg = run.model
  tx = optim.make_optimizer(run.optim, 10)
  mesh = sharding.make_mesh(run.mesh)
  sizes = dict(object=8)
  _, abstract_params = state_lib.abstract_model(cfg, sizes)
  shardings = state_lib.state_shardings(abstract_params, tx, mesh, run.mesh.rules)
  abstract = state_lib.abstract_state(cfg, sizes, tx, shardings)
  donor = state_lib.create_state(cfg, sizes, {}, tx, shardings, seed=7)
  path = str(tmp_path / "export")
  checkpointing.save_export(path, donor.params["encoder"], config.to_json_best_effort())
  start = state_lib.load_encoder_params(path, cfg, abstract)
  state = state_lib.create_state(cfg, sizes, {}, tx, shardings, 0, start)
  fresh = state_lib.create_state(cfg, sizes, {}, tx, shardings, 0)
  for got, want, spec in zip(jax.tree.leaves(state.params["encoder"]),
                             jax.tree.leaves(donor.params["encoder"]),
                             jax.tree.leaves(shardings.params["encoder"])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == spec
  np.testing.assert_array_equal(
    np.asarray(state.params["heads"]["banks"]["object"]["centres"][...]),
    np.asarray(fresh.params["heads"]["banks"]["object"]["centres"][...]))
  wider = train_fixtures.tiny_config()
  wider.model.width = 2 * cfg.width
  with pytest.raises(config_lib.ConfigError, match="train.init_encoder.*differs"):
    state_lib.load_encoder_params(path, config_lib.model_config(wider), abstract)


@pytest.mark.slow
def test_training_lowers_discrimination_loss_and_reaches_every_parameter(runs):
  dirs, reports = runs
  assert reports[1]["step"] == 12 and reports[1]["error"] is None
  with open(os.path.join(dirs["train"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, 13))
  first = np.mean([r["event_1/loss"] for r in records[:2]])
  last = np.mean([r["event_1/loss"] for r in records[-2:]])
  assert last < 0.9 * first, (first, last)
  for key in ("object/loss", "object_region/loss", "event_2/loss", "contrastive/loss",
              "grad_norm", "param_norm", "update_norm", "embedding_cosine", "samples_per_s",
              "tokens_per_s", "step_time_s", "data_wait_s", "to_device_s", "learning_rate"):
    assert key in records[0] or key in records[1], key
  before, after = _params(dirs["train"], 0), _params(dirs["train"], 1)
  assert before.keys() == after.keys() and len(before) > 20
  # A leaf whose gradient was zero at every step stays as it was, or, under weight decay (the
  # encoder's matrices), becomes its start times (1 - lr wd)^12 (AdamW's update is 0 then).
  optim_cfg = train_fixtures.tiny_config().optim
  decayed = (1 - optim_cfg.lr * optim_cfg.weight_decay) ** 12
  unchanged = [k for k in before if np.array_equal(before[k], after[k])
               or np.allclose(after[k], before[k] * decayed, rtol=1e-6, atol=0)]
  assert not unchanged, f"no gradient reached {unchanged}"
  assert os.path.getsize(os.path.join(dirs["train"], "training.png")) > 1000
  assert os.listdir(os.path.join(dirs["train"], "tensorboard"))


def test_step_window_reports_input_waits_per_step_and_starts_afresh():
  window = loop.StepWindow(tokens_per_frame=4)
  window.add_step(8, 2, data_wait=0.5, to_device=0.25)
  window.add_step(8, 2, data_wait=0.1, to_device=0.05)
  record = window.take()
  assert record["data_wait_s"] == pytest.approx(0.3)
  assert record["to_device_s"] == pytest.approx(0.15)
  assert record["tokens_per_s"] == pytest.approx(8 * record["samples_per_s"])
  assert record["step_time_s"] > 0
  window.add_step(4, 1, data_wait=0.0, to_device=0.0)
  assert window.take()["data_wait_s"] == 0.0


@pytest.mark.slow
def test_checkpoint_of_other_cluster_labels_is_refused(runs):
  reports = runs[1]
  assert reports[2]["error_type"] == "CheckpointMismatchError"
  assert "cluster-label versions" in reports[2]["error"]
  assert "'v1'" in reports[2]["error"] and "'v2'" in reports[2]["error"]


def test_labels_made_for_another_version_of_a_numbered_source_are_refused(tmp_path):
  """Issue 13: the demo numbers its records, so its keys are indices, and once the source changed
  (here 16 events clips became 17) an index may name another record: its labels are refused,
  not attached by key (sources that name their records: tests/test_label_keys.py)."""
  train_fixtures.write_clusters(str(tmp_path))
  config = train_fixtures.tiny_config()
  config.data.sources.events.num_examples = train_fixtures.NUM_EVENTS + 1
  with pytest.raises(labels_lib.LabelError,
                     match=r"bank 'event_1': the labels in \S+ were made for other data.*"
                           r"data\.sources\.events\.records was 16, now 17.*other records"):
    labels_lib.load_banks(str(tmp_path), ("event_1",), train_fixtures.examples(config), 0.05)


@pytest.mark.slow
def test_a_finished_run_rerun_with_other_data_or_optimiser_is_refused_before_any_step(
    runs, tmp_path):
  """Issue 13, end to end on a finished run's workdir (real checkpoints and train_run.json):
  another data source is refused by its labels, and, once labels for the new sources exist, by
  the checkpoints' data record; so are another token budget, optimiser structure (not an Orbax
  traceback) and total_steps (without `train.allow_schedule_change`). Nothing is trained."""
  workdir = str(tmp_path / "train")
  shutil.copytree(runs[0]["train"], workdir)
  train_fixtures.write_clusters(workdir)  # the labels its checkpoints were trained on (v1)
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = f.read()

  def rerun(error, match, total_steps=12, **changes):
    config = train_fixtures.tiny_config(compilation_cache_dir="none")
    config.total_steps = total_steps
    for section, fields in changes.items():
      for field, value in fields.items():
        config[section][field] = value
    with pytest.raises(error, match=match):
      loop.run_train(helpers.typed(config), workdir)
    return config

  shifted = dict(sources=dict(events=dict(
    type="demo", kind="events", split="train", num_examples=train_fixtures.NUM_EVENTS + 1,
    num_frames=4), objects=dict(type="demo", kind="objects", split="train",
                                num_examples=train_fixtures.NUM_OBJECTS, frames=(1,))))
  config = rerun(labels_lib.LabelError, r"data\.sources\.events\.records was 16, now 17",
                 data=shifted)
  # Labels for the new sources, lacking the new record (1 of 17 clips): allowed by the fraction.
  train_fixtures.write_clusters(workdir, sources=train_fixtures.examples(config).sources)
  rerun(loop.CheckpointMismatchError,
        r"other data .*data\.sources\.events\.records was 16, now 17", data=shifted,
        train=dict(max_unlabelled_fraction=0.1))
  train_fixtures.write_clusters(workdir)
  rerun(loop.CheckpointMismatchError, "data.tokens_per_batch was 256, now 512",
        data=dict(tokens_per_batch=512))
  rerun(loop.CheckpointMismatchError, "optimiser state parts", optim=dict(grad_clip_norm=0.0))
  rerun(loop.CheckpointMismatchError, "another schedule: total_steps was 12, now 14",
        total_steps=14)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read() == metrics


@pytest.mark.slow
def test_nan_stops_the_run_naming_step_and_term_and_keeps_last_checkpoint(runs):
  dirs, reports = runs
  assert reports[3]["error_type"] == "NonFiniteError"
  # The batch of step 3 has NaN frames (`train_fixtures.nan_at_step`): every term is named.
  assert "['contrastive', 'event_1', " in reports[3]["error"]
  assert "] at step 3" in reports[3]["error"]
  assert "last good checkpoint is step 2" in reports[3]["error"]
  assert reports[3]["checkpoints"] == ["2"]
  # The checkpoint restores: the rerun (NaN off, total_steps 4 under allow_schedule_change)
  # resumes from step 2 and saves step 4; the run file now records the new schedule.
  assert reports[4]["step"] == 4 and reports[4]["error"] is None
  assert reports[4]["checkpoints"] == ["2", "4"]
  with open(os.path.join(dirs["nan"], loop.RUN_FILE)) as f:
    assert json.load(f)["schedule"]["total_steps"] == 4


@pytest.mark.slow
def test_sigkill_then_sigterm_then_resume_matches_uninterrupted_run(runs, cache, tmp_path):
  dirs, reports = runs
  assert reports[5]["step"] == 6
  workdir = str(tmp_path)
  train_fixtures.write_clusters(workdir)
  checkpoints = os.path.join(workdir, "checkpoints")

  proc = _start(cache, [dict(workdir=workdir, total_steps=6, step_sleep=1.0)])
  _wait_until(lambda: os.path.isdir(os.path.join(checkpoints, "2")), proc, "checkpoint 2")
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.isdir(os.path.join(checkpoints, "6"))

  # The killed run's metrics.jsonl stays, ending in a line torn mid-append. The resume drops that
  # line and the records past its checkpoint, then logs on (the torn line gone says it has).
  torn = '{"step": 99, "lo'
  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(metrics, "a") as f:
    f.write(torn)
  proc = _start(cache, [dict(workdir=workdir, total_steps=6, step_sleep=1.0)])

  def resumed_to_step_3():
    with open(metrics) as f:
      return torn not in f.read() and 3 in _logged_steps(workdir)

  _wait_until(resumed_to_step_3, proc, "step 3 of the resumed run")
  proc.send_signal(signal.SIGTERM)
  (report,) = _finish(proc)
  assert report["preempted"] and report["step"] in (3, 4)
  assert os.path.isdir(os.path.join(checkpoints, str(report["step"])))

  (report,) = _finish(_start(cache, [dict(workdir=workdir, total_steps=6)]))
  assert report["step"] == 6 and not report["preempted"]
  assert _logged_steps(workdir) == [1, 2, 3, 4, 5, 6]  # one history: no torn line, no repeats
  reference, resumed = _params(dirs["reference"], 5), _params(workdir, 0)
  assert reference.keys() == resumed.keys()
  for key in reference:
    np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
  assert _data_state(workdir, 0) == _data_state(dirs["reference"], 5)


@pytest.mark.slow
def test_an_object_bank_of_whole_image_rows_only_trains(cache, tmp_path):
  """A teacher without regions (`features:<folder>`) clusters whole images only: the region term
  finds no labelled row, adds 0 and is left out of the log; the whole-image and event terms
  train as usual. Images without region labels take their whole-image cluster as their
  co-occurrence set (`losses.object_sets`), so the contrastive term still pairs them."""
  workdir = str(tmp_path)
  train_fixtures.write_clusters(workdir, regions=False)
  (report,) = _finish(_start(cache, [dict(workdir=workdir, total_steps=4)]))
  assert report["step"] == 4 and report["error"] is None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 4 and all(np.isfinite(r["loss"]) for r in records)
  image_steps = [r for r in records if r.get("object/valid_rows", 0) > 0]
  assert image_steps and not any(k.startswith("object_region/") for r in records for k in r)
  assert all(r["contrastive/no_partner_fraction"] < 1 for r in image_steps)


def test_train_mode_without_cluster_outputs_fails_with_one_clear_line(tmp_path):
  result = helpers.run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--mode=train")
  assert result.returncode == 2, result.stderr[-2000:]
  assert re.fullmatch(r"Cluster label error: bank '\w+': cannot read cluster outputs .*\n",
                      result.stderr)
  assert "run --mode=cluster" in result.stderr


def test_banks_start_from_centroids_only_from_an_encoder_teacher_of_the_same_width():
  bank = lambda width, teacher: labels_lib.BankLabels(
    name="b", centroids=np.ones((4, width), np.float32), keys=np.zeros(0, np.int64),
    labels=np.zeros((0, 2), np.int32), version="x", teacher=teacher)
  banks = dict(object=bank(32, "round_1/export"), event_1=bank(64, "round_1/export"),
               event_2=bank(64, "pixels-pca64-ab12"), event_4=bank(64, "siglip:/c.npz:B/16:ab12"),
               event_8=bank(64, "features:/feats:ab12"))
  assert set(loop.initial_centroids(banks, 64, "auto")) == {"event_1"}
  assert loop.initial_centroids(banks, 64, "random") == {}
  with pytest.raises(config_lib.ConfigError, match="train.bank_init"):
    loop.initial_centroids(banks, 64, "kmeans")


@pytest.mark.slow
def test_a_bank_the_class_shards_do_not_divide_is_logged_as_replicated(tmp_path, caplog):
  """On a (1, 8, 1) mesh the object bank's 10 classes are not a multiple of the 8 class shards:
  training warns, naming the bank, K, the shards and the nearest split class counts."""
  config = train_fixtures.tiny_config()
  config.mesh.shape = (1, 8, 1)
  config.total_steps = 0
  train_fixtures.write_clusters(str(tmp_path))
  loop.run_train(helpers.typed(config), str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert [w for w in warnings if "class shards" in w] == [
    "bank 'object': 10 classes are not a multiple of the mesh's 8 class shards, so every "
    "device holds the whole bank, its gradient and Adam moments; 8 or 16 classes would be "
    f"split 8 ways (clusters in {tmp_path}; cluster.num_clusters.object)"]


def test_run_train_closes_its_data_iterator_before_returning(tmp_path, monkeypatch):
  """The iterator (with workers: their processes and shared memory) is released by the time
  training ends (its last act is the barrier), not left to garbage collection."""
  opened, closed = [], []

  class Recorded(grain.IterDataset):
    def __iter__(self):
      opened.append(iter(self._parent))
      return opened[-1]

  def is_closed() -> bool:
    try:
      next(opened[0])
    except ValueError:  # grain: advancing a closed iterator
      return True
    return False

  build = pipeline.build_train_dataset
  monkeypatch.setattr(pipeline, "build_train_dataset",
                      lambda *args, **kwargs: Recorded(build(*args, **kwargs)))
  monkeypatch.setattr(loop.collectives, "barrier", lambda name: closed.append(is_closed()))
  config = train_fixtures.tiny_config()
  config.total_steps = 0
  train_fixtures.write_clusters(str(tmp_path))
  loop.run_train(helpers.typed(config), str(tmp_path))
  assert closed == [True]


@pytest.mark.parametrize("field,value", [("log_every", 0), ("checkpoint_every", -1),
                                         ("keep_checkpoints", 0), ("bank_init", "kmeans")])
def test_bad_train_settings_are_refused_naming_the_field(tmp_path, field, value):
  config = train_fixtures.tiny_config(**{field: value})
  with pytest.raises(config_lib.ConfigError, match=f"train.{field}="):
    loop.run_train(helpers.typed(config), str(tmp_path))
