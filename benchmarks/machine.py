"""What a benchmark ran on: the CPU's model and vector units, its cores, its load, the versions.

The development VMs differ from session to session: a 2-core AVX-512 Intel VM measured a float32
matmul peak of 0.32 TFLOP/s, a 2-core AVX2 AMD EPYC VM 0.11. Every result JSON names its machine
with `describe()`, so figures from different CPUs are never read as one series.
"""

import os
import platform
import sys
from typing import Any

# The vector extensions that decide XLA:CPU's and oneDNN's matmul speed, as /proc/cpuinfo names them.
_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _cpuinfo() -> dict[str, str]:
  """The first processor's `key: value` lines of /proc/cpuinfo ({} where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      block = f.read().split("\n\n", 1)[0]
  except OSError:
    return {}
  fields = (line.split(":", 1) for line in block.splitlines() if ":" in line)
  return {key.strip(): value.strip() for key, value in fields}


def describe() -> dict[str, Any]:
  """The machine a benchmark runs on, for its result JSON."""
  info = _cpuinfo()
  flags = set(info.get("flags", "").split())
  versions = {name: sys.modules[name].__version__ for name in ("numpy", "jax", "torch")
              if name in sys.modules}
  return dict(
    platform=platform.platform(),
    cpu_model=info.get("model name") or platform.processor() or platform.machine(),
    cpus=os.cpu_count(),
    vector_flags=[f for f in _VECTOR_FLAGS if f in flags],
    load_average=[round(x, 2) for x in os.getloadavg()],
    python=platform.python_version(),
    versions=versions)
