"""Fault injection: SIGKILL each stage at random points, fill the disk, tear the metrics log;
every rerun must finish with the outputs of an uninterrupted run.

  python benchmarks/faults.py [--trials=50] [--disk_trials=10] [--seed=0] [--workdir=DIR]
                              [--stages=extract,cluster,train,export,pipeline]

First an uninterrupted reference: the tiny two-round pipeline (`python -m univit_jax.main
--config=configs/demo.py` with `TINY`, the overrides of tests/test_rounds.py with 6 training
steps and a checkpoint every 2, so a kill in training can resume mid-run) in DIR/reference, which
also fills the shared compilation cache DIR/jax_cache that every later run reads. Then, per stage,
one uninterrupted control run of the stage alone (its outputs must equal the reference's too; it
measures the stage's kill window), and the trials, round-robin over the stages:

  stage     command                       copied from the reference round  kill clock starts
  extract   --mode=extract                nothing                          features/ appears
  cluster   --mode=cluster                features/                        clusters/ appears
  train     --mode=train (then exports)   features/, clusters/             train_run.json appears
  export    --mode=train or --mode=export those, checkpoints/, metrics     .export.partial/ appears
            on a trained round            (half the trials: export/ too)
  pipeline  the pipeline command          nothing                          the process starts

A stage trial runs round 1 or round 2 (round 2 with the reference's round-1 export as teacher and
initial encoder, as the pipeline sets them), starts the command, SIGKILLs its process group at a
uniform time over the window from the trigger to the control run's exit (a run that finishes
before its kill time is checked all the same, and its stage drawn again: `--trials` counts kills
that landed), appends a torn line to
any metrics.jsonl of a round not yet exported (a kill mid-append leaves one), and reruns the
command to completion. It fails when the killed run exits on its own with an error, when an
output that says it is complete right after the kill (a feature bank's committed chunks, a
bank's stats.json, an export's COMPLETE marker) differs from the reference, when a prepared input
changed, when the rerun fails, or when the rerun's outputs differ from the reference's: feature
chunks, cluster centroids / labels / ids, the export's parameters, all bit-exact on CPU, and the
metrics.jsonl records (steps 1..N once each, values equal except the wall-clock rates
`TIMING_KEYS`). Nothing here is legitimately non-deterministic on CPU except those rates.

Disk trials (`--disk_trials`, round-robin over the stages, round 1; the pipeline trial starts
with round 1 complete and runs round 2) run the stage in a user and mount namespace (`unshare
--user --map-root-user --mount`, no root needed where unprivileged user namespaces are allowed;
skipped where not) on a tmpfs sized to hold the prepared inputs plus a random fraction of what the
stage writes, so the kernel returns ENOSPC to every writer (NumPy, Orbax's TensorStore, the
metrics log) at a random point. The run must fail with a last line `Disk full: ...` naming the
error (`univit_jax.main`), leave every prepared input byte-identical and every output that says
it is complete equal to the reference, and a rerun on the same tmpfs remounted larger must finish
with the reference's outputs.

Prints a table and writes benchmarks/results/faults.json (atomic.write_json). Trial folders
that pass are deleted; failed ones stay under DIR for inspection. The torn-line repair itself is
also unit-tested in tests/test_logs.py and on a real kill in tests/test_train.py
(test_sigkill_then_sigterm_then_resume_matches_uninterrupted_run); tests/test_faults.py runs one
kill per stage and one full disk with the functions here.
"""

import dataclasses
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402  # pylint: disable=wrong-import-position

import machine  # noqa: E402  # pylint: disable=import-error
from univit_jax import atomic, checkpointing  # noqa: E402  # pylint: disable=wrong-import-position
from univit_jax.clustering import store  # noqa: E402  # pylint: disable=wrong-import-position
from univit_jax.train import logs  # noqa: E402  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.join(ROOT, "tests"))
import helpers  # noqa: E402  # pylint: disable=wrong-import-position,import-error

# tests/helpers.py's tiny demo pipeline with 6 steps, a checkpoint every 2 (its one checkpoint at
# its last step would make every kill in training restart from scratch).
TINY = tuple(a for a in helpers.TINY_DEMO_PIPELINE if not a.startswith(
  ("--config.total_steps=", "--config.train.checkpoint_every="))) + (
  "--config.total_steps=6", "--config.train.checkpoint_every=2")
# metrics.jsonl values measured by the wall clock: the only outputs that differ between runs.
TIMING_KEYS = frozenset({"samples_per_s", "tokens_per_s", "step_time_s", "data_wait_s",
                         "to_device_s"})
TORN_LINE = '{"step": 99, "lo'
RUN_TIMEOUT_S = 900
OUTPUTS = ("features", "clusters", "export", "metrics")
# The export stage's trials export with either command: the end of `--mode=train` on a trained
# round, or `--mode=export` (the newest checkpoint's encoder); both give the same parameters.
EXPORT_MODES = ("train", "export")
# Runs per requested kill before giving up (a run that finishes before its kill time is redrawn).
MAX_ATTEMPTS = 3


@dataclasses.dataclass(frozen=True)
class Stage:
  """How a stage is run, prepared, killed and checked.

  Attributes:
    mode: the `--mode` it runs.
    inputs: what is copied from the reference round into the trial's round folder first.
    kept: the inputs that must stay byte-identical (the others the stage may rewrite).
    outputs: what is compared with the reference afterwards (`OUTPUTS`).
    trigger: the path, relative to the round folder, whose appearance starts the kill clock
      ("" for the process start).
  """
  mode: str
  inputs: tuple[str, ...]
  kept: tuple[str, ...]
  outputs: tuple[str, ...]
  trigger: str


_TRAINED = ("features", "clusters", "checkpoints", "train_run.json", logs.METRICS_FILE,
            "tensorboard", logs.PLOT_FILE)
STAGES = {
  "extract": Stage("extract", (), (), ("features",), "features"),
  "cluster": Stage("cluster", ("features",), ("features",), ("clusters",), "clusters"),
  "train": Stage("train", ("features", "clusters"), ("features", "clusters"),
                 ("metrics", "export"), "train_run.json"),
  "export": Stage("train", _TRAINED, ("features", "clusters", "checkpoints"),
                  ("metrics", "export"), ".export.partial"),
  "pipeline": Stage("pipeline", (), (), OUTPUTS, ""),
}


@dataclasses.dataclass(frozen=True)
class Setup:
  """The reference run and the compilation cache the trials share.

  Attributes:
    root: the benchmark's folder (trials go in subfolders).
    reference: the uninterrupted pipeline's workdir.
    cache: the persistent compilation cache every run uses.
    rounds: the pipeline's rounds (stage trials may use any of them).
  """
  root: str
  reference: str
  cache: str
  rounds: int


@dataclasses.dataclass
class Run:
  """One start of a command: when its trigger appeared, whether it was killed, how it ended."""
  returncode: int
  seconds: float
  trigger_s: float | None = None
  killed: bool = False
  log: str = ""


def round_dir(workdir: str, r: int) -> str:
  return os.path.join(workdir, f"round_{r}")


def _env() -> dict[str, str]:
  """One CPU device, as the reference ran (tests set 8 fake devices for themselves); the
  caller's other XLA flags are kept (tests compile without LLVM's optimisations)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def command(setup: Setup, mode: str, workdir: str, r: int = 1) -> list[str]:
  """`python -m univit_jax.main` for `mode` in `workdir`: the pipeline over `setup.rounds`
  rounds, or one stage of round `r` configured as the pipeline configures it
  (`rounds.round_config`: round r > 1 learns from and starts at round r - 1's export, which
  must sit in the sibling folder round_<r-1>/)."""
  args = [sys.executable, "-m", "univit_jax.main", "--config=configs/demo.py",
          f"--workdir={workdir}", f"--mode={mode}", *TINY, f"--config.rounds={setup.rounds}",
          f"--config.train.compilation_cache_dir={setup.cache}"]
  if mode != "pipeline" and r > 1:
    previous = os.path.join(os.path.dirname(workdir), f"round_{r - 1}", "export")
    args += [f"--config.extract.teacher={previous}", f"--config.train.init_encoder={previous}"]
  return args


def run_command(args: list[str], log_path: str, trigger: str | None = None,
                kill_after: float | None = None) -> Run:
  """Runs `args` in its own process group, output to `log_path`.

  With `kill_after`, SIGKILLs the group `kill_after` seconds after `trigger` (a path) appears,
  or after the start when `trigger` is None, unless it has exited by then. Without it, waits for
  the exit and records when `trigger` appeared (polling every 5 ms).
  """
  start = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
  trigger_s = 0.0 if trigger is None else None
  try:
    while trigger_s is None and proc.poll() is None:
      if os.path.exists(trigger):
        trigger_s = time.perf_counter() - start
      elif time.perf_counter() - start > RUN_TIMEOUT_S:
        raise subprocess.TimeoutExpired(args, RUN_TIMEOUT_S)
      else:
        time.sleep(0.005)
    killed = False
    if kill_after is not None and trigger_s is not None:
      try:
        proc.wait(timeout=max(0.0, start + trigger_s + kill_after - time.perf_counter()))
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        killed = True
    proc.wait(timeout=max(1.0, RUN_TIMEOUT_S - (time.perf_counter() - start)))
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  with open(log_path, errors="replace") as f:
    tail = f.read()[-3000:]
  return Run(proc.returncode, time.perf_counter() - start, trigger_s, killed, tail)


def make_reference(setup: Setup) -> Run:
  """Runs the uninterrupted pipeline into `setup.reference` (fills the compilation cache)."""
  os.makedirs(setup.reference, exist_ok=True)
  run = run_command(command(setup, "pipeline", setup.reference),
                    os.path.join(setup.root, "reference.log"))
  if run.returncode != 0:
    raise RuntimeError(f"the reference pipeline failed (exit {run.returncode}):\n{run.log}")
  return run


def prepare(setup: Setup, stage: str, trial_dir: str, r: int, previous_export: bool = False
            ) -> str:
  """Fills `trial_dir` with what `stage` of round r starts from (copied from the reference) and
  returns the workdir the stage runs in (`trial_dir` itself for the pipeline, whose trials start
  with the rounds before r complete)."""
  os.makedirs(trial_dir, exist_ok=True)
  for earlier in range(1, r):
    if stage == "pipeline":
      shutil.copytree(round_dir(setup.reference, earlier), round_dir(trial_dir, earlier))
    elif earlier == r - 1:
      shutil.copytree(os.path.join(round_dir(setup.reference, earlier), "export"),
                      os.path.join(round_dir(trial_dir, earlier), "export"))
  if stage == "pipeline":
    return trial_dir
  workdir, source = round_dir(trial_dir, r), round_dir(setup.reference, r)
  os.makedirs(workdir, exist_ok=True)
  for name in STAGES[stage].inputs + (("export",) if previous_export else ()):
    copy = shutil.copytree if os.path.isdir(os.path.join(source, name)) else shutil.copy2
    copy(os.path.join(source, name), os.path.join(workdir, name))
  return workdir


def digests(folder: str, names: tuple[str, ...]) -> dict[str, str]:
  """sha1 of every file under `folder/<name>` for `names` (a file or a folder), by path."""
  out = {}
  for name in names:
    path = os.path.join(folder, name)
    files = [path] if os.path.isfile(path) else [
      os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for file in files:
      with open(file, "rb") as f:
        out[os.path.relpath(file, folder)] = hashlib.sha1(f.read()).hexdigest()
  return out


def _export_params(path: str) -> dict[str, np.ndarray]:
  """The export's parameters as NumPy arrays by tree path (as saved, on the default device)."""
  import jax  # pylint: disable=import-outside-toplevel
  params, _ = checkpointing.load_export(path)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _arrays_differ(what: str, got: np.ndarray, want: np.ndarray) -> list[str]:
  """[] when `got` equals `want` bit for bit (dtype included), else one line saying how not."""
  if got.dtype == want.dtype and np.array_equal(got, want):
    return []
  if got.shape != want.shape or got.dtype != want.dtype:
    return [f"{what}: {got.dtype}{list(got.shape)} != reference {want.dtype}{list(want.shape)}"]
  if got.dtype.kind in "SUO":  # record keys
    return [f"{what}: {int((got != want).sum())} of {got.size} values differ"]
  diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
  return [f"{what}: {int((diff > 0).sum())} of {diff.size} values differ (max {diff.max():.3g})"]


def _bank_chunks(folder: str) -> list[str]:
  with open(os.path.join(folder, "meta.json")) as f:
    return [c["name"] for c in json.load(f)["chunks"]]


def _features_problems(got: str, want: str, complete_only: bool) -> list[str]:
  """Feature banks: every committed chunk equals the reference's; unless `complete_only`, every
  bank is complete with the reference's chunks."""
  problems = []
  keys = os.path.join("features", store.KEYS_FILE)  # the record key of each sample id
  if os.path.exists(os.path.join(got, keys)):
    problems += _arrays_differ(keys, np.load(os.path.join(got, keys)),
                               np.load(os.path.join(want, keys)))
  elif not complete_only:
    problems.append(f"{keys}: missing")
  for bank in sorted(os.listdir(os.path.join(want, "features"))):
    g, w = os.path.join(got, "features", bank), os.path.join(want, "features", bank)
    if not os.path.isdir(w):
      continue
    if not os.path.exists(os.path.join(g, "meta.json")):
      problems += [] if complete_only else [f"features/{bank}: missing"]
      continue
    with open(os.path.join(g, "meta.json")) as f:
      complete = json.load(f)["complete"]
    chunks, expected = _bank_chunks(g), _bank_chunks(w)
    if not complete and not complete_only:
      problems.append(f"features/{bank}: not marked complete")
    if (complete or not complete_only) and chunks != expected:
      problems.append(f"features/{bank}: chunks {chunks} != reference {expected}")
    for name in set(chunks) & set(expected):
      for suffix in (".npy", ".ids.npy"):
        problems += _arrays_differ(f"features/{bank}/{name}{suffix}",
                                   np.load(os.path.join(g, name + suffix)),
                                   np.load(os.path.join(w, name + suffix)))
  return problems


def _clusters_problems(got: str, want: str, complete_only: bool) -> list[str]:
  """Cluster banks with stats.json (the stage's done marker): centroids, labels, ids equal."""
  problems = []
  for bank in sorted(os.listdir(os.path.join(want, "clusters"))):
    g, w = os.path.join(got, "clusters", bank), os.path.join(want, "clusters", bank)
    if not os.path.exists(os.path.join(g, "stats.json")):
      problems += [] if complete_only else [f"clusters/{bank}: no stats.json"]
      continue
    for name in ("centroids", "labels", "ids"):
      problems += _arrays_differ(f"clusters/{bank}/{name}.npy",
                                 np.load(os.path.join(g, f"{name}.npy")),
                                 np.load(os.path.join(w, f"{name}.npy")))
  return problems


def _export_problems(got: str, want: str, complete_only: bool,
                     cache: dict[str, dict[str, np.ndarray]]) -> list[str]:
  """An export with its COMPLETE marker: every parameter equal to the reference's."""
  path = os.path.join(got, "export")
  if not checkpointing.is_export(path):
    return [] if complete_only else ["export: missing or without its COMPLETE marker"]
  reference = os.path.join(want, "export")
  if reference not in cache:
    cache[reference] = _export_params(reference)
  params, expected = _export_params(path), cache[reference]
  if params.keys() != expected.keys():
    return [f"export: parameters {sorted(params.keys() ^ expected.keys())} differ in name"]
  return [p for key in expected for p in _arrays_differ(f"export{key}", params[key],
                                                        expected[key])]


def _metrics_problems(got: str, want: str) -> list[str]:
  """metrics.jsonl: whole lines only, the reference's steps once each, equal values but for the
  wall-clock rates."""
  path = os.path.join(got, logs.METRICS_FILE)
  if not os.path.exists(path):
    return [f"{logs.METRICS_FILE}: missing"]
  with open(path) as f:
    text = f.read()
  if text and not text.endswith("\n"):
    return [f"{logs.METRICS_FILE}: ends in a torn line {text.splitlines()[-1][:40]!r}"]
  records, expected = logs.read_metrics(got), logs.read_metrics(want)
  steps, want_steps = [r["step"] for r in records], [r["step"] for r in expected]
  if steps != want_steps:
    return [f"{logs.METRICS_FILE}: steps {steps} != reference {want_steps}"]
  problems = []
  for record, reference in zip(records, expected):
    changed = sorted(k for k in record.keys() | reference.keys()
                     if k not in TIMING_KEYS and record.get(k) != reference.get(k))
    if changed:
      problems.append(f"{logs.METRICS_FILE} step {record['step']}: {changed[:5]} differ")
  return problems


def output_problems(got: str, want: str, outputs: tuple[str, ...], complete_only: bool = False,
                    cache: dict[str, dict[str, np.ndarray]] | None = None) -> list[str]:
  """How round folder `got` differs from the reference round `want` in `outputs`.

  With `complete_only` (right after a kill or a full disk) only what says it is complete is
  compared: committed feature chunks, banks with stats.json, an export with its marker. Errors
  reading those count as differences: a file a stage treats as complete must be whole.
  """
  cache = {} if cache is None else cache
  checks = dict(
    features=lambda: _features_problems(got, want, complete_only),
    clusters=lambda: _clusters_problems(got, want, complete_only),
    export=lambda: _export_problems(got, want, complete_only, cache),
    metrics=lambda: [] if complete_only else _metrics_problems(got, want))
  problems = []
  for name in outputs:
    try:
      problems += checks[name]()
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
  return [f"{os.path.basename(got)}/{p}" for p in problems]


def _rounds(stage: str, setup: Setup, r: int) -> list[int]:
  """The rounds a trial of `stage` on round r produces (the pipeline: r to the last)."""
  return list(range(r, setup.rounds + 1)) if stage == "pipeline" else [r]


def tear_metrics(trial_dir: str, rounds: list[int]) -> bool:
  """Appends a torn record to the metrics.jsonl of each round in `rounds` not yet exported, as
  a kill mid-append leaves; True if any was torn."""
  torn = False
  for r in rounds:
    folder = round_dir(trial_dir, r)
    path = os.path.join(folder, logs.METRICS_FILE)
    if os.path.exists(path) and not checkpointing.is_export(os.path.join(folder, "export")):
      with open(path, "a") as f:
        f.write(TORN_LINE)
      torn = True
  return torn


def kill_trial(setup: Setup, stage: str, trial_dir: str, r: int, delay: float,
               previous_export: bool = False, mode: str | None = None,
               trigger: str | None = None, cache: dict | None = None) -> dict[str, Any]:
  """Prepares `stage` of round r in `trial_dir`, SIGKILLs it `delay` seconds after its trigger,
  tears the metrics log, reruns it to completion and compares with the reference. `mode`
  replaces the stage's `--mode` (the export stage: "export" instead of "train"), `trigger` its
  trigger path (tests kill at chosen points).

  Returns:
    The trial's record; `problems` lists every way it failed (empty: it passed).
  """
  spec = STAGES[stage]
  mode = mode or spec.mode
  workdir = prepare(setup, stage, trial_dir, r, previous_export)
  args = command(setup, mode, workdir, r)
  kept = digests(workdir, spec.kept)
  trigger = trigger if trigger is not None else spec.trigger
  first = run_command(args, os.path.join(trial_dir, "killed.log"),
                      os.path.join(workdir, trigger) if trigger else None, delay)
  problems = []
  if not first.killed and first.returncode != 0:
    problems.append(f"the run to kill failed on its own (exit {first.returncode}): "
                    f"{first.log[-500:]}")
  rounds = _rounds(stage, setup, r)
  for each in rounds:
    problems += [f"after the kill: {p}" for p in output_problems(
      round_dir(trial_dir, each), round_dir(setup.reference, each), spec.outputs,
      complete_only=True, cache=cache)]
  torn = first.killed and mode in ("train", "pipeline") and tear_metrics(trial_dir, rounds)
  rerun = run_command(args, os.path.join(trial_dir, "rerun.log"))
  if rerun.returncode != 0:
    problems.append(f"the rerun failed (exit {rerun.returncode}): {rerun.log[-1500:]}")
  else:
    for each in rounds:
      problems += output_problems(round_dir(trial_dir, each), round_dir(setup.reference, each),
                                  spec.outputs, cache=cache)
  if digests(workdir, spec.kept) != kept:
    problems.append(f"prepared inputs changed: {spec.kept}")
  return dict(stage=stage, mode=mode, round=r, previous_export=previous_export, trigger=trigger,
              delay_s=delay, trigger_s=first.trigger_s, killed=first.killed,
              kill_s=first.seconds if first.killed else None, torn_metrics=torn,
              recovery_s=rerun.seconds, problems=problems)


def control_run(setup: Setup, stage: str, trial_dir: str, cache: dict | None = None
                ) -> tuple[float, dict[str, Any]]:
  """`stage` of round 1, uninterrupted: its outputs must equal the reference's (else the stage
  itself is not reproducible and a trial's difference would say nothing about kills). Returns
  the kill window (trigger to exit, seconds) and its record."""
  spec = STAGES[stage]
  workdir = prepare(setup, stage, trial_dir, 1)
  trigger = os.path.join(workdir, spec.trigger) if spec.trigger else None
  run = run_command(command(setup, spec.mode, workdir), os.path.join(trial_dir, "control.log"),
                    trigger)
  problems = ([f"failed (exit {run.returncode}): {run.log[-1500:]}"] if run.returncode else [
    p for r in _rounds(stage, setup, 1) for p in output_problems(
      round_dir(trial_dir, r), round_dir(setup.reference, r), spec.outputs, cache=cache)])
  window = run.seconds - (run.trigger_s or 0.0)
  return window, dict(stage=stage, seconds=run.seconds, trigger_s=run.trigger_s,
                      window_s=window, problems=problems)


def namespaces_available(scratch: str) -> bool:
  """Whether this user may mount a tmpfs in its own user and mount namespace (`unshare -rm`)."""
  probe = tempfile.mkdtemp(dir=scratch)
  try:
    return subprocess.run(
      ["unshare", "--user", "--map-root-user", "--mount", "mount", "-t", "tmpfs", "-o",
       "size=64k", "univit_probe", probe], capture_output=True, timeout=60).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    return False
  finally:
    os.rmdir(probe)


def _usage(path: str) -> int:
  """Bytes the file or folder `path` takes on a tmpfs: each file rounded up to whole pages."""
  files = [path] if os.path.isfile(path) else [
    os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
  return sum(-(-os.path.getsize(f) // 4096) * 4096 for f in files)


def written_bytes(setup: Setup, stage: str) -> int:
  """What `stage` adds to a round folder in the reference run (the pipeline: all of round 2),
  as tmpfs pages."""
  if stage == "pipeline":
    return _usage(round_dir(setup.reference, setup.rounds))
  folder = round_dir(setup.reference, 1)
  added = dict(extract=("features",), cluster=("clusters",), export=("export",),
               train=("checkpoints", "train_run.json", logs.METRICS_FILE, "tensorboard",
                      logs.PLOT_FILE, "export"))[stage]
  return sum(_usage(os.path.join(folder, name)) for name in added)


def disk_trial(setup: Setup, stage: str, trial_dir: str, fraction: float,
               mode: str | None = None, cache: dict | None = None) -> dict[str, Any]:
  """Runs `stage` (with `--mode` `mode`, default the stage's) on a tmpfs with room for its
  inputs and `fraction` of what it writes; then remounts the tmpfs larger and reruns. The
  pipeline trial starts with round 1 complete.

  Returns:
    The trial's record; `problems` lists every way it failed (empty: it passed).
  """
  spec = STAGES[stage]
  mode = mode or spec.mode
  r = setup.rounds if stage == "pipeline" else 1
  prepared = os.path.join(trial_dir, "prepared")
  workdir = prepare(setup, stage, prepared, r)
  disk, out = os.path.join(trial_dir, "disk"), os.path.join(trial_dir, "out")
  os.makedirs(disk)
  os.makedirs(out)
  fill = max(4096, int(fraction * written_bytes(setup, stage)))
  args = shlex.join(command(setup, mode, os.path.join(disk, os.path.relpath(
    workdir, prepared)), r))
  q = shlex.quote
  script = f"""
set -u
mount -t tmpfs -o size=1g univit_faults {q(disk)}
cp -a {q(prepared)}/. {q(disk)}/
used=$(df --output=used -B1 {q(disk)} | tail -n 1)
mount -o remount,size=$((used + {fill})) {q(disk)}
timeout {RUN_TIMEOUT_S} {args} >{q(out)}/full.out 2>{q(out)}/full.err; echo $? >{q(out)}/full.rc
mkdir {q(out)}/full && cp -a {q(disk)}/. {q(out)}/full/
mount -o remount,size=1g {q(disk)}
timeout {RUN_TIMEOUT_S} {args} >{q(out)}/rerun.out 2>&1; echo $? >{q(out)}/rerun.rc
mkdir {q(out)}/final && cp -a {q(disk)}/. {q(out)}/final/
"""
  start = time.perf_counter()
  shell = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c",
                          script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=3 * RUN_TIMEOUT_S)
  seconds = time.perf_counter() - start

  def read(name: str) -> str:
    path = os.path.join(out, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""

  problems = [f"namespace script: {shell.stderr[-1000:]}"] if shell.returncode else []
  full_rc, rerun_rc = read("full.rc").strip(), read("rerun.rc").strip()
  error = next((line for line in reversed(read("full.err").splitlines()) if line.strip()), "")
  if full_rc == "0":
    problems.append(f"the run with a full disk ({fill} bytes free) succeeded")
  elif full_rc == "124":
    problems.append("the run with a full disk hung (timed out)")
  elif not (error.startswith("Disk full: ") and "No space left on device" in error):
    problems.append(f"the last line of the error is not `Disk full: ...`: {error!r}")
  rel = os.path.relpath(workdir, prepared)
  rounds = _rounds(stage, setup, r)
  for each in rounds:
    problems += [f"after ENOSPC: {p}" for p in output_problems(
      round_dir(os.path.join(out, "full"), each), round_dir(setup.reference, each),
      spec.outputs, complete_only=True, cache=cache)]
  kept = (tuple(f"round_{e}" for e in range(1, r)) if stage == "pipeline" else spec.kept)
  for name, folder in (("full", os.path.join(out, "full", rel)),
                       ("final", os.path.join(out, "final", rel))):
    if digests(folder, kept) != digests(workdir, kept):
      problems.append(f"prepared inputs {kept} changed by the {name} run")
  if rerun_rc != "0":
    problems.append(f"the rerun with space failed (exit {rerun_rc}): {read('rerun.out')[-1500:]}")
  else:
    for each in rounds:
      problems += output_problems(round_dir(os.path.join(out, "final"), each),
                                  round_dir(setup.reference, each), spec.outputs, cache=cache)
  return dict(stage=stage, mode=mode, round=r, free_bytes=fill, fraction=fraction,
              exit_code=full_rc, error=error, seconds=seconds, problems=problems)


def _median(values: list[float | None]) -> float | None:
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def summarize(trials: list[dict], disk: list[dict]) -> list[dict[str, Any]]:
  """One row per stage: trials (kills that landed, and failures), failures, median kill and
  recovery times, runs that finished cleanly before their kill time (checked, not counted), and
  the full-disk trials and their failures."""
  rows = []
  for stage in STAGES:
    mine = [t for t in trials if t["stage"] == stage]
    killed = [t for t in mine if t["killed"]]
    full = [t for t in disk if t["stage"] == stage]
    if mine or full:
      rows.append(dict(
        stage=stage, trials=sum(t["counted"] for t in mine),
        failures=sum(bool(t["problems"]) for t in mine),
        median_kill_s=_median([t["kill_s"] for t in killed]),
        median_recovery_s=_median([t["recovery_s"] for t in killed]),
        finished_first=sum(not t["counted"] for t in mine),
        disk_trials=len(full), disk_failures=sum(bool(t["problems"]) for t in full)))
  return rows


def _table(rows: list[dict[str, Any]]) -> str:
  def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
  columns = ("trials", "failures", "median kill s", "median recovery s", "done first",
             "ENOSPC trials", "ENOSPC failures")
  lines = [f"{'stage':<9} " + " ".join(columns)]
  total = dict(stage="all", median_kill_s=None, median_recovery_s=None, **{
    key: sum(r[key] for r in rows)
    for key in ("trials", "failures", "finished_first", "disk_trials", "disk_failures")})
  for row in rows + [total]:
    values = (row["trials"], row["failures"], seconds(row["median_kill_s"]),
              seconds(row["median_recovery_s"]), row["finished_first"], row["disk_trials"],
              row["disk_failures"])
    lines.append(f"{row['stage']:<9} " + " ".join(
      f"{value:>{len(name)}}" for name, value in zip(columns, values)))
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every export it loads at INFO
  options = flags.FLAGS
  stages = [s for s in options.stages.split(",") if s]
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise app.UsageError(f"--stages: unknown {unknown}; expected some of {list(STAGES)}")
  root = os.path.abspath(options.workdir or tempfile.mkdtemp(prefix="univit_faults_"))
  setup = Setup(root=root, reference=os.path.join(root, "reference"),
                cache=os.path.join(root, "jax_cache"), rounds=2)
  shutil.rmtree(setup.reference, ignore_errors=True)
  for folder in ("controls", "trials", "disk"):
    shutil.rmtree(os.path.join(root, folder), ignore_errors=True)
  rng, cache = random.Random(options.seed), {}
  print(f"workdir {root}; reference pipeline ...", flush=True)
  reference = make_reference(setup)
  print(f"reference: {reference.seconds:.1f} s", flush=True)

  windows, controls = {}, []
  for stage in stages:
    windows[stage], record = control_run(setup, stage, os.path.join(root, "controls", stage),
                                         cache)
    controls.append(record)
    print(f"control {stage}: {record['seconds']:.1f} s, kill window {windows[stage]:.1f} s"
          + (f"; PROBLEMS {record['problems']}" if record["problems"] else ""), flush=True)

  trials = []
  # A trial counts once its kill lands (or it fails); a run that finishes cleanly before its
  # kill time is kept (its outputs are checked all the same) and the stage drawn again.
  while (counted := sum(t["counted"] for t in trials)) < options.trials:
    if len(trials) >= MAX_ATTEMPTS * options.trials:
      raise RuntimeError(f"only {counted} kills landed in {len(trials)} runs: the stages finish "
                         "before their kill times")
    i = len(trials)
    stage = stages[counted % len(stages)]
    r = 1 if stage == "pipeline" else rng.randint(1, setup.rounds)
    previous = stage == "export" and rng.random() < 0.5
    mode = rng.choice(EXPORT_MODES) if stage == "export" else None
    delay = rng.uniform(0.0, windows[stage])
    trial_dir = os.path.join(root, "trials", f"{i:03d}_{stage}")
    record = dict(trial=i, **kill_trial(setup, stage, trial_dir, r, delay, previous, mode,
                                        cache=cache))
    record["counted"] = record["killed"] or bool(record["problems"])
    trials.append(record)
    how = f"killed at {record['kill_s']:.1f} s" if record["killed"] else "not killed (done)"
    print(f"trial {i:3d} {stage:<8} --mode={record['mode']:<8} round {r}: {how} (trigger + "
          f"{delay:.2f} s), rerun {record['recovery_s']:.1f} s: "
          + ("; ".join(record["problems"]) or "ok"), flush=True)
    if not record["problems"]:
      shutil.rmtree(trial_dir)

  disk, disk_skipped = [], None
  if options.disk_trials and not namespaces_available(root):
    disk_skipped = "no unprivileged user and mount namespaces (unshare -rm) on this machine"
    print(f"disk trials skipped: {disk_skipped}")
  for j in range(options.disk_trials if disk_skipped is None else 0):
    stage = stages[j % len(stages)]
    trial_dir = os.path.join(root, "disk", f"{j:03d}_{stage}")
    mode = rng.choice(EXPORT_MODES) if stage == "export" else None
    record = dict(trial=j, **disk_trial(setup, stage, trial_dir, rng.uniform(0.05, 0.95), mode,
                                        cache))
    disk.append(record)
    print(f"disk {j:3d} {stage:<8} --mode={record['mode']:<8} {record['free_bytes']} bytes free: "
          f"exit {record['exit_code']} {record['error'][:100]!r}: "
          + ("; ".join(record["problems"]) or "ok"), flush=True)
    if not record["problems"]:
      shutil.rmtree(trial_dir)

  rows = summarize(trials, disk)
  print(_table(rows))
  result = dict(
    benchmark="faults", command=" ".join(["python", "benchmarks/faults.py", *sys.argv[1:]]),
    seed=options.seed, workdir=root, pipeline_overrides=list(TINY), timing_keys=sorted(
      TIMING_KEYS),
    machine=machine.describe(),
    reference_seconds=reference.seconds, controls=controls, kill_windows_s=windows,
    summary=rows, failures=sum(r["failures"] for r in rows),
    disk_failures=sum(r["disk_failures"] for r in rows), disk_skipped=disk_skipped,
    trials=trials, disk_trials=disk)
  atomic.write_json(options.out, result)
  print(f"wrote {options.out}")


if __name__ == "__main__":
  # Defined here, not on import: tests import this module next to univit_jax.main's flags.
  flags.DEFINE_integer("trials", 50, "SIGKILL trials (kills that land), round-robin over "
                       "--stages")
  flags.DEFINE_integer("disk_trials", 10, "full-disk (ENOSPC) trials, round-robin over --stages")
  flags.DEFINE_integer("seed", 0, "seed of the kill times, rounds and disk sizes")
  flags.DEFINE_string("workdir", "", "where the reference and trials go (default: a temp dir)")
  flags.DEFINE_string("stages", ",".join(STAGES), "stages to kill, comma-separated")
  flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "faults.json"),
                      "JSON results path")
  app.run(main)
