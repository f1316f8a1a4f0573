"""Input stalls of training on decoded H.264 clips and JPEG images, with 0 and 2 grain workers.

  PYTHONPATH=. python benchmarks/input_stalls.py [--settings=0,2] [--steps=40] [--repeats=2]

Issue 12's target: training on decoded video with 2 grain workers stalls < 5% of the step time.
Writes JPEG images and H.264 clips (`synthetic`, 256 px, 48 frames at 25 fps) and random cluster
outputs for them, then trains a small config (ViT-Ti/16 at 112 px, scanned blocks, f32; a
1-frame bucket fed by the images and an 8-frame bucket fed by the clips, equal token budgets and
weights, the default random resized crop, flip and colour jitter) with the real training loop
(`loop.run_train`), one metrics record a step. Per step the loop logs the time it waited for the
next host batch (`data_wait_s`) and assembling it on the device (`to_device_s`) against the
step's wall time (`step_time_s`); the stall fraction is their sum over the step time, reported
per setting and bucket as the median over steps and as the total (sum of waits over sum of step
times), after the first `--skip` steps (warm-up; the first batch is read before the buckets
compile, so the workers start with full buffers and the first steps understate steady stalls).

A setting is `<workers>[:<worker_buffer_size>[:<read_threads>]]` (defaults 2 and 2, the config's).
Settings run back to back in one process, `--repeats` times in turn, sharing one persistent
compilation cache, so only the first run compiles cold. `--breakdown` also times the pipeline's
stages on one batch of each bucket in this process: decode, crop / resize / flip / jitter /
normalise, batching, and the host-to-device copy of float32 frames against uint8 ones.

On a CPU-only machine the step runs on the same cores as the decoding: with 2 workers on 2 cores
the workers take cycles from the step (slowing it) rather than idling an accelerator, so the
figure measures how much decoding the cores can hide, not only the pipeline's overlap.

Writes benchmarks/results/input_stalls.json (with the 1-minute load average at each run's start
and end).
"""

import os
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging

import synthetic  # benchmarks/synthetic.py  # pylint: disable=import-error
import machine  # benchmarks/machine.py  # pylint: disable=import-error
from univit_jax import atomic, config_lib, run_config, sharding
from univit_jax.data import pipeline, sources, streams, transforms
from univit_jax.train import logs, loop

FLAGS = flags.FLAGS
flags.DEFINE_list("settings", ["0", "2"],
                  "grain settings: workers[:worker_buffer_size[:read_threads]]")
flags.DEFINE_integer("steps", 40, "training steps per run")
flags.DEFINE_integer("skip", 4, "first steps of each run left out of the statistics")
flags.DEFINE_integer("repeats", 2, "rounds over the settings (alternating, to spread drift)")
flags.DEFINE_string("variant", "Ti/16", "model size / patch")
flags.DEFINE_integer("image_size", 112, "model input side")
flags.DEFINE_integer("clip_frames", 8, "frames of the clip bucket")
flags.DEFINE_integer("image_batch", 32, "images a step (the clips get the same token budget)")
flags.DEFINE_integer("source_size", 256, "side of the stored images and clips")
flags.DEFINE_integer("num_images", 256, "JPEG images written")
flags.DEFINE_integer("num_clips", 48, "H.264 clips written")
flags.DEFINE_integer("stored_frames", 48, "frames per stored clip (25 fps)")
flags.DEFINE_bool("breakdown", True, "also time the pipeline's stages in this process")
flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results",
                                        "input_stalls.json"), "JSON results path")

CLUSTERS = 1024


def parse_setting(text: str) -> dict[str, int]:
  """`workers[:worker_buffer_size[:read_threads]]` -> the `config.data` fields it sets."""
  parts = [int(p) for p in text.split(":")]
  defaults = [0, 2, 2]
  workers, buffer, threads = parts + defaults[len(parts):]
  return dict(worker_count=workers, worker_buffer_size=buffer, read_threads=threads)


def make_config(images: str, clips: str, cache: str) -> ml_collections.ConfigDict:
  """The small training config: Ti/16 at 112 px on the JPEG and H.264 folders (docstring)."""
  c = config_lib.default_config(FLAGS.variant)
  c.mode = "train"
  c.model.scan = True
  c.data.image_size = FLAGS.image_size
  c.data.frames = (1, FLAGS.clip_frames)
  c.data.bucket_weights = (1, 1)
  per_frame = config_lib.tokens_per_frame(FLAGS.image_size, c.model.patch_size)
  c.data.tokens_per_batch = FLAGS.image_batch * per_frame
  c.data.sources = ml_collections.ConfigDict(dict(
    images=dict(type="image_folder", path=images, frames=(1,)),
    clips=dict(type="video_folder", path=clips, frames=(FLAGS.clip_frames,))))
  c.optim.warmup_steps = 10
  c.total_steps = FLAGS.steps
  c.train.log_every = 1
  c.train.checkpoint_every = 10 * FLAGS.steps  # one save, at the end
  c.train.compilation_cache_dir = cache
  c.train.progress_bar = False
  return c


def stall_stats(records: list[dict]) -> dict[str, float]:
  """Median and total stall fraction, and the median times, of per-step metrics records."""
  waits = [r["data_wait_s"] + r["to_device_s"] for r in records]
  steps = [r["step_time_s"] for r in records]
  return dict(
    steps=len(records), stall_median=statistics.median(w / s for w, s in zip(waits, steps)),
    stall_total=sum(waits) / sum(steps), step_time_median_s=statistics.median(steps),
    data_wait_median_s=statistics.median(r["data_wait_s"] for r in records),
    to_device_median_s=statistics.median(r["to_device_s"] for r in records),
    wait_max_s=max(waits))


def train_once(config: ml_collections.ConfigDict, setting: dict[str, int]) -> dict:
  """Trains `config` with the grain `setting` in a fresh workdir; returns the stall statistics
  per bucket and over all steps, with wall time and load averages."""
  for key, value in setting.items():
    config.data[key] = value
  run = run_config.build(config, jax.device_count())
  load_start = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as workdir:
    synthetic.write_random_clusters(workdir, run, CLUSTERS)
    start = time.perf_counter()
    compile_s = loop.run_train(run, workdir).compile_s
    wall = time.perf_counter() - start
    records = logs.read_metrics(workdir)
  timed = records[FLAGS.skip:]
  by_bucket = {t: stall_stats([r for r in timed if r["frames"] == t])
               for t in sorted({int(r["frames"]) for r in timed})}
  return dict(setting=setting, load_1min_start=load_start, load_1min_end=os.getloadavg()[0],
              compile_s=compile_s, wall_s=wall, first_step_wait_s=records[0]["data_wait_s"],
              all=stall_stats(timed), buckets=by_bucket,
              per_step=[dict(frames=int(r["frames"]), step_time_s=r["step_time_s"],
                             data_wait_s=r["data_wait_s"], to_device_s=r["to_device_s"])
                        for r in records])


def _timed(fn, *args):
  """`fn(*args)` and the seconds it took."""
  start = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - start


def stage_breakdown(run: run_config.RunConfig, num_frames: int, batch_size: int) -> dict:
  """Seconds one batch of the `num_frames` bucket spends in each stage, in this process: decode,
  transforms (each example's crop / resize / flip / jitter / normalise), batching, and the copy
  to the device of its frames as float32 and, for comparison, as uint8."""
  cfg = run.data
  opened = pipeline.open_sources(cfg)
  names = [s.name for s in cfg.sources if num_frames in cfg.source_buckets(s)]
  source = opened[names[0]]
  rng = np.random.default_rng(0)
  decode = transform = 0.0
  examples = []
  for i in range(batch_size):
    record = source[i % len(source)]
    (frames, mask), seconds = _timed(sources.load_clip, record, num_frames, cfg.frame_sampling,
                                     cfg.frame_stride, rng)
    decode += seconds
    no_boxes = (np.zeros((0, 4), np.float32), np.zeros(0, bool))
    (frames, _, _), seconds = _timed(transforms.apply, frames, *no_boxes, cfg.transform, rng)
    transform += seconds
    examples.append(dict(frames=frames, frame_mask=mask, id=np.int64(i), label=np.int32(-1),
                         skipped=()))
  builder = streams.BatchBuilder(num_frames, cfg.image_size, cfg.patch_size, cfg.virtual_frames)
  batch, batching = _timed(builder, examples)
  target = sharding.batch_sharding(sharding.make_mesh(run.mesh), run.mesh.rules)
  copies = {}
  for dtype in (np.float32, np.uint8):
    frames = batch["frames"].astype(dtype)
    pipeline.to_global_batch(dict(frames=frames), target)["frames"].block_until_ready()
    seconds = []
    for _ in range(5):
      arrays, spent = _timed(pipeline.to_global_batch, dict(frames=frames), target)
      arrays["frames"].block_until_ready()
      seconds.append(spent)
    copies[np.dtype(dtype).name] = statistics.median(seconds)
  return dict(frames=num_frames, batch=batch_size, decode_s=decode, transforms_s=transform,
              batching_s=batching, to_device_float32_s=copies["float32"],
              to_device_uint8_s=copies["uint8"])


def _print_run(r: dict) -> None:
  s = r["setting"]
  name = f"{s['worker_count']}w buf{s['worker_buffer_size']} thr{s['read_threads']}"
  for t, b in [("all", r["all"])] + [(f"{t}f", b) for t, b in r["buckets"].items()]:
    print(f"{name:<16} {t:>4} {b['steps']:>5} {b['step_time_median_s']:>8.3f} "
          f"{b['data_wait_median_s']:>8.3f} {b['to_device_median_s']:>8.4f} "
          f"{100 * b['stall_median']:>8.1f}% {100 * b['stall_total']:>8.1f}%   "
          f"load {r['load_1min_start']:.2f}-{r['load_1min_end']:.2f}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  settings = [parse_setting(s) for s in FLAGS.settings]
  rng = np.random.default_rng(0)
  runs, breakdown = [], []
  with tempfile.TemporaryDirectory() as tmp:
    images = synthetic.write_images(os.path.join(tmp, "images"), rng, FLAGS.num_images,
                                    FLAGS.source_size)
    clips = synthetic.write_clips(os.path.join(tmp, "clips"), rng, FLAGS.num_clips,
                                  FLAGS.source_size, FLAGS.stored_frames)
    cache = os.path.join(tmp, "jax_cache")
    print(f"{'setting':<16} {'bkt':>4} {'steps':>5} {'step s':>8} {'wait s':>8} {'dev s':>8} "
          f"{'stall med':>9} {'stall tot':>9}")
    for _ in range(FLAGS.repeats):
      for setting in settings:
        runs.append(train_once(make_config(images, clips, cache), setting))
        _print_run(runs[-1])
    if FLAGS.breakdown:
      run = run_config.build(make_config(images, clips, cache), jax.device_count())
      sizes = run.data.batch_sizes(1)
      for t in run.data.frames:
        breakdown.append(stage_breakdown(run, t, sizes[t]))
        b = breakdown[-1]
        print(f"{t}-frame batch of {b['batch']}: decode {b['decode_s']:.3f} s, transforms "
              f"{b['transforms_s']:.3f} s, batching {b['batching_s']:.4f} s, to device "
              f"float32 {b['to_device_float32_s']:.4f} s / uint8 {b['to_device_uint8_s']:.4f} s")
  atomic.write_json(FLAGS.out, dict(
    machine=machine.describe(), devices=[str(d) for d in jax.devices()],
    settings=dict(variant=FLAGS.variant, image_size=FLAGS.image_size,
                  clip_frames=FLAGS.clip_frames, image_batch=FLAGS.image_batch,
                  source_size=FLAGS.source_size, stored_frames=FLAGS.stored_frames,
                  steps=FLAGS.steps, skip=FLAGS.skip, repeats=FLAGS.repeats),
    runs=runs, breakdown=breakdown))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
