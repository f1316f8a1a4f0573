"""Spherical k-means: ours ("auto"), our exact path, the ScaNN tree, and faiss-cpu, head to head.

Same data, same initial centroids (K random rows), same number of iterations, in one process:

  python benchmarks/kmeans.py          # N=200k, D=256, K 1k/16k/65k, 20 iterations
  python benchmarks/kmeans.py --n=20000 --k=1024 --iterations=3   # quick
  python benchmarks/kmeans.py --data=overlap --k=16384 --methods=ours,full,faiss
  python benchmarks/kmeans.py --data=teacher --dim=128 --k=16384 --methods=ours,full,faiss

Data (`--data`, `make_data`): "clustered" (tight clusters), "uniform" (no clusters), "overlap"
(heavy overlap and power-law cluster sizes, rows at mean cosine ~0.55 to their true centre, as
in real embedding banks) and "teacher" (real features: the repo's pixels teacher on the demo's
digit images).

Methods: "ours" is the stage's default spec (backend "auto": bf16-screened matmul with bounds
and candidate lists, `kmeans.candidates`), "full" the same searching all K centroids on every
pass (candidates=0: the default before the lists), "exact" the float32 fallback (same bounds, no
lists), "scann" the ScaNN tree from the second iteration on (backend "scann" with
brute_force_max_k=4096), "faiss" faiss-cpu's Kmeans. Per method it reports seconds per
iteration (mean, median, first, total), the final objective (mean cosine of each row to its
nearest final centroid, evaluated exactly for every method), and for ours, full and scann the
assignment recall of the final pass (the assigner's own top-k, not the stage's exact labels
pass) against exact search with the same centroids (top-1, and top-10 overlap). Ratios are the
other method's seconds over ours; each row records the 1-minute load average at its start.

faiss-cpu is a benchmark-only dependency (requirements-bench.txt); it runs with
OMP_WAIT_POLICY=PASSIVE unless the environment sets it: on the shared 2-core VM, OpenMP's
default spinning threads made faiss ~3x slower whenever other processes held the cores (24.5
against 7.4 s per iteration at K 16,384). Results are merged into benchmarks/results/kmeans.json
("clustered", "uniform") or kmeans_<data>.json (rows keyed by data, N, D, K); `--summarize`
reprints a file.
"""

import argparse
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss loads OpenMP (docstring)

# pylint: disable=wrong-import-position
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import machine  # benchmarks/machine.py  # pylint: disable=import-error
from univit_jax import atomic
from univit_jax.clustering.kmeans import assigners, lloyd, sources

DATA = ("clustered", "uniform", "overlap", "teacher")
# Widest pixels-teacher feature at the demo's 32 px: half its width comes from the PCA of the 8 x 8
# layout view, which has 64 components.
TEACHER_MAX_DIM = 128


def make_data(kind: str, n: int, dim: int, seed: int) -> tuple[np.ndarray, dict]:
  """Unit rows [n, D] of a data kind, and facts about them.

  "uniform": on the sphere. "clustered": 4,096 random centres, each row a centre plus isotropic
  noise of norm about 0.6 (cosine ~0.86 to its centre). "overlap": 4,096 centres with
  power-law cluster sizes (Zipf, exponent 1) drawn, like the noise, from a Gaussian with a
  power-law spectrum (variance of direction i ~ 1 / i), the noise 1.5x the centre's norm: mean
  cosine ~0.55 to the true centre, and only ~70% of rows nearer their own centre than any other.
  "teacher": the pixels teacher (`extract.pixels_teacher`, fitted on the first 256 frames) on
  `n` demo digit images ("items"); D = min(dim, 128).
  """
  rng = np.random.default_rng(seed)
  if kind == "uniform":
    return sources.normalize(rng.standard_normal((n, dim), dtype=np.float32)), {}
  if kind == "clustered":
    centres = sources.normalize(rng.standard_normal((4096, dim), dtype=np.float32))
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
    return sources.normalize(centres[rng.integers(0, len(centres), n)] + noise), {}
  if kind == "overlap":
    scale = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
    centres = sources.normalize(rng.standard_normal((4096, dim), dtype=np.float32) * scale)
    sizes = 1.0 / np.arange(1, len(centres) + 1)
    truth = rng.choice(len(centres), n, p=sizes / sizes.sum())
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (1.5 * scale / np.linalg.norm(scale))
    x = sources.normalize(centres[truth] + noise)
    cosines = np.einsum("nd,nd->n", x, centres[truth])
    return x, dict(mean_cosine_to_true_centre=float(cosines.mean()),
                   largest_cluster_fraction=float(np.bincount(truth).max() / n))
  if kind == "teacher":
    return teacher_features(n, min(dim, TEACHER_MAX_DIM), seed), dict(
      teacher="pixels on demo items, 32 px")
  raise ValueError(f"--data={kind!r}: expected some of {DATA}")


def teacher_features(n: int, dim: int, seed: int) -> np.ndarray:
  """Pixels-teacher features [n, dim] of the first n demo "items" images (train split)."""
  # pylint: disable=import-outside-toplevel  # the demo and the teacher only for this kind
  import jax.numpy as jnp
  from univit_jax.clustering import extract
  from univit_jax.data import demo
  images = demo.DemoSource("items", "train", num_examples=n, seed=seed)
  frames = np.stack([images[i]["frames"][0] for i in range(n)])
  teacher = extract.pixels_teacher(frames[:256], dim, seed)
  return sources.normalize(np.concatenate([
    np.asarray(teacher.embed(jnp.asarray(frames[lo:lo + 4096])))
    for lo in range(0, n, 4096)]))


def exact_top(x: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  return assigners.MatmulAssigner(centroids).search(x, k)


# ClusterSpec options of each of our methods.
OURS = {"ours": dict(backend="auto"), "full": dict(backend="auto", candidates=0),
        "exact": dict(backend="exact"), "scann": dict(backend="scann", brute_force_max_k=4096)}
METHODS = ("ours", "full", "exact", "scann", "faiss")


def run_ours(x, init, iterations, options, leaves, search):
  # Labels from the assigner (not the stage's default brute-force pass), so the recall measured
  # below is the tree's for "scann", plus the last assignment as a candidate.
  spec = lloyd.ClusterSpec(num_clusters=len(init), iterations=iterations, top_k=10,
                           num_leaves=leaves, leaves_to_search=search, exact_labels=False,
                           **options)
  result = lloyd.spherical_kmeans(sources.ArraySource(x), spec, init_centroids=init,
                                  log=lambda line: print("   ", line, flush=True))
  return dict(seconds_per_iteration=result.seconds[:-1], labels_seconds=result.seconds[-1],
              searched_fraction=[s / len(x) for s in result.searched],
              tree=list(spec.tree_shape()) if spec.uses_tree() else None), result


def run_faiss(x, init, iterations):
  import faiss  # pylint: disable=import-outside-toplevel
  km = faiss.Kmeans(x.shape[1], len(init), niter=iterations, spherical=True, seed=0,
                    max_points_per_centroid=1 << 30, min_points_per_centroid=1, verbose=False)
  t0 = time.perf_counter()
  km.train(x, init_centroids=init)
  total = time.perf_counter() - t0
  elapsed = [s["time"] for s in km.iteration_stats]  # seconds since the start, per iteration
  return dict(seconds_per_iteration=[total / iterations] * iterations, train_seconds=total,
              faiss_elapsed=elapsed), sources.normalize(km.centroids)


def default_out(kind: str) -> str:
  """Where rows of a data kind are merged: kmeans.json for the original two kinds."""
  name = "kmeans.json" if kind in ("clustered", "uniform") else f"kmeans_{kind}.json"
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def warm_up(x: np.ndarray, init: np.ndarray) -> None:
  """Compiles the screening kernels outside the timings: one per dtype, K and block shape
  (searches of fewer than 8,192 rows run in power-of-two blocks of 1,024 rows or more)."""
  for dtype in ("float32", assigners.resolve_screen_dtype("auto")):
    assigner = assigners.MatmulAssigner(init, dtype)
    for rows in (1024, 2048, 4096, 8192):
      assigner.search(x[:rows], 2)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=200_000)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--k", default="1024,16384,65536")
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--data", default="clustered,uniform", help=f"some of {DATA}")
  parser.add_argument("--methods", default="ours,exact,scann,faiss", help=f"some of {METHODS}")
  parser.add_argument("--num_leaves", type=int, default=None)
  parser.add_argument("--leaves_to_search", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--summarize", action="store_true",
                      help="only recompute derived fields of --out and print its table")
  parser.add_argument("--out", default=None,
                      help="results file (default: kmeans.json or kmeans_<data>.json)")
  args = parser.parse_args()
  if args.summarize:
    summarize(args.out or default_out("clustered"))
    return
  methods = args.methods.split(",")
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"--methods: unknown {unknown}; expected some of {METHODS}")
  rows = []
  for kind in args.data.split(","):
    x, facts = make_data(kind, args.n, args.dim, args.seed)
    for k in map(int, args.k.split(",")):
      init = x[np.sort(np.random.default_rng(args.seed + k).choice(args.n, k, replace=False))]
      row = dict(data=kind, n=args.n, dim=x.shape[1], k=k, iterations=args.iterations,
                 load_average=os.getloadavg()[0], **facts)
      warm_up(x, init)
      for method in methods:
        print(f"{kind} K={k} {method}", flush=True)
        if method == "faiss":
          info, centroids = run_faiss(x, init, args.iterations)
        else:
          info, result = run_ours(x, init, args.iterations, OURS[method], args.num_leaves,
                                  args.leaves_to_search)
          centroids = result.centroids
        ids, sims = exact_top(x, centroids, 10)
        info["objective"] = float(sims[:, 0].astype(np.float64).mean())
        if method != "faiss" and method != "exact":
          info["recall_top1"] = float(np.mean(result.labels[:, 0] == ids[:, 0]))
          info["recall_top10"] = float(np.mean(
            [len(set(a) & set(b)) / 10 for a, b in zip(result.labels, ids)]))
        row[method] = info
      rows.append(derive(row))
      _print_table(rows)
  run = dict(args=vars(args), machine=machine.describe(),
             date=time.strftime("%Y-%m-%d %H:%M %Z"))
  for path in sorted({args.out or default_out(row["data"]) for row in rows}):
    _merge_into(path, [row for row in rows if (args.out or default_out(row["data"])) == path],
                run)
    print(f"wrote {path}")


def derive(row: dict) -> dict:
  """Adds per-method timing summaries and ours' ratios to a result row (from its raw timings).

  Later iterations search fewer rows than the first (bounds, routing, or the tree), so besides
  the mean over the measured iterations (the headline: the stage runs 20 by default) rows carry
  the median, the first iteration's seconds, the mean after it and the total.
  """
  for method in METHODS:
    if method not in row:
      continue
    info = row[method]
    if method == "faiss":  # per-iteration seconds from faiss's cumulative clock
      info["seconds_per_iteration"] = list(np.diff([0.0] + info["faiss_elapsed"]))
    seconds = info["seconds_per_iteration"]
    later = float(np.mean(seconds[1:])) if len(seconds) > 1 else float(seconds[0])
    info["mean_seconds_per_iteration"] = float(np.mean(seconds))
    info["median_seconds_per_iteration"] = float(np.median(seconds))
    info["total_seconds"] = float(np.sum(seconds))
    info["seconds_first_iteration"] = float(seconds[0])
    info["mean_seconds_after_first"] = later
  measures = {"": "mean_seconds_per_iteration", "_after_first": "mean_seconds_after_first",
              "_median": "median_seconds_per_iteration"}
  if "ours" in row:
    for other in METHODS[1:]:
      if other in row:
        for suffix, measure in measures.items():
          row[f"speedup_vs_{other}{suffix}"] = row[other][measure] / row["ours"][measure]
        row[f"objective_ratio_vs_{other}"] = row["ours"]["objective"] / row[other]["objective"]
  return row


def _merge_into(path: str, rows: list[dict], run: dict) -> None:
  """Adds this run's rows to the JSON at `path`, replacing rows of the same (data, n, dim, k)."""
  def key(row):
    return row["data"], row["n"], row["dim"], row["k"]

  old = []
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)["rows"]
  new_keys = {key(row) for row in rows}
  for row in rows:
    row["run"] = run
  merged = [row for row in old if key(row) not in new_keys] + rows
  atomic.write_json(path, dict(rows=sorted(merged, key=key)))


def _print_table(rows) -> None:
  """Seconds per iteration (mean, median, first, after the first), total seconds, objectives,
  recall and the other methods' time over ours."""
  print(f"{'data':>10} {'K':>6} {'its':>4} {'method':>6} {'s/it':>7} {'median':>7} "
        f"{'s/it#1':>7} {'s/it>1':>7} {'total':>7} {'objective':>10} {'recall@1':>9} "
        f"{'x(mean)':>8} {'x(med)':>7} {'x(>1)':>7}")
  for row in rows:
    for method in METHODS:
      if method not in row:
        continue
      info = row[method]
      recall = info.get("recall_top1", float("nan"))
      ratios = [row.get(f"speedup_vs_{method}{suffix}", float("nan"))
                for suffix in ("", "_median", "_after_first")]
      print(f"{row['data']:>10} {row['k']:>6} {row['iterations']:>4} {method:>6} "
            f"{info['mean_seconds_per_iteration']:>7.2f} "
            f"{info['median_seconds_per_iteration']:>7.2f} "
            f"{info['seconds_first_iteration']:>7.2f} {info['mean_seconds_after_first']:>7.2f} "
            f"{info['total_seconds']:>7.1f} {info['objective']:>10.5f} {recall:>9.4f} "
            f"{ratios[0]:>8.2f} {ratios[1]:>7.2f} {ratios[2]:>7.2f}", flush=True)
  print("x(...): that method's seconds per iteration / ours (mean over all iterations, median, "
        "mean after the first)")


def summarize(path: str) -> None:
  """Recomputes the derived fields of a results file and prints its table."""
  with open(path) as f:
    results = json.load(f)
  results["rows"] = [derive(row) for row in results["rows"]]
  atomic.write_json(path, results)
  _print_table(results["rows"])


if __name__ == "__main__":
  main()
