"""Spherical k-means: ours ("auto"), our exact path, the ScaNN tree, and faiss-cpu, head to head.

Same data, same initial centroids (K random rows), same number of iterations, in one process:

  python benchmarks/kmeans.py          # N=200k, D=256, K 1k/16k/65k, 20 iterations
  python benchmarks/kmeans.py --n=20000 --k=1024 --iterations=3   # quick

Methods: "ours" is the stage's default backend ("auto": bf16-screened matmul with bounds at
these K), "exact" the float32 fallback (same bounds), "scann" the ScaNN tree from the second
iteration on (backend "scann" with brute_force_max_k=4096), "faiss" faiss-cpu's Kmeans.
Per method it reports seconds per iteration, the final objective (mean cosine of each row to its
nearest final centroid, evaluated exactly for every method), and for ours and scann the
assignment recall of the final pass (the assigner's own top-k, not the stage's exact labels
pass) against exact search with the same centroids (top-1, and top-10 overlap).
Ratios are faiss / ours and exact / ours seconds per iteration. faiss-cpu is a benchmark-only
dependency (requirements-bench.txt). Results are merged into benchmarks/results/kmeans.json (rows
keyed by data, N, D, K); `--summarize` reprints that file.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from univit_jax import atomic  # pylint: disable=wrong-import-position
from univit_jax.clustering.kmeans import (  # pylint: disable=wrong-import-position
  assigners, lloyd, sources)


def make_data(kind: str, n: int, dim: int, seed: int) -> np.ndarray:
  """Unit rows [n, dim]: "uniform" on the sphere, or "clustered" (4,096 random centres, each row
  a centre plus isotropic noise of norm about 0.6, then normalised)."""
  rng = np.random.default_rng(seed)
  if kind == "uniform":
    return sources.normalize(rng.standard_normal((n, dim), dtype=np.float32))
  centres = sources.normalize(rng.standard_normal((4096, dim), dtype=np.float32))
  noise = rng.standard_normal((n, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
  return sources.normalize(centres[rng.integers(0, len(centres), n)] + noise)


def exact_top(x: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  return assigners.MatmulAssigner(centroids).search(x, k)


# ClusterSpec options of each of our methods.
OURS = {"ours": dict(backend="auto"), "exact": dict(backend="exact"),
        "scann": dict(backend="scann", brute_force_max_k=4096)}


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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=200_000)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--k", default="1024,16384,65536")
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--data", default="clustered,uniform")
  parser.add_argument("--methods", default="ours,exact,scann,faiss")
  parser.add_argument("--num_leaves", type=int, default=None)
  parser.add_argument("--leaves_to_search", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--summarize", action="store_true",
                      help="only recompute derived fields of --out and print its table")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "kmeans.json"))
  args = parser.parse_args()
  if args.summarize:
    summarize(args.out)
    return
  methods = args.methods.split(",")
  rows = []
  for kind in args.data.split(","):
    x = make_data(kind, args.n, args.dim, args.seed)
    for k in map(int, args.k.split(",")):
      init = x[np.sort(np.random.default_rng(args.seed + k).choice(args.n, k, replace=False))]
      row = dict(data=kind, n=args.n, dim=args.dim, k=k, iterations=args.iterations)
      for top_k in (1, 2, 10):  # compile the full-block matmul kernels outside the timings
        for dtype in ("float32", assigners.resolve_screen_dtype("auto")):
          assigners.MatmulAssigner(init, dtype).search(x[:16_384], top_k)
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
        if method in ("ours", "scann"):
          info["recall_top1"] = float(np.mean(result.labels[:, 0] == ids[:, 0]))
          info["recall_top10"] = float(np.mean(
            [len(set(a) & set(b)) / 10 for a, b in zip(result.labels, ids)]))
        row[method] = info
      rows.append(derive(row))
      _print_table(rows)
  _merge_into(args.out, rows, dict(args=vars(args), machine=platform.machine(),
                                   cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M %Z")))
  print(f"wrote {args.out}")


def derive(row: dict) -> dict:
  """Adds per-method timing summaries and ours' ratios to a result row (from its raw timings).

  Later iterations search fewer rows than the first (bounds, or the tree), so besides the mean
  over the measured iterations (the headline: the stage runs 20 by default) rows carry the
  first iteration's seconds and the mean after it.
  """
  for method in ("ours", "exact", "scann", "faiss"):
    if method not in row:
      continue
    info = row[method]
    if method == "faiss":  # per-iteration seconds from faiss's cumulative clock
      info["seconds_per_iteration"] = list(np.diff([0.0] + info["faiss_elapsed"]))
    seconds = info["seconds_per_iteration"]
    later = float(np.mean(seconds[1:])) if len(seconds) > 1 else float(seconds[0])
    info["mean_seconds_per_iteration"] = float(np.mean(seconds))
    info["seconds_first_iteration"] = float(seconds[0])
    info["mean_seconds_after_first"] = later
  measures = {"": "mean_seconds_per_iteration", "_after_first": "mean_seconds_after_first"}
  if "ours" in row:
    for other in ("faiss", "exact", "scann"):
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
  """Seconds per iteration (mean / after the first), objectives, recall and ours' speedups."""
  print(f"{'data':>10} {'K':>6} {'its':>4} {'method':>6} {'s/it':>8} {'s/it#1':>8} "
        f"{'s/it>1':>8} {'objective':>10} {'recall@1':>9} {'x(mean)':>8} {'x(>1)':>8}")
  for row in rows:
    for method in ("ours", "exact", "scann", "faiss"):
      if method not in row:
        continue
      info = row[method]
      recall = info.get("recall_top1", float("nan"))
      ratios = [row.get(f"speedup_vs_{method}{suffix}", float("nan"))
                for suffix in ("", "_after_first")]
      print(f"{row['data']:>10} {row['k']:>6} {row['iterations']:>4} {method:>6} "
            f"{info['mean_seconds_per_iteration']:>8.2f} {info['seconds_first_iteration']:>8.2f} "
            f"{info['mean_seconds_after_first']:>8.2f} {info['objective']:>10.5f} "
            f"{recall:>9.4f} " + " ".join(f"{r:>8.2f}" for r in ratios), flush=True)
  print("x(...): that method's seconds per iteration / ours (mean over all iterations, mean "
        "after the first)")


def summarize(path: str) -> None:
  """Recomputes the derived fields of a results file and prints its table."""
  with open(path) as f:
    results = json.load(f)
  results["rows"] = [derive(row) for row in results["rows"]]
  atomic.write_json(path, results)
  _print_table(results["rows"])


if __name__ == "__main__":
  main()
