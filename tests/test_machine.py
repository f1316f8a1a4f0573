"""benchmarks/machine.py: every result JSON names the CPU it was measured on."""

import json
import os
import sys

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import machine  # noqa: E402  # pylint: disable=wrong-import-position


def test_describe_names_this_cpu_and_its_vector_units():
  info = machine.describe()
  json.dumps(info)  # goes into result JSONs as it is
  assert info["cpus"] == os.cpu_count()
  cpuinfo = machine._cpuinfo()  # pylint: disable=protected-access
  if cpuinfo:  # Linux
    assert info["cpu_model"] == cpuinfo["model name"]
    flags = set(cpuinfo["flags"].split())
    assert set(info["vector_flags"]) == flags & set(machine._VECTOR_FLAGS)  # pylint: disable=protected-access
  assert len(info["load_average"]) == 3


def test_versions_are_those_of_loaded_packages_only():
  import numpy as np  # pylint: disable=import-outside-toplevel
  versions = machine.describe()["versions"]
  assert versions["numpy"] == np.__version__
  assert set(versions) <= {"numpy", "jax", "torch"}
