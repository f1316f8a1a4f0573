"""ArrayRecord shards (`data.records`, `data.convert`): round trips from folders, manifests, TFDS
and the demo, bad records named by key, resumable and deterministic conversion, host sharding,
and a run of `main` over a converted dataset."""

import itertools
import json
import logging
import pickle

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

import helpers
from univit_jax import config_lib
from univit_jax.data import convert, pipeline, records, sources, transforms
from univit_jax.run_config import data_config


def _images(folder, count: int = 6):
  """`count` PNG / JPEG images of two classes and a few sizes (one grayscale); returns the
  folder."""
  rng = np.random.default_rng(0)
  for i in range(count):
    (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
    size = (12 + 2 * i, 16)
    if i == 3:
      Image.fromarray(rng.integers(0, 256, size, np.uint8)).save(folder / "c1" / "gray.png")
    else:
      ext = "jpg" if i == 4 else "png"
      Image.fromarray(rng.integers(0, 256, (*size, 3), np.uint8)).save(
        folder / f"c{i % 2}" / f"{i}.{ext}")
  return str(folder)


def _spec(type_: str, **fields) -> config_lib.SourceSpec:
  return config_lib.SourceSpec.from_dict("s", dict(type=type_, **fields))


def _convert(spec, out, records_per_shard: int = 4) -> sources.Source:
  """Converts `spec` into `out` and opens the result as an `array_record` source."""
  manifest = convert.convert(spec, str(out), records_per_shard)
  return sources.build_source(_spec("array_record", path=str(out), kind=manifest["kind"]))


def _assert_same_records(original, converted, num_frames: int):
  assert len(converted) == len(original)
  keys = sources.record_keys(original)
  assert sources.record_keys(converted) == keys
  for i in range(len(original)):
    a, b = original[i], converted[i]
    assert b["key"] == keys[i]
    assert b["label"] == int(a.get("label", -1))
    for name in ("boxes", "box_labels", "box_mask"):
      if name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), b[name], err_msg=name)
    frames_a, mask_a = sources.load_clip(a, num_frames, "uniform", 1, None)
    frames_b, mask_b = sources.load_clip(b, num_frames, "uniform", 1, None)
    np.testing.assert_array_equal(mask_a, mask_b)
    # Stored images decode to RGB; in-memory gray ones become RGB in the transforms.
    np.testing.assert_array_equal(transforms.to_rgb(frames_a), frames_b, err_msg=b["key"])


def test_image_folder_round_trip(tmp_path):
  spec = _spec("image_folder", path=_images(tmp_path / "images"))
  converted = _convert(spec, tmp_path / "out")
  _assert_same_records(sources.build_source(spec), converted, 1)
  assert converted[0]["key"] == "c0/0.png" and converted[0]["label"] == 0
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert [s["records"] for s in manifest["shards"]] == [4, 2]
  assert manifest["source"] == spec.to_dict() and manifest["kind"] == "image"
  keys = (tmp_path / "out" / "keys.txt").read_text().splitlines()
  assert keys == [converted[i]["key"] for i in range(len(converted))]
  assert pickle.loads(pickle.dumps(converted))[5]["key"] == keys[5]  # as grain workers get it
  # Resharding a converted dataset keeps every record and key.
  resharded = _convert(_spec("array_record", path=str(tmp_path / "out"), kind="image"),
                       tmp_path / "resharded", records_per_shard=5)
  _assert_same_records(converted, resharded, 1)
  assert (tmp_path / "resharded" / "keys.txt").read_text() == "\n".join(keys) + "\n"
  with pytest.raises(sources.SourceError, match="image records, not video"):
    sources.build_source(_spec("array_record", path=str(tmp_path / "out"), kind="video"))
  with pytest.raises(sources.SourceError, match="no manifest.json"):
    sources.build_source(_spec("array_record", path=str(tmp_path / "images"), kind="image"))


def test_video_manifest_round_trip_keeps_windows(tmp_path):
  for name, n in (("a.mp4", 12), ("b.mp4", 7)):
    helpers.encode_video(tmp_path / name, n, size=32)
  (tmp_path / "clips.csv").write_text("path,label,start,end\na.mp4,run,0.2,0.9\nb.mp4,sit,,\n"
                                      "a.mp4,sit,0,0.4\n")
  spec = _spec("video_folder", path=str(tmp_path / "clips.csv"))
  converted = _convert(spec, tmp_path / "out", records_per_shard=2)
  assert spec.is_video and _spec("array_record", path="x", kind="video").is_video
  _assert_same_records(sources.build_source(spec), converted, 3)
  assert [converted[i]["key"] for i in range(3)] == ["a.mp4#t=0.2,0.9", "b.mp4", "a.mp4#t=0,0.4"]


def test_tfds_and_demo_round_trip(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  spec = _spec("tfds", name="mnist", split="train")
  with tfds.testing.mock_data(num_examples=6):
    original = sources.build_source(spec)
    converted = _convert(spec, tmp_path / "mnist")
    _assert_same_records(original, converted, 1)
  assert converted[5]["key"] == "5"
  # The demo's clips (frames held as pixels, stored one PNG per frame) with boxes.
  events = _spec("demo", kind="events", split="train", num_examples=3, num_frames=4)
  converted = _convert(events, tmp_path / "events")
  assert "encoded_frames" in converted[0] and "boxes" in converted[0]
  _assert_same_records(sources.build_source(events), converted, 4)


def _image_cfg(spec, **kw) -> data_config.DataConfig:
  return data_config.DataConfig(**dict(
    sources=(spec,), frames=(1,), bucket_weights=(1,), tokens_per_batch=4 * 16, image_size=16,
    patch_size=4, transform=data_config.TransformConfig(16)) | kw)


def test_corrupt_records_are_counted_and_named_by_key(tmp_path, caplog):
  folder = _images(tmp_path / "images")
  (tmp_path / "images" / "c0" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  out = tmp_path / "out"
  convert.convert(_spec("image_folder", path=folder), str(out), 4)
  # A record whose bytes are no record at all, in a shard added to the manifest.
  writer = array_record_module.ArrayRecordWriter(str(out / "data-extra.array_record"),
                                                 records.WRITER_OPTIONS)
  writer.write(b"not msgpack")
  writer.close()
  manifest = json.loads((out / "manifest.json").read_text())
  manifest["shards"].append(dict(file="data-extra.array_record", records=1))
  (out / "manifest.json").write_text(json.dumps(manifest))
  spec = _spec("array_record", path=str(out), kind="image")
  converted = sources.build_source(spec)
  assert len(converted) == 8 and converted[3]["key"] == "c0/bad.png"
  ds = pipeline.build_train_dataset(_image_cfg(spec, max_bad_fraction=0.5),
                                    sources=dict(s=converted), process_index=0, process_count=1)
  it = iter(ds)
  with caplog.at_level(logging.WARNING):
    ids = np.concatenate([next(it)["id"] for _ in range(4)])
  assert not {3, 7} & set(ids.tolist()) and set(ids.tolist()) == {0, 1, 2, 4, 5, 6}
  assert it.tracker.bad >= 2
  assert "c0/bad.png: OSError" in caplog.text
  assert f"record 7 of {converted!r}: ValueError: not a univit-array-record" in caplog.text


def _files(folder) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_conversion_resumes_after_a_partial_run_with_identical_bytes(tmp_path):
  spec = _spec("image_folder", path=_images(tmp_path / "images", 9))
  convert.convert(spec, str(tmp_path / "out"), 2)
  complete = _files(tmp_path / "out")
  assert len([n for n in complete if n.endswith(".array_record")]) == 5
  # Same input, same bytes, in another folder.
  convert.convert(spec, str(tmp_path / "again"), 2)
  assert _files(tmp_path / "again") == complete
  # A killed run: no manifest or keys yet, one shard missing, a temporary shard left over.
  for name in ("manifest.json", "keys.txt", "data-00002-of-00005.array_record"):
    (tmp_path / "out" / name).unlink()
  (tmp_path / "out" / ".data-00002-of-00005.array_record.x1.tmp").write_bytes(b"partial")
  kept = (tmp_path / "out" / "data-00000-of-00005.array_record").stat().st_mtime_ns
  convert.convert(spec, str(tmp_path / "out"), 2)
  assert _files(tmp_path / "out") == complete
  assert (tmp_path / "out" / "data-00000-of-00005.array_record").stat().st_mtime_ns == kept
  with pytest.raises(convert.ConvertError, match=r"another plan.json \(differs in "
                                                 r"\['records_per_shard'\]\)"):
    convert.convert(spec, str(tmp_path / "out"), 3)


def test_two_hosts_read_disjoint_records_that_cover_all(tmp_path):
  spec = _spec("image_folder", path=_images(tmp_path / "images", 10))
  converted = _convert(spec, tmp_path / "out", records_per_shard=3)
  ar_spec = _spec("array_record", path=str(tmp_path / "out"), kind="image")
  cfg = _image_cfg(ar_spec, tokens_per_batch=2 * 16)
  train, evaluated = [], []
  for index in range(2):
    kw = dict(sources=dict(s=converted), process_index=index, process_count=2)
    it = iter(pipeline.build_train_dataset(cfg, **kw))
    ids = np.concatenate([b["id"] for b in itertools.islice(it, 5)]).tolist()
    train.append(set(ids[:5]))  # the first epoch of this host's 5 records
    assert len(train[-1]) == 5
    batches = pipeline.build_eval_dataset(cfg, 1, 4, **kw)
    evaluated.append({int(i) for b in batches for i, ok in zip(b["id"], b["example_mask"])
                      if ok})
  for shards in (train, evaluated):
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(10))


@pytest.mark.slow
def test_main_trains_on_a_converted_dataset(tmp_path):
  # The converter's command line, then the tiny pipeline through `main` (about 16 s).
  spec = _spec("image_folder", path=_images(tmp_path / "images", 16))
  out = tmp_path / "out"
  result = helpers.run_main(f"--source={json.dumps(spec.to_dict())}", f"--out={out}",
                            "--records_per_shard=5", module="univit_jax.data.convert")
  assert result.returncode == 0, result.stderr[-3000:]
  entry = json.loads(result.stdout.strip().split("as a data source: ")[1])
  assert entry == dict(type="array_record", path=str(out), kind="image")
  config = helpers.write_tiny_config(tmp_path, dict(imgs=entry))
  workdir = tmp_path / "run"
  result = helpers.run_main(f"--config={config}", f"--workdir={workdir}", timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "pipeline.json").read_text())["rounds"][0]
  assert "object/loss" in summary["last_losses"]
