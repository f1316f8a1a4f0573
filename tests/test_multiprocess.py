"""Two JAX processes on localhost (CPU collectives over gloo, one device each) train the tiny
config as one job: they end with the parameters of one process with both devices on the same
global batches, resume after both are killed, and an error in one ends both at once.

The processes run `tests/train_worker.py` (`helpers.start_processes`). Process 1 of a CPU job
compiles every program itself (JAX writes the persistent cache from process 0 only, and the
processes' cache keys differ), so every phase costs about one cold compile of the tiny step.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import helpers
import numpy as np
import pytest
import train_fixtures

from univit_jax.clustering import store
from univit_jax.train import logs

WORKER = os.path.join(helpers.ROOT, "tests", "train_worker.py")
TIMEOUT = 300
STEPS = 4
MESSAGE = "injected failure in process 1 at step 1"
# "At once": well inside the coordination service's timeouts (100 s heartbeat, 300 s shutdown),
# with room for a loaded 2-core machine (a CI run beside a demo table took more than 5 s).
ENDS_AT_ONCE_S = 30


def _reports(out: str) -> list[dict]:
  return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _params(workdir: str) -> dict[str, np.ndarray]:
  with np.load(os.path.join(workdir, "params_0.npz")) as f:
    return dict(f)


def _data_state(workdir: str) -> dict:
  with open(os.path.join(workdir, "data_0.json")) as f:
    return json.load(f)


def _wait(procs: list[subprocess.Popen]) -> tuple[list[tuple[str, str]], list[float]]:
  """Waits for every process; returns their (stdout, stderr) and the time.time() each exited
  (to within 0.1 s). The pipes are drained by threads meanwhile, so no process blocks on a
  full pipe."""
  from concurrent import futures  # pylint: disable=import-outside-toplevel
  with futures.ThreadPoolExecutor(len(procs)) as pool:
    outputs = [pool.submit(p.communicate, timeout=TIMEOUT) for p in procs]
    ended = [None] * len(procs)
    deadline = time.monotonic() + TIMEOUT
    while None in ended:
      assert time.monotonic() < deadline, "processes still running"
      for i, p in enumerate(procs):
        if ended[i] is None and p.poll() is not None:
          ended[i] = time.time()
      time.sleep(0.1)
    return [o.result() for o in outputs], ended


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  """The reference (one process, two devices, reading the batches of a two-process job:
  `train_fixtures.batches_of_hosts`); a two-process job killed with SIGKILL (both processes)
  once checkpoint 2 exists; its restart, which finishes that run, then starts one in which
  process 1 raises at step 1."""
  dirs = {name: str(tmp_path_factory.mktemp(name)) for name in ("reference", "killed", "failed")}
  for workdir in dirs.values():
    train_fixtures.write_clusters(workdir)
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]  # the run's shared cache (conftest.py)
  # The reference runs beside the first job: each spends much of its time waiting (compiles of
  # the other process, steps' sleeps), so together they take less than one after the other.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=helpers.xla_flags(2))
  reference = subprocess.Popen(
    [sys.executable, WORKER, cache,
     json.dumps([dict(workdir=dirs["reference"], total_steps=STEPS, hosts=2)])],
    cwd=helpers.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  killed = helpers.start_processes(
    [WORKER, cache, json.dumps([dict(workdir=dirs["killed"], total_steps=STEPS, step_sleep=1.0)])])
  checkpoint = os.path.join(dirs["killed"], "checkpoints", "2")
  deadline = time.monotonic() + TIMEOUT
  while not os.path.isdir(checkpoint):
    assert all(p.poll() is None for p in killed), [p.communicate() for p in killed]
    assert time.monotonic() < deadline, "timed out waiting for checkpoint 2"
    time.sleep(0.05)
  for p in killed:
    p.send_signal(signal.SIGKILL)
  _wait(killed)
  (reference_out, reference_err), = _wait([reference])[0]
  assert reference.returncode == 0, reference_err[-4000:]

  restarted = helpers.start_processes([WORKER, cache, json.dumps([
    dict(workdir=dirs["killed"], total_steps=STEPS),
    dict(workdir=dirs["failed"], total_steps=STEPS,
         fail=dict(process=1, step=1, message=MESSAGE))])])
  outputs, ended = _wait(restarted)
  return dict(dirs=dirs, reference=_reports(reference_out)[0], killed=killed,
              restarted=restarted, outputs=outputs, ended=ended)


@pytest.mark.slow
def test_two_processes_killed_and_resumed_end_as_one_process_on_the_same_batches(jobs):
  dirs, outputs = jobs["dirs"], jobs["outputs"]
  assert [p.returncode for p in jobs["killed"]] == [-signal.SIGKILL] * 2
  assert jobs["reference"]["step"] == STEPS
  for out, err in outputs:
    assert _reports(out)[0]["step"] == STEPS, err[-4000:]
  assert [r["step"] for r in logs.read_metrics(dirs["killed"])] == list(range(1, STEPS + 1))
  reference, resumed = _params(dirs["reference"]), _params(dirs["killed"])
  assert reference.keys() == resumed.keys() and len(reference) > 20
  for key in reference:
    np.testing.assert_allclose(resumed[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Process 0 read host 0's batches of the reference, and stopped at the same place.
  assert _data_state(dirs["killed"]) == _data_state(dirs["reference"])["hosts"][0]


@pytest.mark.slow
def test_an_error_in_one_process_ends_both_at_once_with_its_message(jobs):
  (_, err0), (_, err1) = jobs["outputs"]
  raised = float(re.search(r"raising at ([\d.]+)", err1).group(1))
  assert [p.returncode for p in jobs["restarted"]] == [1, 1], (err0[-3000:], err1[-3000:])
  assert f"RuntimeError: {MESSAGE}" in err1  # its traceback, then the line every process prints
  assert f"Ending: process 1 of 2 failed: RuntimeError: {MESSAGE}" in err0
  # Process 0 was inside step 1 (its collectives wait for process 1) and ends at once, as
  # does process 1 once process 0 has acknowledged: not after the coordination service's
  # timeouts (100 s heartbeat, 300 s shutdown).
  assert max(jobs["ended"]) - raised < ENDS_AT_ONCE_S, (jobs["ended"], raised)
  assert not os.path.exists(os.path.join(jobs["dirs"]["failed"], "params_1.npz"))


@pytest.mark.slow
def test_an_error_in_process_0_which_runs_the_coordination_service_ends_both(tmp_path):
  """Process 0 raises on its first batch, before compiling; process 1 is then compiling, not yet
  in a collective. Process 0 waits for process 1's acknowledgement before it exits (and takes
  the coordination service with it), so process 1 still prints the message."""
  train_fixtures.write_clusters(str(tmp_path))
  procs = helpers.start_processes([WORKER, os.environ["JAX_COMPILATION_CACHE_DIR"], json.dumps([
    dict(workdir=str(tmp_path), total_steps=STEPS,
         fail=dict(process=0, step=0, message="injected failure in process 0"))])])
  ((_, err0), (_, err1)), ended = _wait(procs)
  raised = float(re.search(r"raising at ([\d.]+)", err0).group(1))
  assert [p.returncode for p in procs] == [1, 1], (err0[-3000:], err1[-3000:])
  assert "Ending: process 0 of 2 failed: RuntimeError: injected failure in process 0" in err1
  assert max(ended) - raised < ENDS_AT_ONCE_S, (ended, raised)


def _bank_rows(workdir, bank: str) -> tuple[np.ndarray, np.ndarray]:
  """A bank's (ids [N, 2], features [N, D]) ordered by id: the chunks of a job of P processes
  hold each host's share of every batch, in process order."""
  reader = store.BankReader(str(workdir), bank)
  ids, features = reader.ids(), np.concatenate(list(reader.rows(0, reader.num_rows)))
  order = np.lexsort((ids[:, 1], ids[:, 0]))
  return ids[order], features[order]


@pytest.mark.slow
def test_extraction_by_two_processes_equals_one_process(tmp_path):
  """`--mode=extract` (the pixels teacher) by a job of two processes, one device each, and by
  one process with two devices: every bank holds the same rows with the same features."""
  args = ["--config=configs/demo.py", "--mode=extract", "--config.extract.batch_size=8",
          "--config.data.sources.digits.num_examples=24",
          "--config.data.sources.objects.num_examples=24",
          "--config.data.sources.events.num_examples=12", "--config.extract.granularities=(1,4)",
          "--config.extract.pixels_fit_examples=32", "--config.extract.pixels_dim=16"]
  one = helpers.run_main(*args, f"--workdir={tmp_path / 'one'}", devices=2)
  assert one.returncode == 0, one.stderr[-4000:]
  procs = helpers.start_processes([os.path.join(helpers.ROOT, "tests", "main_worker.py"), *args,
                                   f"--workdir={tmp_path / 'two'}"])
  outputs, _ = _wait(procs)
  assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
  for bank in ("object", "event_1", "event_4"):
    (ids_one, one_rows), (ids_two, two_rows) = (_bank_rows(tmp_path / w, bank)
                                                for w in ("one", "two"))
    np.testing.assert_array_equal(ids_two, ids_one, err_msg=bank)
    np.testing.assert_allclose(two_rows, one_rows, rtol=1e-5, atol=1e-6, err_msg=bank)


# One process of a two-process job that joins it (`collectives.initialize`, as `main` does), says
# so, and waits at a barrier until the other ends.
_WAITER = """
import argparse, sys
sys.path[:0] = ["tests", "."]
import helpers
parser = argparse.ArgumentParser()
helpers.add_process_arguments(parser)
helpers.join_processes(parser.parse_args())
from univit_jax import collectives
print("joined", flush=True)
collectives.barrier("wait for the other")
"""


def test_a_killed_process_ends_the_others_after_the_heartbeat_timeout():
  """SIGKILL on process 1 (no error to post): process 0 ends once process 1's heartbeats stop
  for `UNIVIT_HEARTBEAT_TIMEOUT_S` (3 s here), naming it, not after JAX's default 100 s."""
  procs = helpers.start_processes(["-c", _WAITER], env={"UNIVIT_HEARTBEAT_TIMEOUT_S": "3"})
  for p in procs:
    assert p.stdout.readline().strip() == "joined", p.communicate(timeout=TIMEOUT)
  procs[1].send_signal(signal.SIGKILL)
  killed = time.time()
  outputs, ended = _wait(procs)
  assert procs[0].returncode != 0
  assert ended[0] - killed < 15, ended[0] - killed
  assert re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s+1\b", outputs[0][1]), (
    outputs[0][1][-3000:])
