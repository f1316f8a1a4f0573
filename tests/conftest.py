"""Test set-up: 8 fake CPU devices, so sharded code runs on a real mesh in every test."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
