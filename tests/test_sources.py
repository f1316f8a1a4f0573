"""Sources: manifests, folder trees, image conversion and bad images, TFDS under mock_data."""

import itertools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from univit_jax import config_lib
from univit_jax.data import pipeline, sources, transforms
from univit_jax.run_config import data_config


def _save(path, array, mode=None):
  Image.fromarray(array, mode).save(path)
  return path


def test_directory_tree_gives_sorted_class_labels(tmp_path):
  for name in ("cat", "ant"):
    (tmp_path / name).mkdir()
    for i in range(2):
      _save(tmp_path / name / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
  (tmp_path / "ant" / "notes.txt").write_text("ignored")
  entries = sources.read_entries(str(tmp_path), "image")
  assert [(e.path.rsplit("/", 2)[1], e.label) for e in entries] == [
    ("ant", 0), ("ant", 0), ("cat", 1), ("cat", 1)]
  with pytest.raises(ValueError, match="no files"):
    sources.read_entries(str(tmp_path / "ant"), "video")


def test_manifests_csv_and_jsonl(tmp_path):
  for name in ("a.jpg", "b.jpg"):
    _save(tmp_path / name, np.zeros((8, 8, 3), np.uint8))
  (tmp_path / "m.csv").write_text("path,label\na.jpg,dog\nb.jpg,cat\n")
  entries = sources.read_entries(str(tmp_path / "m.csv"), "image")
  assert [e.label for e in entries] == [1, 0]  # class names in sorted order
  (tmp_path / "m.jsonl").write_text('{"path": "a.jpg", "label": 3}\n{"path": "b.jpg"}\n')
  entries = sources.read_entries(str(tmp_path / "m.jsonl"), "image")
  assert [e.label for e in entries] == [3, -1]
  assert entries[0].path == str(tmp_path / "a.jpg")


def test_manifest_with_missing_files_or_unknown_columns_is_rejected(tmp_path):
  _save(tmp_path / "a.jpg", np.zeros((8, 8, 3), np.uint8))
  (tmp_path / "m.csv").write_text("path,label,colour\na.jpg,1,\ngone.jpg,2,\nb.jpg,1,red\n")
  with pytest.raises(ValueError) as e:
    sources.read_entries(str(tmp_path / "m.csv"), "image")
  message = str(e.value)
  assert "line 3: missing file 'gone.jpg'" in message
  assert "line 4: unknown columns ['colour']" in message and "line 2" not in message
  (tmp_path / "v.jsonl").write_text('{"path": "a.jpg", "start": 1}\n')
  with pytest.raises(ValueError, match=r"unknown columns \['start'\]"):
    sources.read_entries(str(tmp_path / "v.jsonl"), "image")
  with pytest.raises(ValueError, match="neither a manifest"):
    sources.read_entries(str(tmp_path / "nothing"), "image")


def test_images_are_converted_or_skipped(tmp_path):
  rng = np.random.default_rng(0)
  gray = _save(tmp_path / "gray.png", rng.integers(0, 255, (20, 30), np.uint8))
  rgba = _save(tmp_path / "rgba.png", rng.integers(0, 255, (20, 30, 4), np.uint8))
  tiny = _save(tmp_path / "tiny.jpg", rng.integers(0, 255, (5, 7, 3), np.uint8))
  palette = tmp_path / "palette.png"
  Image.fromarray(rng.integers(0, 255, (9, 9, 3), np.uint8)).convert("P").save(palette)
  for path in (gray, rgba, tiny, palette):
    frames, mask = sources.load_clip(dict(path=str(path), kind="image"), 1, "uniform", 1, None)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8 and mask.all()
    out, _, _ = transforms.apply(frames, np.zeros((0, 4)), np.zeros(0, bool),
                                 data_config.TransformConfig(16), np.random.default_rng(0))
    assert out.shape == (1, 16, 16, 3)
  data = open(tiny, "rb").read()
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(data[: len(data) // 2])
  junk = tmp_path / "junk.png"
  junk.write_bytes(b"\x89PNG not really")
  for path in (broken, junk, tmp_path / "missing.png"):
    with pytest.raises(sources.BadRecordError, match=path.name):
      sources.load_clip(dict(path=str(path), kind="image"), 1, "uniform", 1, None)


def _png_header(width, height):
  """A PNG that declares `width` x `height` RGB pixels but holds no pixel data."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_only_allowed_formats_decode_and_huge_images_are_refused_before_decoding(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 255, (6, 8, 3), np.uint8)
  tiff = _save(tmp_path / "ok.tiff", pixels)
  frames, _ = sources.load_clip(dict(path=str(tiff), kind="image"), 1, "uniform", 1, None)
  np.testing.assert_array_equal(frames[0], pixels)
  # A format outside the allow-list (here TGA), whatever the file is called.
  disguised = tmp_path / "disguised.png"
  Image.fromarray(pixels).save(disguised, format="TGA")
  # A decompression bomb: a tiny file declaring 9000 x 9000 pixels (under PIL's own limit).
  bomb = tmp_path / "bomb.png"
  bomb.write_bytes(_png_header(9000, 9000))
  for path, reason in ((disguised, "not an image in an allowed format"),
                       (bomb, "9000x9000 image is above MAX_IMAGE_PIXELS")):
    with pytest.raises(sources.BadRecordError, match=f"{path.name}: {reason}"):
      sources.load_clip(dict(path=str(path), kind="image"), 1, "uniform", 1, None)


def test_in_memory_images_of_other_dtypes_convert_when_unambiguous():
  expected = np.array([[0, 255]], np.uint8)[..., None]
  for image in (np.array([[False, True]]), np.array([[0, 65535]], np.uint16),
                np.array([[0.0, 1.0]], np.float32)):
    converted = sources.to_uint8_image(image, "tfds:x/train record 3")
    assert converted.dtype == np.uint8
    np.testing.assert_array_equal(converted, expected)
  np.testing.assert_array_equal(
    sources.to_uint8_image(np.array([[[0.5]]], np.float16), "r"), [[[128]]])
  for image, reason in ((np.array([[0.0, 2.0]]), "float64 image with values outside"),
                        (np.array([[np.nan]], np.float32), "float32 image with values outside"),
                        (np.array([[0, 300]], np.int32), "int32 image: expected")):
    with pytest.raises(sources.BadRecordError, match=f"tfds:x/train record 3: {reason}"):
      sources.to_uint8_image(image, "tfds:x/train record 3")


def test_tfds_mnist_images_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  spec = config_lib.SourceSpec.from_dict("mnist", dict(type="tfds", name="mnist", split="train"))
  cfg = data_config.DataConfig(sources=(spec,), frames=(1,), bucket_weights=(1,),
                            tokens_per_batch=4 * 16, image_size=16, patch_size=4)
  with tfds.testing.mock_data(num_examples=12):
    source = sources.build_source(spec)
    assert len(source) == 12 and source[0]["frames"].shape == (1, 28, 28, 1)
    ds = pipeline.build_train_dataset(cfg, sources={"mnist": source}, process_index=0,
                                      process_count=1)
    batch = next(iter(ds))
  assert batch["frames"].shape == (4, 1, 16, 16, 3) and "boxes" not in batch
  assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()


def test_tfds_detection_boxes_under_mock_data():
  # coco/2017's builder imports TensorFlow, so the boxes path is tested on voc/2007 (same
  # objects/bbox + objects/label layout).
  tfds = pytest.importorskip("tensorflow_datasets")
  spec = config_lib.SourceSpec.from_dict("voc", dict(
    type="tfds", name="voc/2007", split="train", label_key=None, boxes_key="objects/bbox",
    box_labels_key="objects/label"))
  cfg = data_config.DataConfig(sources=(spec,), frames=(1,), bucket_weights=(1,),
                            tokens_per_batch=2 * 16, image_size=16, patch_size=4, max_boxes=3)
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    source = sources.build_source(spec)
    record = source[0]
    ds = pipeline.build_train_dataset(cfg, sources={"voc": source}, process_index=0,
                                      process_count=1)
    batches = list(itertools.islice(iter(ds), 3))
  assert record["boxes"].shape[1:] == (4,) and record["label"] == -1
  for batch in batches:
    assert batch["boxes"].shape == (2, 3, 4) and batch["box_labels"].shape == (2, 3)
    boxes = batch["boxes"][batch["box_mask"]]
    assert ((0 <= boxes) & (boxes <= 1)).all()


def test_tfds_prepared_directory_with_boxes(tmp_path):
  """The coco/2017 route without TensorFlow: read a prepared dataset from its folder."""
  tfds = pytest.importorskip("tensorflow_datasets")

  class DetectionForTest(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "objects": tfds.features.Sequence({
          "bbox": tfds.features.BBoxFeature(),
          "label": tfds.features.ClassLabel(num_classes=5)})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(4):
        yield i, {"image": Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)),
                  "objects": {"bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)] * i,
                              "label": [i] * i}}

  builder = DetectionForTest(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  spec = config_lib.SourceSpec.from_dict("det", dict(
    type="tfds", name="detection_for_test", split="train", builder_dir=str(builder.data_dir),
    label_key=None, boxes_key="objects/bbox", box_labels_key="objects/label"))
  source = sources.build_source(spec)
  assert len(source) == 4
  # TFDS shuffles records when preparing; record i's image value says how many boxes it has.
  counts = [int(source[i]["frames"][0, 0, 0, 0]) // 40 for i in range(4)]
  assert sorted(counts) == [0, 1, 2, 3]
  for i, n in enumerate(counts):
    assert source[i]["frames"].shape == (1, 20, 30, 3) and source[i]["boxes"].shape == (n, 4)
  cfg = data_config.DataConfig(sources=(spec,), frames=(1,), bucket_weights=(1,),
                            tokens_per_batch=4 * 16, image_size=16, patch_size=4, max_boxes=2,
                            transform=data_config.TransformConfig(16, augment=False))
  batch = next(iter(pipeline.build_eval_dataset(cfg, 1, 4, sources={"det": source},
                                                process_index=0, process_count=1)))
  kept = [min(n, 2) for n in counts]
  assert batch["box_mask"].sum(1).tolist() == kept
  for labels, n, k in zip(batch["box_labels"], counts, kept):
    assert labels[:k].tolist() == [n] * k
