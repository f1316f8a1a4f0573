"""Synthetic inputs the benchmarks share: encoded media, and random cluster outputs.

`write_images` / `write_clips` write JPEG images and H.264 clips (PyAV, libx264, yuv420p) of
smooth colourful pictures with some texture, which compress like photos rather than like noise,
so decoding costs what it costs on real media. `write_random_clusters` writes the cluster
stage's outputs (random centroids and top-k labels) for every record of a run's sources, so
`--mode=train` can run without extracting and clustering first.
"""

import os

import av
import numpy as np
from PIL import Image

from univit_jax import run_config
from univit_jax.clustering import labels as cluster_labels
from univit_jax.data import pipeline


def picture(rng: np.random.Generator, size: int, phase: float = 0.0) -> np.ndarray:
  """A uint8 `[size, size, 3]` picture: sinusoidal colour fields (moving with `phase`) plus
  Gaussian noise."""
  y, x = np.mgrid[0:size, 0:size] / size
  base = np.stack([np.sin(6 * x + phase), np.cos(5 * y - phase), np.sin(4 * (x + y))], -1)
  noise = rng.normal(0, 0.1, (size, size, 3))
  return np.clip((base + 1) * 110 + noise * 255, 0, 255).astype(np.uint8)


def write_images(folder: str, rng: np.random.Generator, count: int, size: int) -> str:
  """Writes `count` JPEG images (quality 90) of `size` px into `folder` (created); returns it."""
  os.makedirs(folder)
  for i in range(count):
    Image.fromarray(picture(rng, size, i)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
  return folder


def write_clips(folder: str, rng: np.random.Generator, count: int, size: int,
                num_frames: int, fps: int = 25) -> str:
  """Writes `count` H.264 mp4 clips of `num_frames` frames of `size` px into `folder` (created),
  the picture's phase moving 1/8 a frame; returns it."""
  os.makedirs(folder)
  for i in range(count):
    with av.open(os.path.join(folder, f"{i}.mp4"), "w") as container:
      stream = container.add_stream("libx264", rate=fps)
      stream.width = stream.height = size
      stream.pix_fmt = "yuv420p"
      for t in range(num_frames):
        frame = av.VideoFrame.from_ndarray(picture(rng, size, i + t / 8), format="rgb24")
        container.mux(stream.encode(frame))
      container.mux(stream.encode())
  return folder


def write_random_clusters(workdir: str, run: run_config.RunConfig, num_clusters: int,
                          top_k: int = 10, regions: int = 0) -> None:
  """Random unit centroids and top-k labels for every record of the run's sources, in the
  cluster stage's file format under `workdir/clusters/<bank>/`.

  Videos get a row per segment of every event bank the loss weights (`event_<g>`: g rows),
  images a whole-image row (-1) and `regions` region rows for the object bank.
  """
  rng = np.random.default_rng(0)
  cfg = run.data
  opened = pipeline.open_sources(cfg)
  sources = pipeline.sources_fingerprint(cfg, opened)  # what the cluster stage records
  keys = pipeline.example_keys(cfg, opened)
  rows = {bank: [] for bank, _ in run.loss.bank_weights}
  events = [bank for bank in rows if bank.startswith("event_")]
  offset = 0
  for spec in cfg.sources:
    n = len(opened[spec.name])
    ids = np.arange(offset, offset + n)
    offset += n
    if spec.is_video:
      for bank in events:
        rows[bank] += [(i, s) for i in ids for s in range(int(bank[len("event_"):]))]
    elif "object" in rows:
      rows["object"] += [(i, s) for i in ids for s in range(-1, regions)]
  for bank, ids in rows.items():
    labels = np.argsort(rng.random((len(ids), num_clusters)), axis=1)[:, :top_k]
    cluster_labels.write_clusters(
      workdir, bank, centroids=cluster_labels.random_centroids(rng, num_clusters, run.model.width),
      labels=labels, ids=ids, keys=keys[np.asarray(ids, np.int64)[:, 0]],
      stats=dict(bank=bank, version="random", inputs=dict(data=dict(sources=sources))))
