"""The train step on ground-truth labels instead of clusters: can the step learn at all?

  python benchmarks/oracle_labels.py WORKDIR [STEPS] [field=value ...]
  python -m univit_jax.main --config=configs/demo.py --workdir=WORKDIR --mode=eval \
      --config.eval.probes='("linear","order")' --config.eval.baselines='()' \
      --config.eval.num_train=1000

Writes `clusters/<bank>/` in the cluster stage's format for the demo config's training sources,
with top-1 "clusters" from the demo's ground truth: digit classes for whole images and regions
(the first visible item's for a multi-object image), the first action for a clip (`event_1`),
and for segment s of g the action of event floor(s * n / g) of the clip's n events; then trains
`STEPS` (default 300) steps with `--mode=train`'s loop and exports the encoder. Overrides are
`a.b=value` on the demo config. If the probes learn here and not from the pipeline's clusters,
the gap lies between the clusters and the student, not in the step.
"""

import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

# pylint: disable=wrong-import-position
import helpers  # noqa: E402  # pylint: disable=import-error
from univit_jax import encoder, run_config, train  # noqa: E402
from univit_jax.clustering import labels as cluster_labels  # noqa: E402
from univit_jax.data import demo, pipeline  # noqa: E402
from univit_jax.run_config import data_config  # noqa: E402

BANK_SIZES = dict(object=demo.NUM_CLASSES, **{f"event_{g}": len(demo.ACTIONS)
                                              for g in (1, 2, 4, 8)})


def oracle_rows(data_cfg: data_config.DataConfig) -> dict[str, tuple[list, list]]:
  """Bank -> ((example id, sub) rows, top-1 labels) from the ground truth of the sources."""
  opened = pipeline.open_sources(data_cfg)
  names = [s.name for s in data_cfg.sources]
  offsets = np.cumsum([0] + [len(opened[n]) for n in names])
  rows = {bank: ([], []) for bank in BANK_SIZES}
  for s, name in enumerate(names):
    source = opened[name]
    for i in range(len(source)):
      record, example = source[i], int(offsets[s] + i)
      if source.kind == "events":
        actions = demo.action_sequence(int(record["label"]))
        for g in (1, 2, 4, 8):
          for seg in range(g):
            action = actions[0] if g == 1 else actions[seg * len(actions) // g]
            rows[f"event_{g}"][0].append((example, seg))
            rows[f"event_{g}"][1].append([action])
        continue
      visible = [int(c) for c, m in zip(record["box_labels"], record["box_mask"]) if m]
      rows["object"][0].append((example, -1))
      rows["object"][1].append([int(record["label"]) if source.kind == "items" else visible[0]])
      if source.kind == "objects":
        for r, (c, m) in enumerate(zip(record["box_labels"], record["box_mask"])):
          if m:
            rows["object"][0].append((example, r))
            rows["object"][1].append([int(c)])
  return rows


def main(argv: list[str]) -> None:
  workdir, steps = argv[1], int(argv[2]) if len(argv) > 2 else 300
  config = helpers.load_config("demo")
  config.total_steps, config.optim.warmup_steps = steps, 20
  config.train.progress_bar, config.train.log_every = False, 50
  for item in argv[3:]:
    key, value = item.split("=", 1)
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], str) else type(
      node[leaf])(eval(value))  # pylint: disable=eval-used
  run = run_config.build(config, jax.device_count())
  rng = np.random.default_rng(0)
  opened = pipeline.open_sources(run.data)
  keys = pipeline.example_keys(run.data, opened)
  inputs = dict(data=dict(sources=pipeline.sources_fingerprint(run.data, opened)))
  for bank, (ids, labels) in oracle_rows(run.data).items():
    centroids = cluster_labels.random_centroids(rng, BANK_SIZES[bank], run.model.width)
    cluster_labels.write_clusters(
      workdir, bank, centroids=centroids, labels=labels, ids=ids,
      keys=keys[np.asarray(ids, np.int64)[:, 0]],
      stats=dict(bank=bank, version="oracle", config=dict(num_clusters=BANK_SIZES[bank]),
                 objective=[0.0], inputs=inputs))
  result = train.run_train(run, workdir)
  print(f"trained {result.step} steps; export: "
        f"{encoder.export_encoder(run, workdir, result.state.params['encoder'])}")


if __name__ == "__main__":
  main(sys.argv)
