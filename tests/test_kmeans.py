"""Spherical k-means and the cluster stage: recovery, monotone objective, top-k labels, resume
after SIGKILL, two processes, and named errors for bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

import cluster_worker
import helpers
from univit_jax import config_lib, preflight
from univit_jax.clustering import labels, store
from univit_jax.clustering.kmeans import assigners, bounds, candidates, lloyd, sources
from univit_jax.run_config import stage_config

WORKER = os.path.join(os.path.dirname(__file__), "cluster_worker.py")
# Small-K settings that still take the ScaNN tree path (tree over 12 centroids, 3 leaves).
TREE = dict(backend="scann", brute_force_max_k=4, num_leaves=3, leaves_to_search=2)
BACKENDS = {"exact": dict(backend="exact"), "matmul_bf16": dict(screen_dtype="bfloat16"),
            "scann_brute": dict(backend="scann"), "scann_tree": TREE,
            "scann_tree_labels": dict(TREE, exact_labels=False)}


def _quiet(_):
  pass


@pytest.fixture(scope="module")
def mixture():
  return cluster_worker.planted(3000, 12, 24, noise=0.5, seed=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovers_planted_clusters_with_monotone_objective(mixture, backend):
  x, truth = mixture
  spec = lloyd.ClusterSpec(num_clusters=12, iterations=8, top_k=4, seed=0, block_rows=1000,
                           **BACKENDS[backend])
  result = lloyd.spherical_kmeans(sources.ArraySource(x), spec, log=_quiet)
  assert normalized_mutual_info_score(truth, result.labels[:, 0]) >= 0.95
  assert np.all(np.diff(result.objective) >= -1e-6), result.objective
  np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-5)
  assert len(result.objective) == spec.iterations + 1 and len(result.empty) == spec.iterations
  # Top-k labels: sorted by cosine and equal to exact search with the final centroids.
  sims = x @ result.centroids.T
  assert np.all(np.diff(result.similarities, axis=1) <= 0)
  np.testing.assert_allclose(result.similarities, np.take_along_axis(sims, result.labels, 1),
                             atol=1e-5)
  exact = np.argsort(-sims, axis=1, kind="stable")[:, :4]
  if backend == "scann_tree_labels":  # 2 of 3 leaves: approximate, but top-1 nearly exact
    assert np.mean(result.labels[:, 0] == exact[:, 0]) >= 0.97
  else:
    np.testing.assert_array_equal(result.labels, exact)


def test_backends_agree_and_distortion_never_increases(mixture):
  # The tree searching all of its leaves is exact: the index, its upserts and the re-scoring
  # must then reproduce the exact backend.
  x, _ = mixture
  x = x[:600]
  full_tree = dict(TREE, leaves_to_search=TREE["num_leaves"], exact_labels=False)
  results = [lloyd.spherical_kmeans(
    sources.ArraySource(x), lloyd.ClusterSpec(num_clusters=12, iterations=5, init="random",
                                             top_k=3, **options), log=_quiet)
    for options in (dict(backend="exact"), dict(backend="scann"), full_tree)]
  for other in results[1:]:
    np.testing.assert_allclose(other.centroids, results[0].centroids, atol=1e-5)
    np.testing.assert_array_equal(other.labels, results[0].labels)
  distortion = 2.0 - 2.0 * np.array(results[0].objective)  # mean squared chord distance
  assert np.all(np.diff(distortion) <= 1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_assigner_is_exact_top_k_with_ties_to_the_lowest_id(dtype):
  # Small integer entries: every dot product is exact in float32 and in bfloat16 whatever the
  # summation order, so ties are exact ties. 300 centroids: three groups of 128, the last padded.
  rng = np.random.default_rng(0)
  centroids = rng.integers(-2, 3, (300, 16)).astype(np.float32)
  centroids[[7, 130, 299]] = centroids[41]  # duplicates across groups and in the padded one
  x = rng.integers(-2, 3, (700, 16)).astype(np.float32)
  x[:50] = centroids[41]
  sims = x @ centroids.T
  assigner = assigners.MatmulAssigner(centroids, dtype)
  for k in (1, 2, 5):
    ids, got = assigner.search(x, k)
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(got, np.take_along_axis(sims, expected, 1))
  assert np.all(assigner.search(x[:50], 4)[0] == [7, 41, 130, 299])


def test_bf16_screen_finds_the_nearest_centroid_with_float32_cosines(mixture):
  x, _ = mixture
  centroids = sources.normalize(np.random.default_rng(1).standard_normal((1000, x.shape[1])))
  ids, sims = assigners.MatmulAssigner(centroids, "bfloat16").search(x, 2)
  exact = x @ centroids.T
  assert np.mean(ids[:, 0] == np.argmax(exact, axis=1)) >= 0.99
  np.testing.assert_allclose(sims, np.take_along_axis(exact, ids, 1), atol=1e-6)
  assert np.all(sims[:, 0] >= sims[:, 1])


@pytest.mark.parametrize("check_jumper", [False, True])
def test_widened_bounds_stay_below_the_true_angles(check_jumper):
  rng = np.random.default_rng(0)
  x = sources.normalize(rng.standard_normal((400, 8)))
  centroids = sources.normalize(rng.standard_normal((30, 8)))
  rows = bounds.RowState.fresh(len(x))
  cos = x @ centroids.T
  rows.assign[:] = np.argmax(cos, axis=1)
  rows.lower[:] = np.arccos(np.sort(cos, axis=1)[:, -2])
  checked = np.array([3] if check_jumper else [], np.int64)
  for scale in (0.01, 0.1, 0.5):
    moved_centroids = sources.normalize(centroids + scale * rng.standard_normal(centroids.shape))
    moved_centroids[3] = -centroids[3]  # one centroid jumps across the sphere
    rows.widen(bounds.angles_moved(centroids, moved_centroids), checked)
    centroids = moved_centroids
    angles = np.arccos(np.clip(x @ centroids.T, -1, 1))
    angles[np.arange(len(x)), rows.assign] = np.inf
    angles[:, checked] = np.inf  # the pass scores these itself
    assert np.all(rows.lower <= angles.min(axis=1) + 1e-6)
    if check_jumper and scale == 0.01:  # the others moved little: the bounds stay useful
      assert np.mean(rows.lower > 0) > 0.5


def _plain_lloyd(x, init, iterations):
  """Spherical Lloyd searching every row every pass; empty clusters (in index order) move onto
  the rows with the lowest cosine to their centroid (ties by row index)."""
  centroids = sources.normalize(init)
  for _ in range(iterations):
    cos = x @ centroids.T
    assign = np.argmax(cos, axis=1)
    sums = np.zeros(centroids.shape, np.float64)
    np.add.at(sums, assign, x.astype(np.float64))
    counts = np.bincount(assign, minlength=len(centroids))
    empties = np.flatnonzero(counts == 0)
    centroids = centroids.copy()
    centroids[counts > 0] = sources.normalize(sums[counts > 0])
    best = cos[np.arange(len(x)), assign]
    centroids[empties] = x[np.lexsort((np.arange(len(x)), best))[:len(empties)]]
  return centroids


@pytest.mark.parametrize("screen_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("duplicate_init", [False, True])
def test_bounded_lloyd_equals_plain_lloyd_and_skips_settled_rows(mixture, screen_dtype,
                                                                 duplicate_init):
  x, _ = mixture
  rows = np.arange(0, len(x), len(x) // 12)[:12]
  if duplicate_init:  # centroid 5 repeats centroid 4, so it starts empty and is re-seeded
    rows[5] = rows[4]
  spec = lloyd.ClusterSpec(num_clusters=12, iterations=8, top_k=1, block_rows=1000,
                           screen_dtype=screen_dtype, candidates=0)
  result = lloyd.spherical_kmeans(sources.ArraySource(x), spec, init_centroids=x[rows],
                                  log=_quiet)
  centroids = _plain_lloyd(x, x[rows], spec.iterations)
  np.testing.assert_allclose(result.centroids, centroids, atol=1e-5)
  np.testing.assert_array_equal(result.labels[:, 0], np.argmax(x @ centroids.T, axis=1))
  assert result.searched[0] == len(x) and result.searched[-1] < len(x) // 5, result.searched
  assert (result.empty[0] > 0) == duplicate_init


def test_centering_clusters_rows_that_share_a_large_component(mixture):
  x, truth = mixture
  y = sources.normalize(x + 4.0 * sources.normalize(np.ones((1, x.shape[1]))))
  options = dict(num_clusters=12, iterations=8, top_k=1, seed=0)
  plain = lloyd.spherical_kmeans(sources.ArraySource(y), lloyd.ClusterSpec(**options),
                                 log=_quiet)
  centred = lloyd.spherical_kmeans(sources.ArraySource(y),
                                   lloyd.ClusterSpec(**options, center=True), log=_quiet)
  assert plain.mean is None and plain.objective[-1] > 0.97  # the shared part dominates
  np.testing.assert_allclose(centred.mean, y.mean(axis=0), atol=1e-6)
  assert centred.objective[-1] < 0.9
  assert normalized_mutual_info_score(truth, centred.labels[:, 0]) >= 0.95
  z = sources.normalize(y - centred.mean)  # labels are exact in the centred space
  np.testing.assert_array_equal(centred.labels[:, 0], np.argmax(z @ centred.centroids.T, axis=1))


def test_stage_writes_the_mean_of_a_centred_bank(tmp_path):
  x, _ = cluster_worker.planted(300, 4, 8, noise=0.3, seed=0)
  writer = store.BankWriter(str(tmp_path), "object", 8, teacher="t")
  writer.write_chunk(0, x[:150], np.arange(150))
  writer.write_chunk(1, x[150:], np.arange(150, 300))
  writer.finish()
  store.write_keys(str(tmp_path), cluster_worker.record_keys(300))
  mean_path = os.path.join(labels.clusters_dir(str(tmp_path), "object"), "mean.npy")
  spec = dict(num_clusters=4, iterations=3, top_k=1, center=True)
  stats = labels.run_cluster_stage(str(tmp_path), {"object": spec}, log=_quiet)["object"]
  assert stats["config"]["center"]
  np.testing.assert_allclose(np.load(mean_path), x.mean(axis=0), atol=1e-6)
  labels.run_cluster_stage(str(tmp_path), {"object": dict(spec, center=False)}, log=_quiet)
  assert not os.path.exists(mean_path)


def test_cluster_version_folds_in_what_the_features_were_made_from(tmp_path):
  """Features of other data (their meta.json `inputs`) get another cluster version, and
  stats.json carries the inputs, which training checks against its data sources."""
  x, _ = cluster_worker.planted(40, 2, 4, noise=0.1, seed=0)
  spec = lloyd.ClusterSpec(num_clusters=2, iterations=1, top_k=1)
  for name, records in (("a", 40), ("b", 41)):
    inputs = dict(data=dict(sources=dict(digits=dict(records=records))))
    writer = store.BankWriter(str(tmp_path / name), "object", 4, teacher="t", inputs=inputs)
    writer.write_chunk(0, x, np.arange(40))
    writer.finish()
    store.write_keys(str(tmp_path / name), cluster_worker.record_keys(40))
  versions = {name: labels.version_id(store.BankReader(str(tmp_path / name), "object"), spec)
              for name in ("a", "b")}
  assert versions["a"] != versions["b"]
  stats = labels.cluster_bank(str(tmp_path / "b"), "object", spec, log=_quiet)
  assert stats["version"] == versions["b"]
  assert stats["inputs"] == dict(data=dict(sources=dict(digits=dict(records=41))))


def test_screen_dtype_resolution_and_validation():
  assert assigners.resolve_screen_dtype("float32") == np.float32
  assert assigners.resolve_screen_dtype("auto") in (np.float32, jnp.bfloat16)
  assert lloyd.ClusterSpec(num_clusters=2, backend="exact",
                           screen_dtype="bfloat16").matmul_dtype() == np.float32
  with pytest.raises(lloyd.KMeansError, match=r"bank 'b': cluster spec screen_dtype='float16'"):
    lloyd.ClusterSpec(num_clusters=2, top_k=1, screen_dtype="float16").validate("b")


def test_empty_clusters_are_reseeded_on_worst_rows():
  # Three tight groups. Two initial centroids sit on the same row of group A, so the second gets
  # no rows (ties go to the lower id); group C has no centroid near it. The empty cluster must
  # move onto the worst-served rows (group C) instead of staying a duplicate.
  rng = np.random.default_rng(0)
  x = np.concatenate([np.eye(4)[[0]] + 0.01 * rng.standard_normal((50, 4)),
                      np.eye(4)[[1]] + 0.01 * rng.standard_normal((50, 4)),
                      np.eye(4)[[2]] + 0.01 * rng.standard_normal((3, 4))]).astype(np.float32)
  spec = lloyd.ClusterSpec(num_clusters=4, iterations=3, top_k=1, backend="exact")
  result = lloyd.spherical_kmeans(sources.ArraySource(x), spec, log=_quiet,
                                  init_centroids=sources.normalize(x[[0, 0, 60, 61]]))
  assert result.empty[0] == 1
  assert not set(result.labels[100:, 0]) & set(result.labels[:100, 0])
  assert len(set(result.labels[100:, 0])) == 1
  assert np.all(np.diff(result.objective) >= -1e-6)


def test_kmeans_pp_init_picks_distinct_rows(mixture):
  x, truth = mixture
  spec = lloyd.ClusterSpec(num_clusters=12, init="kmeans++", seed=1)
  centroids = lloyd.initial_centroids(sources.ArraySource(x), spec)
  nearest = np.argmax(x @ centroids.T, axis=0)
  # k-means++ spreads the seeds: most planted clusters receive one.
  assert len(np.unique(truth[nearest])) >= 10


def _overlapping(num_rows=2000, dim=16, seed=0):
  """Heavily overlapping clusters with power-law sizes (benchmarks/kmeans.py "overlap", small):
  rows at mean cosine ~0.55 to their true centre."""
  rng = np.random.default_rng(seed)
  scale = np.arange(1, dim + 1) ** -0.5
  centres = sources.normalize(rng.standard_normal((64, dim)) * scale)
  sizes = 1.0 / np.arange(1, len(centres) + 1)
  truth = rng.choice(len(centres), num_rows, p=sizes / sizes.sum())
  noise = rng.standard_normal((num_rows, dim)) * (1.5 * scale / np.linalg.norm(scale))
  return sources.normalize(centres[truth] + noise)


def test_full_searches_run_on_the_first_two_passes_and_powers_of_4():
  assert [i for i in range(100) if candidates.full_search(i)] == [0, 1, 4, 16, 64]


def test_rescore_is_top_k_of_each_rows_own_list_with_repeats_once_and_ties_to_lowest_id():
  # Small integer entries: exact float32 dot products, so ties are exact ties.
  rng = np.random.default_rng(0)
  centroids = rng.integers(-2, 3, (40, 6)).astype(np.float32)
  centroids[[9, 31]] = centroids[17]
  x = rng.integers(-2, 3, (200, 6)).astype(np.float32)
  lists = rng.integers(0, 40, (200, 7))
  lists[:20, 3:] = [17, 31, 9, 17]  # repeats and equal centroids
  ids, sims = candidates.rescore(x, centroids, lists, 3)
  for row, (got, got_sims) in enumerate(zip(ids, sims)):
    own = np.unique(lists[row])
    expected = own[np.lexsort((own, -(centroids[own] @ x[row])))][:3]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_sims, centroids[expected] @ x[row])


def test_bounds_stay_below_the_true_angles_through_list_passes():
  # A full search with lists, then passes that move the centroids and score only the lists (one
  # with a re-seeded centroid): every bound must stay below the row's angle to every centroid
  # but its own, as with full searches.
  rng = np.random.default_rng(0)
  x = _overlapping(num_rows=600)
  centroids = sources.normalize(rng.standard_normal((40, x.shape[1])))
  rows = bounds.RowState.fresh(len(x), 5)
  source, checked = sources.ArraySource(x), np.zeros(0, np.int64)
  for step, full in enumerate((True, False, False, True, False)):
    assigner = assigners.MatmulAssigner(centroids) if full else None
    bounds.assign_pass(source, (0, len(x)), 256, assigner, centroids, rows, checked, 8,
                       list_length=5, from_candidates=not full)
    angles = np.arccos(np.clip(x @ centroids.T, -1, 1))
    angles[np.arange(len(x)), rows.assign] = np.inf
    assert np.all(rows.lower <= angles.min(axis=1) + 1e-5), step
    moved = sources.normalize(centroids + 0.05 * rng.standard_normal(centroids.shape))
    checked = np.array([7]) if step == 1 else np.zeros(0, np.int64)
    moved[checked] = x[rng.integers(len(x))]  # re-seeded: jumps
    rows.widen(bounds.angles_moved(centroids, moved), checked)
    centroids = moved
  assert np.mean(rows.lower > 0) > 0.1  # the list passes still let some rows skip


def test_candidate_lists_equal_full_search_on_separated_clusters(mixture):
  x, _ = mixture
  init = x[np.arange(0, len(x), len(x) // 12)[:12]]
  results = [lloyd.spherical_kmeans(
    sources.ArraySource(x), lloyd.ClusterSpec(num_clusters=12, iterations=9, top_k=2,
                                             block_rows=1000, screen_dtype="float32",
                                             candidates=m), init_centroids=init, log=_quiet)
    for m in (0, 3)]
  # Passes 2 and 3 may miss a far move early on (lists of 3 of 12), but the run converges alike.
  np.testing.assert_allclose(results[1].centroids, results[0].centroids, atol=1e-6)
  np.testing.assert_array_equal(results[1].labels, results[0].labels)
  np.testing.assert_allclose(results[1].objective[-3:], results[0].objective[-3:], atol=1e-7)


def test_candidate_lists_keep_the_objective_on_overlapping_clusters():
  # Bounds skip few rows here, so the passes between full searches score lists only.
  x = _overlapping()
  init = x[np.random.default_rng(1).choice(len(x), 128, replace=False)]
  logs = []
  results = {m: lloyd.spherical_kmeans(
    sources.ArraySource(x), lloyd.ClusterSpec(num_clusters=128, iterations=10, top_k=1,
                                             candidates=m), init_centroids=init,
    log=logs.append) for m in (0, 8)}
  full, lists = results[0], results[8]
  assert sum("candidate lists" in line for line in logs) == 7  # all passes but 0, 1 and 4
  assert np.mean(full.searched[1:]) > 0.6 * len(x)
  assert np.all(np.diff(lists.objective) >= -1e-6), lists.objective
  exact = [np.max(x @ r.centroids.T, axis=1).mean() for r in (full, lists)]
  assert abs(exact[1] - exact[0]) < 1e-3 * exact[0], exact
  # The final labels are a full search of the final centroids.
  np.testing.assert_array_equal(lists.labels[:, 0], np.argmax(x @ lists.centroids.T, axis=1))


def test_candidate_lists_resume_mid_run_with_identical_results(tmp_path):
  x = _overlapping()
  spec = lloyd.ClusterSpec(num_clusters=64, iterations=8, top_k=2, block_rows=700, seed=2)

  def stop_at(line):  # raised before that pass is checkpointed: resume from pass 6 of 8
    if "iteration 7/" in line:
      raise KeyboardInterrupt

  reference = lloyd.spherical_kmeans(sources.ArraySource(x), spec, log=_quiet)
  with pytest.raises(KeyboardInterrupt):
    lloyd.spherical_kmeans(sources.ArraySource(x), spec, checkpoint_dir=str(tmp_path),
                           log=stop_at)
  lines = []
  resumed = lloyd.spherical_kmeans(sources.ArraySource(x), spec, checkpoint_dir=str(tmp_path),
                                   log=lines.append)
  assert "resumed k-means at iteration 6" in lines[0]
  assert "candidate lists" in lines[1]  # pass 6 (0-based) scores the restored lists
  np.testing.assert_array_equal(resumed.centroids, reference.centroids)
  np.testing.assert_array_equal(resumed.labels, reference.labels)
  assert resumed.objective == reference.objective and resumed.searched == reference.searched


@pytest.mark.parametrize("value", [-1, True])
def test_bad_candidates_is_a_config_error_naming_the_field(value):
  config = helpers.demo_config()
  config.cluster.candidates = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"candidates={value!r}")):
    preflight.check(helpers.typed(config), "cluster")
  for other in ("8", 2.5):  # the locked config refuses these types itself
    with pytest.raises(lloyd.KMeansError, match=re.escape(f"candidates={other!r}")):
      lloyd.ClusterSpec(num_clusters=4, top_k=1, candidates=other).validate("b")
  assert lloyd.ClusterSpec(num_clusters=4, top_k=1, candidates=0).num_candidates() == 0
  assert lloyd.ClusterSpec(num_clusters=4, top_k=1).num_candidates() == 4  # at most K
  assert lloyd.ClusterSpec(num_clusters=40, top_k=1, backend="exact").num_candidates() == 0


def _write_bank(workdir):
  subprocess.run([sys.executable, WORKER, "write", str(workdir)], check=True)


def _outputs(workdir):
  out = labels.clusters_dir(str(workdir), cluster_worker.BANK)
  files = {name: np.load(os.path.join(out, f"{name}.npy"))
           for name in ("centroids", "labels", "ids")}
  with open(os.path.join(out, "stats.json")) as f:
    stats = json.load(f)
  return files, stats


def _assert_same_outputs(a, b, atol=0.0):
  (files_a, stats_a), (files_b, stats_b) = a, b
  np.testing.assert_allclose(files_a["centroids"], files_b["centroids"], atol=atol, rtol=0)
  np.testing.assert_array_equal(files_a["labels"], files_b["labels"])
  np.testing.assert_array_equal(files_a["ids"], files_b["ids"])
  for key in ("version", "empty_per_iteration", "searched_per_iteration", "sizes", "config"):
    assert stats_a[key] == stats_b[key], key
  np.testing.assert_allclose(stats_a["objective"], stats_b["objective"], atol=max(atol, 1e-12))


@pytest.mark.parametrize("backend", ["exact", "scann"])
@pytest.mark.slow
def test_stage_resumes_after_sigkill_with_identical_outputs(tmp_path, backend):
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  for workdir in (reference, killed):
    _write_bank(workdir)
  subprocess.run([sys.executable, WORKER, "cluster", str(reference), "--backend", backend],
                 check=True, capture_output=True)
  state = os.path.join(labels.clusters_dir(str(killed), cluster_worker.BANK), "checkpoint",
                       "state.npz")
  proc = subprocess.Popen([sys.executable, WORKER, "cluster", str(killed), "--backend", backend,
                           "--sleep", "0.4"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True)
  for line in proc.stdout:
    if "iteration 3/" in line:
      break
  time.sleep(0.2)  # the checkpoint of iteration 3 is written while the worker sleeps
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(state)
  with np.load(state) as f:
    assert 1 <= int(f["iteration"]) < 6
  assert labels.read_stats(str(killed), cluster_worker.BANK) is None
  out = subprocess.run([sys.executable, WORKER, "cluster", str(killed), "--backend", backend],
                       check=True, capture_output=True, text=True).stdout
  assert "resumed k-means at iteration" in out
  _assert_same_outputs(_outputs(reference), _outputs(killed))


@pytest.mark.parametrize("backend, center", [("exact", False), ("scann", False),
                                             ("exact", True)])
@pytest.mark.slow
def test_two_processes_match_one(tmp_path, backend, center):
  single, double = tmp_path / "single", tmp_path / "double"
  for workdir in (single, double):
    _write_bank(workdir)
  options = ["--backend", backend] + (["--center"] if center else [])
  subprocess.run([sys.executable, WORKER, "cluster", str(single), *options],
                 check=True, capture_output=True)
  procs = helpers.start_processes([WORKER, "cluster", str(double), *options])
  logs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs
  _assert_same_outputs(_outputs(single), _outputs(double), atol=1e-6)
  assert _outputs(double)[1]["processes"] == 2
  means = [os.path.join(labels.clusters_dir(str(w), cluster_worker.BANK), "mean.npy")
           for w in (single, double)]
  if center:
    np.testing.assert_array_equal(np.load(means[0]), np.load(means[1]))
  assert all(os.path.exists(m) == center for m in means)


def test_stage_outputs_and_stats(tmp_path):
  _write_bank(tmp_path)
  spec = lloyd.ClusterSpec(num_clusters=6, iterations=4, top_k=2, backend="exact")
  stats = labels.run_cluster_stage(str(tmp_path), {cluster_worker.BANK: spec}, log=_quiet)
  stats = stats[cluster_worker.BANK]
  loaded = labels.load_clusters(str(tmp_path), cluster_worker.BANK)
  n = sum(cluster_worker.CHUNK_ROWS)
  assert loaded["centroids"].shape == (6, cluster_worker.DIM)
  assert loaded["labels"].shape == (n, 2) and loaded["labels"].dtype == np.int32
  np.testing.assert_array_equal(
    loaded["ids"], store.BankReader(str(tmp_path), cluster_worker.BANK).ids())
  assert stats == loaded["stats"]
  assert stats["sizes"]["min"] >= 0 and sum(np.bincount(loaded["labels"][:, 0])) == n
  assert len(stats["objective"]) == 5 and len(stats["empty_per_iteration"]) == 4
  out = labels.clusters_dir(str(tmp_path), cluster_worker.BANK)
  with open(os.path.join(out, "sizes.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert not os.path.exists(os.path.join(out, "checkpoint"))
  # A finished bank with the same version is skipped.
  lines = []
  labels.run_cluster_stage(str(tmp_path), {cluster_worker.BANK: spec}, log=lines.append)
  assert lines == [f"{cluster_worker.BANK}: already clustered (version {stats['version']}), "
                   "skipping"]
  # Another spec is another version: the bank is reclustered.
  other = labels.run_cluster_stage(
    str(tmp_path), {cluster_worker.BANK: dict(num_clusters=5, iterations=2, top_k=2)},
    log=_quiet)[cluster_worker.BANK]
  assert other["version"] != stats["version"]
  assert labels.load_clusters(str(tmp_path), cluster_worker.BANK)["centroids"].shape[0] == 5


def test_specs_from_default_config():
  config = config_lib.default_config("mu/8")
  specs = labels.cluster_specs(stage_config.ClusterConfig.from_config(config))
  assert set(specs) == {"object", "event_1", "event_2", "event_4", "event_8"}
  assert specs["object"].num_clusters == 1_000_000 and specs["event_2"].top_k == 10
  assert specs["event_4"].screen_dtype == "auto" and not specs["object"].center
  config.cluster.backend = "faiss"
  with pytest.raises(lloyd.KMeansError, match=r"bank 'event_1': cluster spec backend='faiss'"):
    labels.cluster_specs(stage_config.ClusterConfig.from_config(config))


def test_k_larger_than_n_names_bank(tmp_path):
  _write_bank(tmp_path)
  with pytest.raises(lloyd.KMeansError, match=rf"bank '{cluster_worker.BANK}'.*"
                     r"num_clusters=1000 is larger than the 400 rows.*meta.json"):
    labels.run_cluster_stage(str(tmp_path), {cluster_worker.BANK: dict(num_clusters=1000)},
                             log=_quiet)
  with pytest.raises(lloyd.KMeansError, match="bank 'x': num_clusters=9 is larger"):
    lloyd.spherical_kmeans(sources.ArraySource(np.ones((4, 2))),
                           lloyd.ClusterSpec(num_clusters=9, top_k=1), name="x")


def test_missing_and_incomplete_banks_name_bank(tmp_path):
  with pytest.raises(store.FeatureStoreError, match=r"bank 'object'.*features/object/meta.json"):
    labels.run_cluster_stage(str(tmp_path), {"object": dict(num_clusters=2, top_k=1)}, log=_quiet)
  writer = store.BankWriter(str(tmp_path), "object", 4, teacher="t")
  writer.write_chunk(0, np.eye(4), np.arange(4))
  with pytest.raises(store.FeatureStoreError, match=r"bank 'object'.*not marked complete"):
    labels.run_cluster_stage(str(tmp_path), {"object": dict(num_clusters=2, top_k=1)}, log=_quiet)


@pytest.mark.parametrize("corrupt, message", [
  (np.array([[np.nan, 1, 0, 0]] * 4, np.float32), "row 0 has NaN or Inf"),
  (np.zeros((4, 4), np.float32), "row 0 has zero norm"),
  (np.ones((4, 3), np.float32), "mismatched dims"),
])
def test_corrupt_features_name_bank_and_file(tmp_path, corrupt, message):
  writer = store.BankWriter(str(tmp_path), "object", 4, teacher="t")
  writer.write_chunk(0, np.eye(4), np.arange(4))
  writer.write_chunk(1, np.eye(4), np.arange(4, 8))
  writer.finish()
  np.save(os.path.join(store.bank_dir(str(tmp_path), "object"), "chunk_00001.npy"), corrupt)
  with pytest.raises(store.FeatureStoreError,
                     match=rf"bank 'object'.*chunk_00001\.npy.*{message}"):
    labels.run_cluster_stage(str(tmp_path), {"object": dict(num_clusters=2, top_k=1)}, log=_quiet)
  assert not os.path.exists(labels.clusters_dir(str(tmp_path), "object"))
