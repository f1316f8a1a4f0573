"""How well each round's clusters follow the demo's ground truth: NMI and purity per bank.

  python benchmarks/cluster_quality.py --workdir=DIR [--config.data.sources.digits.num_examples=N]
      [--out=FILE]

DIR is a `--mode=pipeline` workdir (every `round_<r>/` with clusters is scored) or one round's
folder. The config must give the data the run was made with (the same overrides). Purity is the
accuracy of the best cluster -> class map on the clustered rows: what a student that fits its
clusters perfectly could tell of the class at most, before generalisation. Prints a table and,
with `--out`, writes JSON.
"""

import os
import sys

from absl import app, flags
import jax
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
from univit_jax import atomic, paths, rounds, run_config  # noqa: E402
from univit_jax.evaluation import clusters  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", os.path.join(ROOT, "configs", "demo.py"), "the run's config (its data section)",
  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "pipeline workdir or one round's folder",
                               required=True)
_OUT = flags.DEFINE_string("out", "", "JSON path (none: print only)")


def round_folders(workdir: str) -> dict[str, str]:
  """{name: folder} of the rounds under a pipeline workdir (1, 2, ... while clustered), or
  {workdir: workdir} for a round."""
  found, r = {}, 1
  while paths.path(os.path.join(rounds.round_dir(workdir, r), "clusters")).exists():
    found[f"round {r}"] = rounds.round_dir(workdir, r)
    r += 1
  return found or {workdir: workdir}


def main(argv):
  del argv
  data_cfg = run_config.build(_CONFIG.value, jax.device_count()).data
  table = {name: {key: dict(nmi=score.value, **score.details)
                  for key, score in clusters.cluster_quality(data_cfg, folder).items()}
           for name, folder in round_folders(_WORKDIR.value).items()}
  print("| round | bank:truth | NMI | purity | rows | clusters |\n|---|---|---:|---:|---:|---:|")
  for name, scores in table.items():
    for key, s in scores.items():
      print(f"| {name} | {key.removesuffix('/clusters')} | {s['nmi']:.3f} | {s['purity']:.3f} "
            f"| {s['rows']} | {s['clusters']} |")
  if _OUT.value:
    atomic.write_json(_OUT.value, dict(workdir=_WORKDIR.value, rounds=table))


if __name__ == "__main__":
  app.run(main)
