"""How well a run's own clusters follow the ground truth: NMI and purity per bank.

Each cluster row is a (record key, sub) of the training sources (`docs/training.md`), scored against
the record of that key in the data now configured (rows of records no longer there are left out).
Its ground truth comes from the record: whole-image rows (`object`, sub -1) the record's `label`
(when it has one, e.g. the demo's single digits), region rows (`object`, sub r) the box's class
`box_labels[r]`, clip rows (`event_1`) the clip's `label`, and for the demo's event clips also the
first action. Rows without ground truth are left out. A bootstrap teacher whose clusters group
colour or placement scores near 0; clusters that follow what is in the picture score high.
"""

import os

import numpy as np

from univit_jax import paths
from univit_jax.clustering import labels as cluster_labels
from univit_jax.data import demo, pipeline
from univit_jax.evaluation import common, metrics
from univit_jax.run_config import data_config
from univit_jax.train import labels as train_labels


def _truths(bank: str, record: dict, sub: int, source) -> dict[str, int]:
  """Ground-truth labels of one cluster row, by name ({} when the row has none)."""
  if bank == "object":
    if sub < 0:
      label = int(record.get("label", -1))
      return {"image_class": label} if label >= 0 else {}
    mask = record.get("box_mask")
    if mask is None or not bool(mask[sub]):
      return {}
    return {"region_class": int(record["box_labels"][sub])}
  if bank == "event_1":
    label = int(record.get("label", -1))
    if label < 0:
      return {}
    truths = {"clip_label": label}
    if isinstance(source, demo.DemoSource) and source.kind == "events":
      truths["first_action"] = demo.action_sequence(label)[0]
    return truths
  return {}


def cluster_quality(data_cfg: data_config.DataConfig, workdir: str,
                    banks: tuple[str, ...] = ("object", "event_1")) -> dict[str, common.ProbeResult]:
  """NMI (and purity in details) of each bank's top-1 cluster against each ground truth.

  Args:
    data_cfg: the run's data (its sources hold the records the rows' keys name).
    workdir: the folder holding `clusters/<bank>/` (a run, or a pipeline round).
    banks: banks to score; those not clustered in `workdir` are skipped.

  Returns:
    {"<bank>:<truth>/clusters": ProbeResult(metric "nmi", details purity, rows, clusters)}.

  Raises:
    train.LabelError: clusters made for another version of a source that numbers its records
      (`train.labels.check_sources`: their keys would name other records, and the scores would
      be of wrong pairs).
  """
  opened = pipeline.open_sources(data_cfg)
  names = [spec.name for spec in data_cfg.sources]
  offsets = np.cumsum([0] + [len(opened[n]) for n in names])
  examples = train_labels.examples_of(data_cfg, opened)
  results = {}
  for bank in banks:
    if not paths.path(os.path.join(cluster_labels.clusters_dir(workdir, bank), "ids.npy")).exists():
      continue
    out = cluster_labels.load_clusters(workdir, bank)
    train_labels.check_sources(bank, cluster_labels.clusters_dir(workdir, bank), out["stats"],
                               examples.sources)
    pairs: dict[str, tuple[list[int], list[int]]] = {}
    records: dict[int, dict] = {}
    example_ids, rows = train_labels.match_keys(out["keys"], examples.keys)
    for example, row in zip(example_ids.tolist(), rows.tolist()):
      s = int(np.searchsorted(offsets, example, side="right") - 1)
      source = opened[names[s]]
      if example not in records:
        records[example] = source[int(example - offsets[s])]
      sub, cluster = int(out["ids"][row, 1]), int(out["labels"][row, 0])
      for truth, value in _truths(bank, records[example], sub, source).items():
        pairs.setdefault(truth, ([], []))
        pairs[truth][0].append(value)
        pairs[truth][1].append(cluster)
    for truth, (truth_labels, clusters) in pairs.items():
      results[f"{bank}:{truth}/clusters"] = common.ProbeResult(
        metric="nmi", value=metrics.nmi(np.array(truth_labels), np.array(clusters)),
        details=dict(purity=metrics.purity(np.array(truth_labels), np.array(clusters)),
                     rows=len(clusters), clusters=int(out["centroids"].shape[0])))
  return results
