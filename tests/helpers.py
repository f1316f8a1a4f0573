"""Shared test helpers: loading config files the way `--config=configs/<name>.py:arg` does."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
  """`configs/<name>.py:get_config(arg)`, as `--config=configs/<name>.py:arg` loads it."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_main(*args: str, devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs `python -m univit_jax.main ARGS` in a subprocess with `devices` fake CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "univit_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
