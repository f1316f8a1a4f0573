"""Input pipeline throughput: images and 8 / 16-frame clips with 0, 1 and 2 grain workers.

  python benchmarks/input_pipeline.py [--workers=0,1,2] [--batches=8]

Writes synthetic JPEG images and H.264 clips (PyAV, libx264) to a temporary folder, reads them
through `build_train_dataset` (decode, sample, random resized crop, flip, jitter, normalise,
batch) and reports samples/s and frames/s per configuration, after a warm-up batch that also
absorbs worker start-up. It also times raw decoding per frame (PIL for JPEG, PyAV for H.264,
without the pipeline). Prints a table and writes benchmarks/results/input_pipeline.json.
"""

import os
import tempfile
import time

import numpy as np
from absl import app, flags

import synthetic  # benchmarks/synthetic.py  # pylint: disable=import-error
import machine  # benchmarks/machine.py  # pylint: disable=import-error
from univit_jax import atomic, config_lib
from univit_jax.data import pipeline, sources, video
from univit_jax.run_config import data_config

FLAGS = flags.FLAGS
flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to measure")
flags.DEFINE_integer("batches", 8, "timed batches per configuration (after 1 warm-up batch)")
flags.DEFINE_integer("image_size", 112, "model input side")
flags.DEFINE_integer("source_size", 256, "side of the stored images and clips")
flags.DEFINE_integer("num_images", 256, "JPEG images written")
flags.DEFINE_integer("num_clips", 24, "H.264 clips written")
flags.DEFINE_integer("clip_frames", 48, "frames per clip (25 fps)")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results",
                                        "input_pipeline.json"), "JSON results path")

# Configurations: (name, source, frames per example, batch size).
RUNS = (("images", "images", 1, 32), ("clips-8f", "clips", 8, 8), ("clips-16f", "clips", 16, 4))


def write_data(folder: str, rng: np.random.Generator) -> tuple[str, str]:
  """Writes the images and clips; returns their folders."""
  size = FLAGS.source_size
  return (synthetic.write_images(os.path.join(folder, "images"), rng, FLAGS.num_images, size),
          synthetic.write_clips(os.path.join(folder, "clips"), rng, FLAGS.num_clips, size,
                                FLAGS.clip_frames))


def decode_times(images: str, clips: str) -> dict[str, float]:
  """Milliseconds per decoded frame: JPEG with PIL, every frame of the clips with PyAV."""
  paths = sorted(os.listdir(images))[:64]
  start = time.perf_counter()
  for p in paths:
    sources.read_image(os.path.join(images, p))
  jpeg = (time.perf_counter() - start) / len(paths) * 1e3
  start, frames = time.perf_counter(), 0
  for p in sorted(os.listdir(clips)):
    clip, _ = video.read_clip(os.path.join(clips, p), FLAGS.clip_frames, "uniform", 1, None)
    frames += len(clip)
  h264 = (time.perf_counter() - start) / frames * 1e3
  return dict(jpeg_ms_per_image=jpeg, h264_ms_per_frame=h264)


def measure(folder: str, kind: str, num_frames: int, batch: int, workers: int) -> dict:
  spec = config_lib.SourceSpec.from_dict(kind, dict(
    type="image_folder" if kind == "images" else "video_folder", path=folder))
  patch = 16 if FLAGS.image_size % 16 == 0 else 8
  tokens = num_frames * (FLAGS.image_size // patch) ** 2 * batch
  cfg = data_config.DataConfig(
    sources=(spec,), frames=(num_frames,), bucket_weights=(1,), tokens_per_batch=tokens,
    image_size=FLAGS.image_size, patch_size=patch,
    transform=data_config.TransformConfig(FLAGS.image_size), worker_count=workers)
  it = iter(pipeline.build_train_dataset(cfg, process_index=0, process_count=1))
  start = time.perf_counter()
  next(it)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    next(it)
  elapsed = time.perf_counter() - start
  it.close()
  samples = FLAGS.batches * batch / elapsed
  return dict(workers=workers, frames=num_frames, batch=batch, samples_per_s=samples,
              frames_per_s=samples * num_frames, first_batch_s=first)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    images, clips = write_data(tmp, rng)
    decode = decode_times(images, clips)
    for workers in (int(w) for w in FLAGS.workers):
      for name, kind, num_frames, batch in RUNS:
        folder = images if kind == "images" else clips
        results.append(dict(name=name, **measure(folder, kind, num_frames, batch, workers)))
  print(f"decode: JPEG {FLAGS.source_size}px {decode['jpeg_ms_per_image']:.2f} ms/image, "
        f"H.264 {FLAGS.source_size}px {decode['h264_ms_per_frame']:.2f} ms/frame")
  print(f"{'config':<10} {'workers':>7} {'batch':>5} {'samples/s':>10} {'frames/s':>9} "
        f"{'1st batch s':>11}")
  for r in results:
    print(f"{r['name']:<10} {r['workers']:>7} {r['batch']:>5} {r['samples_per_s']:>10.1f} "
          f"{r['frames_per_s']:>9.1f} {r['first_batch_s']:>11.2f}")
  atomic.write_json(FLAGS.out, dict(
    machine=machine.describe(),
    settings=dict(image_size=FLAGS.image_size, source_size=FLAGS.source_size,
                  clip_frames=FLAGS.clip_frames, batches=FLAGS.batches),
    decode=decode, runs=results))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
