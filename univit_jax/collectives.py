"""Host-side collectives across JAX processes: start-up, gathers, sums, a vote, a barrier, and
ending every process when one fails.

Every exchange of values between processes outside jitted code goes through here (clustering,
extraction, embedding, exports, the train loop, `main`'s error reporting), so each is written
once, with its one-process shortcut, and a change in `jax.experimental.multihost_utils` or the
distributed runtime touches one file. It imports nothing of the package, so every layer may use
it (docs/architecture.md, "Imports"). Every process must make the same calls in the same order,
with the same shapes (`abort_all` excepted: one process calls it alone).
"""

import atexit
import json
import os
import sys
import threading
import time
from typing import NoReturn

import jax
import numpy as np
# The coordination service's client (its key-value store) has no public handle; Orbax and JAX's
# own compilation-cache sharing reach it the same way.
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

# Coordination-service keys: process i's watcher waits on _FAILURE_KEY + str(i), and answers on
# _ACK_KEY + str(i) once it has printed the failure.
_FAILURE_KEY = "univit/failure/"
_ACK_KEY = "univit/failure_ack/"
# How long one wait of a watcher lasts (it waits again after), and how long a failing process
# waits for the others' acknowledgements before it exits anyway.
_WATCH_MS = 60_000
_ACK_WAIT_MS = 10_000
_SERVICE_GRACE_S = 1.0
# A process that sends no heartbeat for this long is taken as dead, and the coordination service
# ends every other process (JAX's default is 100 s); `UNIVIT_HEARTBEAT_TIMEOUT_S` overrides it.
HEARTBEAT_TIMEOUT_S = 10
HEARTBEAT_ENV = "UNIVIT_HEARTBEAT_TIMEOUT_S"


def heartbeat_timeout_s() -> int:
  """The heartbeat timeout: `$UNIVIT_HEARTBEAT_TIMEOUT_S` if set, else HEARTBEAT_TIMEOUT_S.

  Raises:
    ValueError: the variable is set to anything but a positive whole number of seconds.
  """
  value = os.environ.get(HEARTBEAT_ENV, str(HEARTBEAT_TIMEOUT_S))
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f"{HEARTBEAT_ENV}={value!r}: expected a positive whole number of seconds")
  return int(value)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """`jax.distributed.initialize` (arguments as there; None: discovered, e.g. on a Cloud TPU
  slice or in a SLURM job), then, with several processes, this process's failure watcher.

  CPU collectives go over gloo, so that several CPU processes (a CPU cluster, the multi-process
  tests) can run a jitted program together; accelerators keep their own. Without the watcher a
  process that fails leaves the others waiting in their next collective until the coordination
  service's timeouts (minutes): see `abort_all`. A process that dies without a word (SIGKILL,
  a lost host) stops sending heartbeats: after `heartbeat_timeout_s()` the coordination service
  ends every other process, whose log then names it (`The following tasks are unhealthy
  (stopped sending heartbeats): <process>`); process 0's own death is seen by the watchers.

  Raises:
    ValueError: a bad `$UNIVIT_HEARTBEAT_TIMEOUT_S` (`heartbeat_timeout_s`).
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s())
  if jax.process_count() > 1:
    _start_watcher(jax_distributed.global_state.client, jax.process_index())


def _start_watcher(client, me: int) -> None:
  """Starts the thread that ends this process as soon as another one calls `abort_all`, and
  stops it (waking its wait through its own key) before `jax.distributed.shutdown` runs at exit:
  a wait still pending at shutdown aborts the process. (atexit runs handlers in reverse order,
  and JAX registered its shutdown when it was imported, before this.)"""
  key = _FAILURE_KEY + str(me)

  def watch() -> None:
    while True:
      try:
        payload = client.blocking_key_value_get(key, _WATCH_MS)
      except Exception as e:  # pylint: disable=broad-except
        if "DEADLINE_EXCEEDED" in str(e):
          continue
        if stopping.is_set():
          return
        # The coordination service cannot be reached (process 0, which runs it, has died): end
        # now rather than in a collective that cannot complete.
        _exit(1, f"Process {me}: lost the coordination service, ending: "
                 f"{str(e).splitlines()[0]}")
      failure = json.loads(payload)
      if failure is None:  # the stop written at exit
        return
      # Printed before acknowledging: once acknowledged, the failing process exits, and if it
      # ran the coordination service, JAX aborts this process as soon as it notices.
      _print(f"Ending: process {failure['process']} of {jax.process_count()} failed: "
             f"{failure['message']}")
      try:
        client.key_value_set(_ACK_KEY + str(me), "")
      except Exception:  # pylint: disable=broad-except
        pass  # the failing process has gone already
      _exit(failure["code"])

  def stop() -> None:
    stopping.set()
    try:
      client.key_value_set(key, "null")
    except Exception:  # pylint: disable=broad-except
      return  # a failure arrived first: the watcher is ending this process
    thread.join()

  stopping = threading.Event()
  thread = threading.Thread(target=watch, name="univit-failure-watcher", daemon=True)
  thread.start()
  atexit.register(stop)


def multi_process() -> bool:
  """Whether this process is one of several (`initialize`; False before it)."""
  return jax.distributed.is_initialized() and jax.process_count() > 1


def abort_all(message: str, code: int) -> None:
  """Ends every process of a multi-process run because this one failed with `message`.

  Each other process's watcher (`initialize`) prints `Ending: process P of N failed: <message>`
  and exits with `code` at once, wherever its main thread is (a collective, a jitted step);
  this process waits for their acknowledgements (at most `_ACK_WAIT_MS`; process 0, whose exit
  takes the coordination service with it, `_SERVICE_GRACE_S` more) and exits with `code`. All
  skip the interpreter's teardown, whose `jax.distributed.shutdown` would wait for processes
  stuck in a collective. The caller prints `message` first. Returns at once (doing nothing) in
  a one-process run.
  """
  if not multi_process():
    return
  client, me = jax_distributed.global_state.client, jax.process_index()
  others = [p for p in range(jax.process_count()) if p != me]
  payload = json.dumps(dict(process=me, code=code, message=message))
  for p in others:
    try:
      client.key_value_set(_FAILURE_KEY + str(p), payload)
    except Exception:  # pylint: disable=broad-except
      pass  # p stopped its watcher (it has ended), or another failure reached it first
  for p in others:
    try:
      client.blocking_key_value_get(_ACK_KEY + str(p), _ACK_WAIT_MS)
    except Exception:  # pylint: disable=broad-except
      break  # gone or stuck: exit anyway
  if me == 0:
    # The coordination service goes with this process: give the others the moment from their
    # acknowledgement to their own exit, or JAX aborts them first (exit 134 instead of `code`).
    time.sleep(_SERVICE_GRACE_S)
  _exit(code)


def _print(line: str) -> None:
  print(line, file=sys.stderr)
  sys.stderr.flush()


def _exit(code: int, line: str | None = None) -> NoReturn:
  """Prints `line` (if any) to stderr and exits with `code`, without the interpreter teardown."""
  if line is not None:
    _print(line)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


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
