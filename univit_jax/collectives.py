"""Host-side collectives across JAX processes: gathers, sums, a vote and a barrier.

Every exchange of NumPy values between processes outside jitted code goes through here
(clustering, extraction, embedding, exports, the train loop), so each is written once, with its
one-process shortcut, and a change in `jax.experimental.multihost_utils` touches one file. It
imports nothing of the package, so every layer may use it (docs/architecture.md, "Imports").
Every process must make the same calls in the same order, with the same shapes.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils


def gather(x: jax.Array | np.ndarray) -> np.ndarray:
  """The whole of a global array, on every process, as NumPy (an all-gather across processes
  when it spans several; every process must call this). NumPy input is returned as it is."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_local(x: np.ndarray) -> np.ndarray:
  """Host-local arrays `[n, ...]` of every process concatenated in process order
  (`[n * process_count, ...]`): the order of the rows of a global batch built from them
  (`data.pipeline.to_global_batch`). Every process must call this."""
  if jax.process_count() == 1:
    return np.asarray(x)
  gathered = multihost_utils.process_allgather(np.asarray(x))
  return np.asarray(gathered).reshape(-1, *np.shape(x)[1:])


def sum_across_processes(x: np.ndarray) -> np.ndarray:
  """Sum over processes of a float64 or integer array, the same on every process.

  float64 is sent as a float32 (high, low) pair, since JAX runs without x64 by default.
  """
  if jax.process_count() == 1:
    return x
  if x.dtype == np.float64:
    high = x.astype(np.float32)
    low = (x - high).astype(np.float32)
    parts = np.asarray(multihost_utils.process_allgather(np.stack([high, low])), np.float64)
    return parts.sum(axis=(0, 1))
  return np.asarray(multihost_utils.process_allgather(x.astype(np.int32))).astype(x.dtype).sum(0)


def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (the same answer on every process)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def barrier(name: str) -> None:
  """Waits for every process to reach the barrier `name` (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
