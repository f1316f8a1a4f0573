"""Subprocess entry for the clustering tests: writes a bank or runs the cluster stage.

Separate processes are needed to kill a run with SIGKILL and to run two JAX processes that talk
over localhost. The `--sleep` pause after each chunk / k-means pass gives the test time to kill.

  python tests/cluster_worker.py write WORKDIR --sleep S
  python tests/cluster_worker.py cluster WORKDIR --backend B --sleep S [--center] [--process I
      --processes P --port PORT]   (several processes: `helpers.start_processes`)
"""

import argparse
import os
import sys
import time

import numpy as np

BANK = "event_2"
DIM = 16
CLUSTERS = 6
CHUNK_ROWS = (70, 90, 80, 60, 100)


def planted(num_rows: int, num_clusters: int, dim: int, noise: float, seed: int):
  """A Gaussian mixture on the sphere: (features [N, D] float32, true cluster [N])."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_clusters, dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  truth = rng.integers(0, num_clusters, num_rows)
  x = centres[truth] + noise * rng.standard_normal((num_rows, dim)) / np.sqrt(dim)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def bank_features():
  """The test bank: chunks of planted features with ids (sample id, segment)."""
  x, _ = planted(sum(CHUNK_ROWS), CLUSTERS, DIM, noise=0.3, seed=1)
  chunks, lo = [], 0
  for rows in CHUNK_ROWS:
    ids = np.stack([np.arange(lo, lo + rows) // 2, np.arange(lo, lo + rows) % 2], axis=1)
    chunks.append((x[lo:lo + rows], ids))
    lo += rows
  return chunks


def write(workdir: str, sleep: float) -> None:
  from univit_jax.clustering import store  # pylint: disable=import-outside-toplevel
  writer = store.BankWriter(workdir, BANK, DIM, teacher="test-teacher")
  for index, (features, ids) in enumerate(bank_features()):
    if writer.write_chunk(index, features, ids):
      print(f"chunk {index}", flush=True)
      time.sleep(sleep)
  writer.finish()
  store.write_keys(workdir, record_keys(sum(CHUNK_ROWS) // 2))


def record_keys(count: int) -> np.ndarray:
  """Record keys for sample ids 0..count-1, as extraction writes them (`store.write_keys`)."""
  return np.array([f"test/{i}" for i in range(count)], np.bytes_)


def cluster(workdir: str, backend: str, sleep: float, iterations: int, center: bool) -> None:
  from univit_jax.clustering import labels  # pylint: disable=import-outside-toplevel

  def log(line: str) -> None:
    print(line, flush=True)
    time.sleep(sleep)

  spec = dict(num_clusters=CLUSTERS + 2, iterations=iterations, top_k=3, backend=backend,
              seed=3, brute_force_max_k=4, num_leaves=3, leaves_to_search=1, block_rows=64,
              exact_labels=False, center=center)
  labels.run_cluster_stage(workdir, {BANK: spec}, log=log)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("command", choices=("write", "cluster"))
  parser.add_argument("workdir")
  parser.add_argument("--sleep", type=float, default=0.0)
  parser.add_argument("--backend", default="exact")
  parser.add_argument("--iterations", type=int, default=6)
  parser.add_argument("--center", action="store_true")
  helpers.add_process_arguments(parser)
  args = parser.parse_args()
  helpers.join_processes(args)
  if args.command == "write":
    write(args.workdir, args.sleep)
  else:
    cluster(args.workdir, args.backend, args.sleep, args.iterations, args.center)


if __name__ == "__main__":
  sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
  import helpers
  main()
