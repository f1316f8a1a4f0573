"""Test set-up: 8 fake CPU devices, so sharded code runs on a real mesh in every test, compiled
without LLVM's optimisations (`helpers.FAST_COMPILE`); and one persistent XLA compilation cache
for the whole run.

Most tests train, extract or export with the same tiny configs, in-process or through
`python -m univit_jax.main`; JAX's cache (keyed by the program, the flags and the versions) lets
every identical program after the first load instead of compile. The folder is made here, in the
process that starts the run, so that pytest-xdist workers and the subprocesses tests start
inherit it through `JAX_COMPILATION_CACHE_DIR`; it is removed when that process exits. Tests of
the cache's own placement unset the variable.
"""

import atexit
import os
import shutil
import tempfile

import helpers

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + helpers.xla_flags(8)).strip()

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="univit_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  # Cache every program, however quickly it compiled: the tiny configs' steps take < 1 s each.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
