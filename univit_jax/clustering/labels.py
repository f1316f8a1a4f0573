"""The `cluster` stage: spherical k-means per feature bank, written as centroids and top-k labels.

For each bank `workdir/features/<bank>/` (see `store`) it writes `workdir/clusters/<bank>/`:

  centroids.npy  float32 [K, D] unit centroids (the loss's class centres are initialised from them)
  mean.npy       float32 [D] with `center`: the mean subtracted from the (unit) rows before
                 clustering; centroids and cosines are in that centred space
  labels.npy     int32 [N, top_k] nearest centroids per row, best first, in the store's row order
  ids.npy        int64 [N, 2] the store's (sample id, sub-index) of each row of labels.npy
  keys.npy       bytes [N] the record key of each row (`store.BankReader.keys`: the sample id's
                 `pipeline.example_keys` entry when the features were extracted); training
                 attaches labels by key and sub-index, so labels follow their records when
                 records are added, removed or reordered
  sizes.png      histogram of cluster sizes (rows whose nearest centroid it is)
  stats.json     sizes summary, objective, empty clusters and rows searched per iteration,
                 seconds, the ClusterSpec (`config`), `inputs`: what the features were made
                 from (the bank's meta.json `inputs`: data sources, extract settings; training
                 refuses labels made for another version of a source that numbers its
                 records: `train.labels.check_sources`), and `version`: a hash of the
                 bank's metadata (so of those inputs) and the spec, which training records

stats.json is written last and marks the bank done: a reader that finds it with the expected
version finds the other files complete (all files are written atomically, and stats.json is
deleted before a bank is reclustered). A killed stage resumes from the per-iteration k-means
checkpoint in `clusters/<bank>/checkpoint/` and writes the same files as an uninterrupted run;
banks already done with the same version are skipped.
"""

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from univit_jax import atomic, collectives, paths, run_config
from univit_jax.clustering import store
from univit_jax.clustering.kmeans import lloyd
from univit_jax.clustering.kmeans.lloyd import ClusterSpec
from univit_jax.run_config import stage_config

# Bumped when the stage's outputs change meaning; part of every version id. 2: keys.npy.
STAGE_FORMAT = 2


def clusters_dir(workdir: str, bank: str) -> str:
  return os.path.join(workdir, "clusters", bank)


def cluster_specs(cfg: stage_config.ClusterConfig) -> dict[str, ClusterSpec]:
  """One spec per bank of the `cluster` section: K from `num_clusters`, and every other field of
  the section shared by all banks.

  Raises:
    lloyd.KMeansError: naming the bank and the field, for a field `ClusterSpec` does not have or
      an impossible value.
  """
  specs = {bank: _as_spec(bank, dict(cfg.fields, num_clusters=k)) for bank, k in cfg.num_clusters}
  for bank, spec in specs.items():
    spec.validate(bank)
  return specs


def extracted_specs(run: run_config.RunConfig, workdir: str) -> dict[str, ClusterSpec]:
  """`cluster_specs` of the banks extraction writes for the data (`run.parts`: no event banks
  without clips, no object bank without images).

  Raises:
    lloyd.KMeansError: as `cluster_specs`.
    store.FeatureStoreError: if one of them has no features in `workdir`.
  """
  specs = cluster_specs(run.cluster)
  banks = [b for b in run.parts.banks if b in specs]
  missing = [b for b in banks
             if not paths.path(os.path.join(store.bank_dir(workdir, b), "meta.json")).exists()]
  if missing:
    raise store.FeatureStoreError(
      f"no features of bank(s) {missing} under {os.path.join(workdir, 'features')}; "
      "run --mode=extract first")
  return {b: specs[b] for b in banks}


def _as_spec(bank: str, spec: ClusterSpec | Mapping[str, Any]) -> ClusterSpec:
  if isinstance(spec, ClusterSpec):
    return spec
  try:
    return ClusterSpec(**spec)
  except TypeError as e:
    raise lloyd.KMeansError(f"bank {bank!r}: bad cluster spec {dict(spec)}: {e}") from e


def version_id(reader: store.BankReader, spec: ClusterSpec) -> str:
  """Hash of what determines the outputs: the bank's metadata (teacher, dim, chunks, and the
  `inputs` the features were made from: data sources, extract settings) and the spec."""
  payload = json.dumps(dict(format=STAGE_FORMAT, bank=reader.meta, spec=dataclasses.asdict(spec)),
                       sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def read_stats(workdir: str, bank: str) -> dict | None:
  """The bank's stats.json, or None if the bank has not been clustered (to completion)."""
  path = paths.path(os.path.join(clusters_dir(workdir, bank), "stats.json"))
  return json.loads(path.read_text()) if path.exists() else None


def _sizes_png(sizes: np.ndarray, bank: str) -> bytes:
  """The cluster-size histogram as PNG bytes (Agg canvas: no display, no pyplot global state)."""
  # pylint: disable=import-outside-toplevel  # matplotlib is slow to import; only this needs it
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(6, 4))
  FigureCanvasAgg(figure)
  ax = figure.add_subplot()
  ax.hist(sizes, bins=min(50, max(1, int(sizes.max()) + 1)), log=True)
  ax.set_xlabel("rows per cluster (nearest centroid)")
  ax.set_ylabel("clusters")
  ax.set_title(f"{bank}: K={len(sizes)}, N={int(sizes.sum())}")
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=100)
  return buffer.getvalue()


def _size_summary(sizes: np.ndarray) -> dict[str, float]:
  q = np.percentile(sizes, [1, 50, 99])
  return dict(min=int(sizes.min()), max=int(sizes.max()), mean=float(sizes.mean()),
              p1=float(q[0]), median=float(q[1]), p99=float(q[2]), empty=int((sizes == 0).sum()))


def cluster_bank(workdir: str, bank: str, spec: ClusterSpec,
                 log: Callable[[str], None] = print) -> dict:
  """Clusters one bank (resuming or skipping as possible) and returns its stats.

  Raises:
    store.FeatureStoreError: missing or incomplete bank, mismatched dims, NaN/Inf or zero-norm
      rows (naming bank and file).
    lloyd.KMeansError: K larger than the number of rows, or an invalid spec (naming the bank).
  """
  spec.validate(bank)
  reader = store.BankReader(workdir, bank)
  version = version_id(reader, spec)
  out = clusters_dir(workdir, bank)
  stats = read_stats(workdir, bank)
  if stats is not None and stats.get("version") == version:
    log(f"{bank}: already clustered (version {version}), skipping")
    return stats
  if spec.num_clusters > reader.num_rows:
    raise lloyd.KMeansError(
      f"bank {bank!r}: num_clusters={spec.num_clusters} is larger than the {reader.num_rows} "
      f"rows listed in {reader.meta_path}")
  reader.check()
  keys = reader.keys()  # before k-means, so that a store without keys fails at once
  checkpoint = os.path.join(out, "checkpoint")
  if jax.process_index() == 0:
    if stats is not None:
      paths.path(os.path.join(out, "stats.json")).unlink()
    paths.path(checkpoint).mkdir(parents=True, exist_ok=True)
  collectives.barrier(f"cluster_start_{bank}")

  result = lloyd.spherical_kmeans(reader, spec, name=bank, checkpoint_dir=checkpoint,
                                  version=version, log=log)
  part = os.path.join(checkpoint, f"labels_p{jax.process_index():03d}.npy")
  atomic.save_npy(part, result.labels)
  collectives.barrier(f"cluster_labels_{bank}")
  if jax.process_index() == 0:
    labels = np.concatenate([
      paths.load_npy(os.path.join(checkpoint, f"labels_p{p:03d}.npy"))
      for p in range(jax.process_count())])
    sizes = np.bincount(labels[:, 0], minlength=spec.num_clusters)
    stats = dict(
      bank=bank, version=version, teacher=reader.teacher, inputs=reader.meta.get("inputs"),
      num_rows=reader.num_rows,
      dim=reader.dim, config=dataclasses.asdict(spec), processes=jax.process_count(),
      objective=result.objective, empty_per_iteration=result.empty,
      searched_per_iteration=result.searched, seconds_per_pass=result.seconds,
      seconds=float(sum(result.seconds)),
      sizes=_size_summary(sizes))
    atomic.write_bytes(os.path.join(out, "sizes.png"), _sizes_png(sizes, bank))
    write_clusters(workdir, bank, centroids=result.centroids, labels=labels, ids=reader.ids(),
                   keys=keys, stats=stats, mean=result.mean)
    paths.path(checkpoint).rmtree()
  collectives.barrier(f"cluster_done_{bank}")
  stats = read_stats(workdir, bank)
  log(f"{bank}: done, objective {stats['objective'][-1]:.4f}, {stats['seconds']:.1f}s")
  return stats


def write_clusters(workdir: str, bank: str, *, centroids: np.ndarray, labels: np.ndarray,
                   ids: np.ndarray, keys: np.ndarray, stats: Mapping[str, Any],
                   mean: np.ndarray | None = None) -> None:
  """Writes a bank's cluster outputs (the files `load_clusters` reads), stats.json last.

  The one writer of the stage's format: k-means results here, and label sets made elsewhere
  (ground-truth labels in benchmarks/oracle_labels.py, random ones in benchmarks and tests).

  Args:
    centroids: [K, D] unit rows.
    labels: [N, k] cluster ids per row, best first.
    ids: [N, 2] (record index, segment or region) per row.
    keys: [N] the records' example keys.
    stats: stats.json's content; `bank` and `version` identify what wrote it.
    mean: [D] the mean subtracted before clustering (`cluster.center`), or None.
  """
  out = clusters_dir(workdir, bank)
  atomic.save_npy(os.path.join(out, "centroids.npy"), np.asarray(centroids, np.float32))
  if mean is not None:
    atomic.save_npy(os.path.join(out, "mean.npy"), mean)
  else:
    paths.path(os.path.join(out, "mean.npy")).unlink(missing_ok=True)
  atomic.save_npy(os.path.join(out, "ids.npy"), np.asarray(ids, np.int64))
  atomic.save_npy(os.path.join(out, "keys.npy"), np.asarray(keys))
  atomic.save_npy(os.path.join(out, "labels.npy"), np.asarray(labels, np.int32))
  atomic.write_json(os.path.join(out, "stats.json"), dict(stats))


def random_centroids(rng: np.random.Generator, num_clusters: int, dim: int) -> np.ndarray:
  """[num_clusters, dim] random unit rows: centroids for label sets that k-means did not make."""
  centroids = rng.normal(size=(num_clusters, dim)).astype(np.float32)
  return centroids / np.linalg.norm(centroids, axis=1, keepdims=True)


def run_cluster_stage(workdir: str, banks: Mapping[str, ClusterSpec | Mapping[str, Any]],
                      log: Callable[[str], None] = print) -> dict[str, dict]:
  """`--mode=cluster`: clusters every bank of `workdir` named in `banks`.

  Args:
    workdir: the run's directory (reads features/<bank>/, writes clusters/<bank>/).
    banks: bank name -> ClusterSpec, or a mapping of ClusterSpec fields; see `cluster_specs`.
    log: progress lines.

  Returns:
    bank -> stats (the content of its stats.json).
  """
  specs = {bank: _as_spec(bank, spec) for bank, spec in banks.items()}
  for bank, spec in specs.items():
    spec.validate(bank)
  return {bank: cluster_bank(workdir, bank, spec, log) for bank, spec in specs.items()}


def load_clusters(workdir: str, bank: str) -> dict[str, Any]:
  """The stage's outputs for training: centroids [K, D], labels [N, k], ids [N, 2], keys [N],
  stats.

  Raises:
    FileNotFoundError: if the bank has not been clustered to completion.
  """
  stats = read_stats(workdir, bank)
  out = clusters_dir(workdir, bank)
  if stats is None:
    raise FileNotFoundError(
      f"bank {bank!r}: {os.path.join(out, 'stats.json')} is missing; run --mode=cluster")
  return dict(stats=stats, **{name: paths.load_npy(os.path.join(out, f"{name}.npy"))
                              for name in ("centroids", "labels", "ids", "keys")})
