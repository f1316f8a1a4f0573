"""Cluster labels follow their records by key: records appended, reordered, or shifted by a new
source between clustering and training get exactly the labels they got on the unchanged data;
records without labels get none, and too many of them refuse the bank."""

import numpy as np
import pytest
from PIL import Image

import helpers
from univit_jax.clustering import labels as cluster_labels
from univit_jax.clustering import store
from univit_jax.data import pipeline
from univit_jax.run_config import data_config
from univit_jax.train import labels as labels_lib

BOXES = 2


def _images(folder, names: list[str]) -> None:
  folder.mkdir(exist_ok=True)
  for name in names:
    rng = np.random.default_rng(int(name.split(".")[0]))
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(folder / name)


def _manifest(folder, names: list[str]) -> str:
  path = folder / "images.csv"
  path.write_text("path,label\n" + "".join(f"{name},0\n" for name in names))
  return str(path)


def _data(**manifests) -> tuple[data_config.DataConfig, dict]:
  """The data of image sources named by keyword (each a manifest), and the opened sources."""
  config = helpers.demo_config()
  config.data.sources = {name: dict(type="image_folder", path=path)
                         for name, path in manifests.items()}
  cfg = data_config.DataConfig.from_config(config)
  return cfg, pipeline.open_sources(cfg)


def _cluster(workdir: str, cfg: data_config.DataConfig, opened: dict) -> None:
  """The extract stage's store for these sources (one whole-image row and BOXES region rows per
  image, features drawn per record key so they follow the record), then the real cluster stage."""
  keys = pipeline.example_keys(cfg, opened)
  rows, ids = [], []
  for example, key in enumerate(keys):
    rng = np.random.default_rng(list(key))
    rows.append(rng.standard_normal((BOXES + 1, 8)))
    ids += [(example, sub) for sub in range(-1, BOXES)]
  inputs = dict(data=dict(sources=pipeline.sources_fingerprint(cfg, opened)))
  writer = store.BankWriter(workdir, "object", 8, teacher="t", inputs=inputs)
  writer.write_chunk(0, np.concatenate(rows).astype(np.float32), np.array(ids))
  writer.finish()
  store.write_keys(workdir, keys)
  cluster_labels.run_cluster_stage(
    workdir, {"object": dict(num_clusters=4, top_k=2, iterations=2)}, log=lambda line: None)


def _attached(workdir: str, cfg: data_config.DataConfig, opened: dict, max_fraction: float
              ) -> dict[bytes, tuple]:
  """Per record key: (global bank, whole-image labels, region labels, regions valid) that
  training attaches to the record."""
  examples = labels_lib.examples_of(cfg, opened)
  bank = labels_lib.load_bank(workdir, "object", examples, max_fraction)
  count = len(examples.keys)
  batch = dict(id=np.arange(count), frames=np.zeros((count, 1, 8, 8, 3), np.float32),
               boxes=np.zeros((count, BOXES, 4), np.float32),
               box_mask=np.ones((count, BOXES), bool))
  out = labels_lib.LabelAttacher(dict(object=bank), "whole")(batch)
  return {key: (int(out["global_bank"][i]), out["labels_global"][i].tolist(),
                out["labels_regions"][i].tolist(), out["regions_valid"][i].tolist())
          for i, key in enumerate(examples.keys.tolist())}


NAMES = [f"{i}.png" for i in range(8)]


def _clustered(tmp_path) -> tuple[str, data_config.DataConfig, dict]:
  """A workdir clustered for the 8 images of NAMES in `photos` (whose folder holds two more,
  8.png and 9.png), with that data and its opened sources."""
  _images(tmp_path / "photos", NAMES + ["8.png", "9.png"])
  cfg, opened = _data(photos=_manifest(tmp_path / "photos", NAMES))
  workdir = str(tmp_path / "run")
  _cluster(workdir, cfg, opened)
  return workdir, cfg, opened


def test_labels_attach_by_key_after_records_are_appended_and_reordered(tmp_path):
  workdir, cfg, opened = _clustered(tmp_path)
  before = _attached(workdir, cfg, opened, 0.0)
  assert all(bank == 0 and all(valid) for bank, _, _, valid in before.values())

  # The manifest reversed with two images appended, and a new source whose name sorts first
  # (so every photo's example id moves).
  _images(tmp_path / "extra", ["10.png"])
  changed = NAMES[::-1] + ["8.png", "9.png"]
  cfg, opened = _data(photos=_manifest(tmp_path / "photos", changed),
                      a_extra=_manifest(tmp_path / "extra", ["10.png"]))
  after = _attached(workdir, cfg, opened, 0.3)
  new = {b"photos/8.png", b"photos/9.png", b"a_extra/10.png"}
  assert set(after) == set(before) | new
  for key, labels in before.items():
    assert after[key] == labels, key
  for key in new:
    bank, whole, regions, valid = after[key]
    assert bank == -1 and set(whole) == {-1} and not any(valid), key
    assert {label for row in regions for label in row} == {-1}


def test_too_many_records_without_labels_refuse_the_bank(tmp_path):
  workdir, _, _ = _clustered(tmp_path)
  cfg, opened = _data(photos=_manifest(tmp_path / "photos", NAMES + ["8.png", "9.png"]))
  examples = labels_lib.examples_of(cfg, opened)
  with pytest.raises(labels_lib.LabelError,
                     match=r"bank 'object': 2 of the 10 image records of the data \(20\.0%\) "
                           rf"have no labels in {workdir}/clusters/object, e\.g\. "
                           r"\['photos/8\.png', 'photos/9\.png'\].*max_unlabelled_fraction=0\.05"):
    labels_lib.load_bank(workdir, "object", examples, 0.05)
  assert labels_lib.load_bank(workdir, "object", examples, 0.2).unlabelled == 2


def test_match_keys_pairs_each_example_with_the_rows_of_its_key():
  rows = np.array([b"s/b", b"s/a", b"s/b", b"s/c"])
  ids, matched = labels_lib.match_keys(rows, np.array([b"s/a", b"s/x", b"s/b", b"s/a"]))
  assert sorted(zip(ids.tolist(), matched.tolist())) == [(0, 1), (2, 0), (2, 2), (3, 1)]
