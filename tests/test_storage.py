"""The storage layer (`paths`, `atomic`) on local folders and on a fake object store
(`fakes.ObjectStore`: `fakegcs://`, and `gs://` with TensorStore served by `fakes.GcsServer`):
what each stage writes round-trips there, Orbax included, and a whole two-round pipeline runs in
a `gs://` workdir without making a local folder named after the scheme."""

import glob
import importlib.util
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import cluster_worker
import fakes
from helpers import ROOT, TINY_DEMO_PIPELINE, run_main
from univit_jax import atomic, checkpointing, config_lib, paths
from univit_jax.clustering import labels, store
from univit_jax.data import convert, pipeline, sources
from univit_jax.run_config import data_config
from univit_jax.train import logs


@pytest.fixture(scope="module")
def object_store(tmp_path_factory) -> fakes.GcsServer:
  """The fake object store of this test process (one root: epath and fsspec keep the filesystem
  they first made); each test uses its own bucket."""
  server = fakes.GcsServer(str(tmp_path_factory.mktemp("object_store")))
  fakes.install(server.root, server.url)
  yield server
  server.shutdown()


@pytest.fixture
def bucket(request, object_store) -> str:
  del object_store
  return f"fakegcs://{request.node.name.replace('[', '-').rstrip(']')}"


def _scheme_folders(*roots: str) -> list[str]:
  """Local folders named like a URI scheme (`gs:`, `fakegcs:`) under `roots`, at any depth."""
  return [p for root in roots for scheme in fakes.FAKE_SCHEMES
          for p in glob.glob(os.path.join(root, "**", f"{scheme}:"), recursive=True)]


def test_paths_tell_local_from_remote_and_resolve_any_fsspec_scheme(object_store, tmp_path):
  del object_store
  assert paths.scheme("gs://b/x") == "gs" and paths.scheme("fakegcs://b/x") == "fakegcs"
  assert paths.is_local(str(tmp_path)) and paths.is_local("relative/a://b")
  assert paths.absolute("fakegcs://b/x") == "fakegcs://b/x"
  assert paths.absolute("x") == os.path.join(os.getcwd(), "x")
  remote = paths.path("fakegcs://b/run") / "features" / "object"
  assert str(remote) == "fakegcs://b/run/features/object" and remote.name == "object"
  assert str(remote.parent.parent) == "fakegcs://b/run"
  paths.check(str(tmp_path), "--workdir")
  paths.check("fakegcs://b/run", "--workdir")
  with pytest.raises(paths.StorageError, match=r"--workdir=nosuch://b/run: no filesystem for "
                                               r"nosuch:// here"):
    paths.check("nosuch://b/run", "--workdir")


def test_the_fake_store_has_no_rename_no_append_and_no_empty_folders(bucket):
  folder = paths.path(f"{bucket}/a")
  (folder / "x").write_text("1")
  with pytest.raises(NotImplementedError, match="no rename"):
    folder.rename(paths.path(f"{bucket}/b"))
  with pytest.raises(NotImplementedError, match="no append"):
    (folder / "x").open("a")
  (folder / "x").unlink()
  assert not folder.exists()


@pytest.mark.parametrize("where", ["local", "remote"])
def test_atomic_writes_commit_whole_files_or_nothing(where, tmp_path, bucket):
  base = str(tmp_path) if where == "local" else bucket
  path = f"{base}/dir/x.json"
  atomic.write_json(path, dict(a=1))
  with pytest.raises(RuntimeError):
    with atomic.open_atomic(path) as f:
      f.write("{half")
      raise RuntimeError
  assert json.loads(paths.path(path).read_text()) == dict(a=1)  # the old file, untouched
  assert [p.name for p in paths.path(f"{base}/dir").iterdir()] == ["x.json"]  # no temporary
  with pytest.raises(RuntimeError):
    with atomic.local_file(f"{base}/dir/shard") as tmp:  # a file name for a library's writer
      with open(tmp, "wb") as f:
        f.write(b"half")
      raise RuntimeError
  assert [p.name for p in paths.path(f"{base}/dir").iterdir()] == ["x.json"]
  with atomic.local_file(f"{base}/dir/shard") as tmp:
    with open(tmp, "wb") as f:
      f.write(b"whole")
  assert paths.path(f"{base}/dir/shard").read_bytes() == b"whole"
  atomic.save_npy(f"{base}/dir/a.npy", np.arange(6).reshape(2, 3))
  array = paths.load_npy(f"{base}/dir/a.npy", mmap=True)
  assert isinstance(array, np.memmap) == (where == "local")
  np.testing.assert_array_equal(array, np.arange(6).reshape(2, 3))
  atomic.save_npz(f"{base}/dir/s.npz", a=np.ones(2), b=np.zeros(1))
  assert sorted(paths.load_npz(f"{base}/dir/s.npz")) == ["a", "b"]
  atomic.append_text(f"{base}/dir/m.jsonl", "1\n")
  atomic.append_text(f"{base}/dir/m.jsonl", "2\n")
  assert paths.path(f"{base}/dir/m.jsonl").read_text() == "1\n2\n"


@pytest.mark.parametrize("where", ["local", "remote"])
def test_a_folder_is_complete_only_with_its_marker(where, tmp_path, bucket):
  dst = f"{tmp_path if where == 'local' else bucket}/out"

  def build(content: str, commit: bool) -> None:
    atomic.clear_staging(dst, "DONE")
    atomic.write_bytes(os.path.join(atomic.staging_dir(dst), "data"), content.encode())
    if commit:
      atomic.commit_dir(dst, "DONE", b"ok")

  build("old", commit=True)
  assert paths.path(f"{dst}/data").read_text() == "old"
  build("new", commit=False)  # killed before the commit
  done = paths.path(f"{dst}/DONE").exists()
  if where == "local":  # the old folder is still there whole, the new one beside it
    assert done and paths.path(f"{dst}/data").read_text() == "old"
    assert os.path.exists(os.path.join(tmp_path, ".out.partial"))
  else:  # no rename: written in place, and not taken as complete
    assert not done
  build("new", commit=True)
  assert paths.path(f"{dst}/DONE").read_bytes() == b"ok"
  assert paths.path(f"{dst}/data").read_text() == "new"
  if where == "local":
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_array_record_conversion_into_a_bucket(bucket, tmp_path):
  (tmp_path / "images").mkdir()
  for i in range(3):
    Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
  spec = config_lib.SourceSpec.from_dict(
    "s", dict(type="image_folder", path=str(tmp_path / "images")))
  convert.convert(spec, f"{bucket}/ds", 2)
  convert.convert(spec, str(tmp_path / "local"), 2)
  names = sorted(os.listdir(tmp_path / "local"))
  assert sorted(p.name for p in paths.path(f"{bucket}/ds").iterdir()) == names
  for name in names:
    assert paths.path(f"{bucket}/ds/{name}").read_bytes() == (
      tmp_path / "local" / name).read_bytes(), name
  assert not _scheme_folders(str(tmp_path), os.getcwd())


def _host_reads(path: str) -> list[dict]:
  """What each of 2 simulated hosts reads from the converted image dataset at `path` through an
  `array_record` source spec: `eval`, (frames, label) by example id of one ordered pass, and
  `train`, the first batch of its training stream."""
  spec = config_lib.SourceSpec.from_dict("s", dict(type="array_record", path=path, kind="image"))
  cfg = data_config.DataConfig(
    sources=(spec,), frames=(1,), bucket_weights=(1,), tokens_per_batch=4 * 16, image_size=16,
    patch_size=4, transform=data_config.TransformConfig(16))
  reads = []
  for index in range(2):
    hosts = dict(process_index=index, process_count=2)
    batches = pipeline.build_eval_dataset(cfg, 1, 4, **hosts)
    reads.append(dict(
      eval={int(i): (frames, label) for b in batches
            for i, frames, label, ok in zip(b["id"], b["frames"], b["label"], b["example_mask"])
            if ok},
      train=next(iter(pipeline.build_train_dataset(cfg, **hosts)))))
  return reads


def test_array_record_shards_are_read_from_gs_by_two_hosts(object_store, request, tmp_path):
  # array_record reads `gs://` shards itself (google-cloud-cpp, ranged reads served by
  # `fakes.GcsServer`): no copy of a shard is made.
  del object_store
  rng = np.random.default_rng(0)
  for i in range(10):
    (tmp_path / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).save(
      tmp_path / "images" / f"c{i % 2}" / f"{i}.png")
  spec = config_lib.SourceSpec.from_dict(
    "s", dict(type="image_folder", path=str(tmp_path / "images")))
  remote, local = f"gs://{request.node.name}/ds", str(tmp_path / "local")
  convert.convert(spec, remote, 3)
  convert.convert(spec, local, 3)
  paths.path(f"{remote}/manifest.json").unlink()
  convert.convert(spec, remote, 3)  # a rerun keeps the shards, reading their keys from gs://
  reads = _host_reads(remote)
  shares = [set(read["eval"]) for read in reads]
  assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(10))
  jax.tree.map(np.testing.assert_array_equal, reads, _host_reads(local))
  assert not _scheme_folders(str(tmp_path), os.getcwd())
  with pytest.raises(sources.SourceError, match=r"local paths and gs:// only, not fakegcs://"):
    sources.build_source(config_lib.SourceSpec.from_dict(
      "s", dict(type="array_record", path=f"fakegcs://{request.node.name}/ds", kind="image")))


def test_feature_store_reads_remote_chunks_one_at_a_time(bucket):
  writer = store.BankWriter(bucket, "b", 4, teacher="t0")
  rng = np.random.default_rng(0)
  chunks = [rng.standard_normal((n, 4)).astype(np.float32) for n in (3, 2)]
  for index, x in enumerate(chunks):
    assert writer.write_chunk(index, x, np.arange(len(x)) + 10 * index)
  writer.finish()
  reader = store.BankReader(bucket, "b")
  assert (reader.num_rows, reader.dim) == (5, 4)
  features, _ = reader.chunk(0)
  assert not isinstance(features, np.memmap)
  np.testing.assert_array_equal(np.concatenate([f for f, _ in reader.chunks()]),
                                np.concatenate(chunks))
  assert list(reader._cache) == [1]  # pylint: disable=protected-access  # only the last chunk
  np.testing.assert_array_equal(reader.gather(np.array([4, 0])), np.concatenate(chunks)[[4, 0]])
  reader.check()


def test_cluster_labels_round_trip_with_the_scann_checkpoint(bucket):
  cluster_worker.write(bucket, sleep=0)
  cluster_worker.cluster(bucket, "scann", sleep=0, iterations=3, center=False)
  out = labels.load_clusters(bucket, cluster_worker.BANK)
  assert out["labels"].shape == (sum(cluster_worker.CHUNK_ROWS), 3)
  assert out["stats"]["num_rows"] == len(out["ids"])
  folder = paths.path(labels.clusters_dir(bucket, cluster_worker.BANK))
  assert sorted(p.name for p in folder.iterdir()) == [
    "centroids.npy", "ids.npy", "keys.npy", "labels.npy", "sizes.png",
    "stats.json"]  # checkpoint/ removed
  np.testing.assert_array_equal(out["keys"], cluster_worker.record_keys(
    sum(cluster_worker.CHUNK_ROWS) // 2)[out["ids"][:, 0]])


def test_metrics_and_tensorboard_round_trip(bucket):
  logger = logs.MetricsLogger(bucket, resume_step=0)
  for step in (1, 2, 3):
    logger.write(step, dict(loss=1.0 / step))
  logger.close()
  logs.MetricsLogger(bucket, resume_step=2).close()  # a resume trims the records past it
  assert [r["step"] for r in logs.read_metrics(bucket)] == [1, 2]
  events = list(paths.path(f"{bucket}/tensorboard").iterdir())
  assert events and all(e.stat().length > 0 for e in events)
  assert logs.plot_losses(bucket) == f"{bucket}/{logs.PLOT_FILE}"
  assert paths.path(f"{bucket}/{logs.PLOT_FILE}").read_bytes().startswith(b"\x89PNG")
  assert not _scheme_folders(os.getcwd())


def test_orbax_checkpoints_and_exports_on_gs(object_store, request):
  del object_store
  base = f"gs://{request.node.name}"
  config = json.dumps(dict(model=dict(width=8)))
  checkpointing.save_export(f"{base}/export", dict(w=jnp.zeros(3)), config, {"a.txt": b"a"})
  checkpointing.save_export(f"{base}/export", dict(w=jnp.ones(3)), config)  # replaced in place
  params, saved = checkpointing.load_export(f"{base}/export")
  np.testing.assert_array_equal(params["w"], np.ones(3))
  assert saved == checkpointing.read_export_config(f"{base}/export") == json.loads(config)
  assert sorted(p.name for p in paths.path(f"{base}/export").iterdir()) == [
    "COMPLETE", "config.json", "params"]
  abstract = jax.eval_shape(lambda: dict(a=jnp.zeros(3)))
  with checkpointing.Checkpointer(f"{base}/checkpoints", max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, dict(a=jnp.full(3, float(step))))
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [2, 3]  # step 1 deleted
    np.testing.assert_array_equal(ckpt.restore(3, abstract)["a"], np.full(3, 3.0))
  with pytest.raises(paths.StorageError, match="TensorStore, which reaches local folders and "
                                               "gs:// only, not fakegcs://"):
    checkpointing.check_location("fakegcs://b/run", "--workdir")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_workdir_without_a_filesystem_is_refused_at_start_up_naming_the_package():
  result = run_main("--config=configs/demo.py", "--workdir=gs://bucket/run", *TINY_DEMO_PIPELINE)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip() == (
    "Storage error: --workdir=gs://bucket/run: no filesystem for gs:// here (Please install "
    "gcsfs to access Google Storage)")
  assert not _scheme_folders(ROOT)


def test_a_workdir_orbax_cannot_write_is_refused_at_start_up(object_store):
  result = run_main("--config=configs/demo.py", "--workdir=fakegcs://bucket/run",
                    *TINY_DEMO_PIPELINE, module="fake_store_main",
                    env=fakes.subprocess_env(object_store.root, object_store.url))
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip() == (
    "Storage error: --workdir=fakegcs://bucket/run: Orbax checkpoints and exports are written "
    "through TensorStore, which reaches local folders and gs:// only, not fakegcs://")


@pytest.mark.slow
def test_two_round_pipeline_in_a_gs_workdir(object_store, tmp_path):
  """The README's pipeline, two rounds, in an object store: this is the suite's one two-round
  pipeline run (local files take the same code path, `paths`, tested above)."""
  workdir = "gs://pipeline/run"
  env = fakes.subprocess_env(object_store.root, object_store.url)
  result = run_main("--config=configs/demo.py", f"--workdir={workdir}", *TINY_DEMO_PIPELINE,
                    module="fake_store_main", env=env, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "UniViT pipeline: 2 round(s)" in result.stdout
  summary = json.loads(paths.path(f"{workdir}/pipeline.json").read_text())
  assert summary["export"] == f"{workdir}/round_2/export"
  # Round 2 extracted with round 1's export, read back from the store (width 64, not 16).
  r1, r2 = (store.BankReader(f"{workdir}/round_{r}", "object") for r in (1, 2))
  assert r1.dim == 16 and r2.dim == 64
  assert r2.teacher.startswith(f"univit:{workdir}/round_1/export:")
  for r in (1, 2):
    folder = f"{workdir}/round_{r}"
    assert checkpointing.is_export(f"{folder}/export")
    assert labels.load_clusters(folder, "event_2")["labels"].shape == (32, 2)
    assert [m["step"] for m in logs.read_metrics(folder)] == [1, 2]
    assert paths.path(f"{folder}/training.png").exists()
    assert paths.path(f"{folder}/checkpoints/2/commit_success.txt").exists()  # Orbax on gs://
  assert not _scheme_folders(ROOT, str(tmp_path), os.getcwd())
  assert not [n for n in os.listdir(tempfile.gettempdir()) if n.rstrip(":") in fakes.FAKE_SCHEMES]
  # Both rounds compiled into the run's shared cache ($JAX_COMPILATION_CACHE_DIR, conftest.py),
  # not the workdir's (tests/test_rounds.py checks where a round's cache goes).
  assert not any(paths.path(f"{folder}/jax_cache").exists()
                 for folder in (workdir, f"{workdir}/round_1", f"{workdir}/round_2"))
  # Rerunning finds every round complete and does no work.
  again = run_main("--config=configs/demo.py", f"--workdir={workdir}", *TINY_DEMO_PIPELINE,
                   module="fake_store_main", env=env)
  assert again.returncode == 0 and "round 2: complete" in again.stdout, again.stderr[-3000:]
  # Rerunning with another data source is refused, finished rounds included, naming the change
  # (the ids would shift, and the old labels land on other records).
  shifted = [a.replace("events.num_examples=16", "events.num_examples=17")
             for a in TINY_DEMO_PIPELINE]
  refused = run_main("--config=configs/demo.py", f"--workdir={workdir}", *shifted,
                     module="fake_store_main", env=env)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert f"Feature store error: the features in {workdir}/round_1/features/" in refused.stderr
  assert "data.sources.events.records was 16, now 17" in refused.stderr
  assert len(refused.stderr.strip().splitlines()) == 1
