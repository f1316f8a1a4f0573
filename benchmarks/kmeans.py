"""Spherical k-means: ours (ScaNN tree / auto), our exact JAX path, and faiss-cpu, head to head.

Same data, same initial centroids (K random rows), same number of iterations, in one process:

  /work/main/.venv/bin/python benchmarks/kmeans.py          # N=200k, D=256, K 1k/16k/65k
  /work/main/.venv/bin/python benchmarks/kmeans.py --n=20000 --k=1024 --iterations=3   # quick

Per method it reports seconds per iteration, the final objective (mean cosine of each row to its
nearest final centroid, evaluated exactly for every method), and for ours the assignment recall of
the final pass against exact search with the same centroids (top-1, and top-10 overlap). Ratios
are faiss / ours and exact / ours seconds per iteration. faiss-cpu is a benchmark-only dependency
(requirements-bench.txt). Results go to benchmarks/results/kmeans.json.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from univit_jax.clustering import kmeans  # pylint: disable=wrong-import-position


def make_data(kind: str, n: int, dim: int, seed: int) -> np.ndarray:
  """Unit rows [n, dim]: "uniform" on the sphere, or "clustered" (4,096 random centres, each row
  a centre plus isotropic noise of norm about 0.6, then normalised)."""
  rng = np.random.default_rng(seed)
  if kind == "uniform":
    return kmeans.normalize(rng.standard_normal((n, dim), dtype=np.float32))
  centres = kmeans.normalize(rng.standard_normal((4096, dim), dtype=np.float32))
  noise = rng.standard_normal((n, dim), dtype=np.float32) * (0.6 / np.sqrt(dim))
  return kmeans.normalize(centres[rng.integers(0, len(centres), n)] + noise)


def exact_top(x: np.ndarray, centroids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  return kmeans.ExactAssigner(centroids).search(x, k)


def run_ours(x, init, iterations, backend, leaves, search):
  spec = kmeans.ClusterSpec(num_clusters=len(init), iterations=iterations, top_k=10,
                            backend=backend, num_leaves=leaves, leaves_to_search=search)
  result = kmeans.spherical_kmeans(kmeans.ArraySource(x), spec, init_centroids=init,
                                   log=lambda line: print("   ", line, flush=True))
  return dict(seconds_per_iteration=result.seconds[:-1], labels_seconds=result.seconds[-1],
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
              faiss_elapsed=elapsed), kmeans.normalize(km.centroids)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=200_000)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--k", default="1024,16384,65536")
  parser.add_argument("--iterations", type=int, default=5)
  parser.add_argument("--data", default="clustered,uniform")
  parser.add_argument("--methods", default="ours,exact,faiss")
  parser.add_argument("--num_leaves", type=int, default=None)
  parser.add_argument("--leaves_to_search", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "kmeans.json"))
  args = parser.parse_args()
  methods = args.methods.split(",")
  rows = []
  for kind in args.data.split(","):
    x = make_data(kind, args.n, args.dim, args.seed)
    for k in map(int, args.k.split(",")):
      init = x[np.sort(np.random.default_rng(args.seed + k).choice(args.n, k, replace=False))]
      row = dict(data=kind, n=args.n, dim=args.dim, k=k, iterations=args.iterations)
      for method in methods:
        print(f"{kind} K={k} {method}", flush=True)
        if method == "faiss":
          info, centroids = run_faiss(x, init, args.iterations)
        else:
          backend = "auto" if method == "ours" else "exact"
          info, result = run_ours(x, init, args.iterations, backend, args.num_leaves,
                                  args.leaves_to_search)
          centroids = result.centroids
        ids, sims = exact_top(x, centroids, 10)
        info["objective"] = float(sims[:, 0].astype(np.float64).mean())
        if method == "ours":
          info["recall_top1"] = float(np.mean(result.labels[:, 0] == ids[:, 0]))
          info["recall_top10"] = float(np.mean(
            [len(set(a) & set(b)) / 10 for a, b in zip(result.labels, ids)]))
        info["mean_seconds_per_iteration"] = float(np.mean(info["seconds_per_iteration"]))
        row[method] = info
      ours = row.get("ours", {}).get("mean_seconds_per_iteration")
      for other in ("faiss", "exact"):
        if ours and other in row:
          row[f"speedup_vs_{other}"] = row[other]["mean_seconds_per_iteration"] / ours
          row[f"objective_ratio_vs_{other}"] = row["ours"]["objective"] / row[other]["objective"]
      rows.append(row)
      _print_table(rows, methods)
  _merge_into(args.out, rows, dict(args=vars(args), machine=platform.machine(),
                                   cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M %Z")))
  print(f"wrote {args.out}")


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
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(rows=sorted(merged, key=key)), f, indent=2)


def _print_table(rows, methods) -> None:
  header = f"{'data':>10} {'K':>6} " + " ".join(f"{m + ' s/it':>11} {m + ' obj':>10}"
                                                 for m in methods)
  print(header + f" {'recall@1':>9} {'x faiss':>8} {'x exact':>8}")
  for row in rows:
    cells = " ".join(f"{row[m]['mean_seconds_per_iteration']:>11.3f} {row[m]['objective']:>10.5f}"
                     for m in methods)
    recall = row.get("ours", {}).get("recall_top1", float("nan"))
    print(f"{row['data']:>10} {row['k']:>6} {cells} {recall:>9.4f} "
          f"{row.get('speedup_vs_faiss', float('nan')):>8.2f} "
          f"{row.get('speedup_vs_exact', float('nan')):>8.2f}", flush=True)


if __name__ == "__main__":
  main()
