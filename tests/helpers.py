"""Shared test helpers: loading config files the way `--config=configs/<name>.py:arg` does and
typing them as `main` does, running `univit_jax.main`, starting several processes that form one
JAX job on localhost, writing small inputs (videos, a tiny pipeline's config file)."""

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  """`configs/<name>.py:get_config(arg)`, as `--config=configs/<name>.py:arg` loads it."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# configs/demo.py at the tests' scale: patch 8 and `tokens_per_batch` for every bucket (the demo's
# own patch 4 and 4x image budget leave 2-4 clips in the long buckets, which do not split over the
# tests' 8 devices; tests exercise the mechanics, the demo table the recipe). As `demo_config`
# sets them, for `run_main("--config=configs/demo.py", *DEMO_TEST_SCALE, ...)`.
DEMO_TEST_SCALE = ("--config.model.patch_size=8", "--config.data.bucket_tokens=()")


def demo_config():
  """configs/demo.py at the tests' scale (`DEMO_TEST_SCALE`)."""
  c = load_config("demo")
  c.model.patch_size = 8
  c.data.bucket_tokens = ()
  return c


def typed(config, num_devices: int | None = None):
  """`run_config.build(config, ...)`: the typed sections the stages take, as `main` builds them,
  for this process's devices (or `num_devices`)."""
  import jax  # pylint: disable=import-outside-toplevel
  from univit_jax import run_config  # pylint: disable=import-outside-toplevel
  return run_config.build(config, jax.device_count() if num_devices is None else num_devices)


def encode_video(path, num_frames: int, fps: int = 10, size: int = 64, rng=None) -> str:
  """Writes an H.264 (libx264, yuv420p) clip whose frame i has brightness 8 * i, or random pixels
  drawn from `rng` (a NumPy Generator) when given; returns its path."""
  import av  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for i in range(num_frames):
      frame = (np.full((size, size, 3), 8 * i, np.uint8) if rng is None else
               rng.integers(0, 256, (size, size, 3), np.uint8))
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  return str(path)


# XLA flags of every test process: the tiny programs compile about twice as fast without LLVM's
# optimisations, and run fast enough without them; at that level XLA:CPU's older loop emitters
# compile the train steps faster than its fusion emitters (the whole suite, `pytest -q -n 2`:
# 404 s -> 317 s on the 2-core VM, 2026-12-01; at the default level they compile slower, so only
# tests use them).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process with `devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def free_port() -> int:
  """A TCP port that is free on localhost now: the coordinator's, for `start_processes`."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(args: Sequence[str], processes: int = 2, devices: int = 1,
                    env: dict[str, str] | None = None) -> list[subprocess.Popen]:
  """Starts `python ARGS --process I --processes P --port PORT` for I in 0..P-1: one JAX job of
  P processes on localhost (the script calls `join_processes`), each with `devices` fake CPU
  devices and `env` added to the environment; stdout and stderr piped, as text."""
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **(env or {}))
  return [subprocess.Popen([sys.executable, *args, "--process", str(i), "--processes",
                            str(processes), "--port", str(port)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
          for i in range(processes)]


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags `start_processes` gives each process of a job (one process by default)."""
  parser.add_argument("--process", type=int, default=0)
  parser.add_argument("--processes", type=int, default=1)
  parser.add_argument("--port", type=int, default=0)


def join_processes(args: argparse.Namespace) -> None:
  """Joins this process to the job of `add_process_arguments`' flags, through the entry point's
  own start-up (`collectives.initialize`: gloo CPU collectives, the failure watcher); a no-op
  for one process. Call it before anything starts JAX's backends."""
  if args.processes > 1:
    from univit_jax import collectives  # pylint: disable=import-outside-toplevel
    collectives.initialize(f"127.0.0.1:{args.port}", args.processes, args.process)


def run_main(*args: str, devices: int = 1, timeout: int = 300, module: str = "univit_jax.main",
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """Runs `python -m univit_jax.main ARGS` (or another `module` taking its flags, e.g.
  `fake_store_main`) in a subprocess with `devices` fake CPU devices and `env` added to the
  environment."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


# A one-round pipeline small enough for a CPU test; `loss` keeps its defaults.
# configs/demo.py shrunk to a two-round pipeline that runs in well under a minute once compiled
# (tests/test_rounds.py, benchmarks/faults.py).
TINY_DEMO_PIPELINE = (
  *DEMO_TEST_SCALE, "--config.data.frames=(1,2)", "--config.data.bucket_weights=(1,1)",
  "--config.data.sources.digits.num_examples=32", "--config.data.sources.objects.num_examples=32",
  "--config.data.sources.events.num_examples=16", "--config.extract.batch_size=16",
  "--config.extract.clip_frames=4", "--config.extract.granularities=(1,2)",
  "--config.extract.pixels_fit_examples=32", "--config.extract.pixels_dim=16",
  "--config.cluster.num_clusters={'object': 8, 'event_1': 4, 'event_2': 4}",
  "--config.cluster.top_k=2", "--config.cluster.iterations=3",
  "--config.loss.bank_weights={'object': 1.0, 'event_1': 1.0, 'event_2': 1.0}",
  "--config.loss.event_schedule=((0.0, (1, 2)),)",
  "--config.total_steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
  "--config.train.progress_bar=False", "--config.optim.warmup_steps=1",
)

TINY_PIPELINE = """
import ml_collections
from univit_jax import config_lib


def get_config(arg=None):
  c = config_lib.default_config("mu/8")
  c.mode = "pipeline"
  c.data.image_size = 32
  c.data.tokens_per_batch = 16 * 16
  c.data.read_threads = 1
  c.data.sources = ml_collections.ConfigDict({sources!r})
  c.extract.batch_size = 16
  c.extract.clip_frames = 8
  c.extract.pixels_dim = 8
  c.extract.pixels_fit_examples = 16
  c.extract.proposal_grids = (2,)
  c.cluster.num_clusters = dict(object=4, event_1=4, event_2=4, event_4=4, event_8=4)
  c.cluster.top_k = 2
  c.cluster.iterations = 2
  c.optim.warmup_steps = 1
  c.total_steps = 2
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.progress_bar = False
  return c
"""


def write_tiny_config(folder, sources: dict) -> str:
  """A config file of a tiny one-round pipeline over `sources` (`data.sources` entries)."""
  path = folder / "tiny_config.py"
  path.write_text(TINY_PIPELINE.format(sources=sources))
  return str(path)
