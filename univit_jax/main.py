"""The entry point: `python -m univit_jax.main --config=configs/<name>.py[:args] --workdir=DIR`.

`--mode` picks the stage (default: the config's own `mode`); `--config.a.b=value` overrides any
field of the locked config, so a typo fails at start-up instead of being ignored. The config is
turned into typed sections once (`run_config.build`), which the stages take; every config check
a stage of the mode would run is run before the first one starts (`preflight.py`). An
error in the user's config, data or files prints one line, `<Kind> error: <message>`, and exits
2; a non-finite loss prints `Training stopped: ...` and a full disk `Disk full: ...`, and both
exit 1. Library INFO logs are hidden unless `--verbosity=0` is given; `--verbosity=1` also shows
those errors' tracebacks. With `UNIVIT_DISTRIBUTED=1` the processes of a multi-host job join
(`collectives.initialize`), and an error in any one of them ends all of them at once with its
message (`run_stage`).
"""

import errno
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from univit_jax import config_lib, paths, run_config
from univit_jax.run_config import stage_config

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/demo.py or configs/vit_l.py:runlocal.",
  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs, checkpoints and logs go.")
_MODE = flags.DEFINE_string("mode", None, "Stage to run; default: the config's `mode`.")

# The exit code of a train or pipeline run stopped by SIGTERM once its checkpoint is saved
# (EX_TEMPFAIL): rerunning the same command resumes, so schedulers restart on it (see launch/).
PREEMPTED_EXIT_CODE = 75


def _summary(run: run_config.RunConfig, workdir: str | None) -> None:
  from univit_jax import summary
  summary.run(run, workdir)


def _extract(run: run_config.RunConfig, workdir: str | None) -> None:
  from univit_jax.clustering import extract
  extract.run_extract(run, _require(workdir))


def _cluster(run: run_config.RunConfig, workdir: str | None) -> None:
  from univit_jax.clustering import labels
  labels.run_cluster_stage(_require(workdir), labels.extracted_specs(run, workdir))


def _require(workdir: str | None) -> str:
  if not workdir:
    raise app.UsageError("--workdir is required for this mode")
  return workdir


def _debugging() -> bool:
  """Whether `--verbosity=1` (or more) asked for tracebacks instead of one-line errors."""
  return logging.get_verbosity() >= logging.DEBUG


def _train(run: run_config.RunConfig, workdir: str | None) -> None:
  from univit_jax import encoder, train
  from univit_jax.evaluation import run as eval_run
  evaluate = eval_run.training_evaluator(run)
  result = train.run_train(run, _require(workdir), evaluate)
  how = "stopped by SIGTERM (checkpoint saved)" if result.preempted else "finished"
  print(f"Training {how} at step {result.step}; cluster labels {result.label_versions}")
  if result.preempted:
    sys.exit(PREEMPTED_EXIT_CODE)
  path = encoder.export_encoder(run, workdir, result.state.params["encoder"])
  print(f"Encoder export (univit_jax.load_encoder): {path}")


def _pipeline(run: run_config.RunConfig, workdir: str | None) -> None:
  from univit_jax import rounds
  summary = rounds.run_pipeline(run, _require(workdir))
  if summary.get("preempted"):
    sys.exit(PREEMPTED_EXIT_CODE)


def _eval(run: run_config.RunConfig, workdir: str | None) -> None:
  from univit_jax.evaluation import run as eval_run
  eval_run.run_eval(run, workdir)


def _export(run: run_config.RunConfig, workdir: str | None) -> None:
  """The encoder of a run's checkpoint (`export.step`, -1: the newest; a pipeline's newest
  round) written to `<workdir>/export`, without training."""
  from univit_jax import encoder
  from univit_jax.train import state as state_lib
  step = None if run.export.step == -1 else run.export.step
  folder, step, params = state_lib.checkpoint_encoder(run, _require(workdir), step)
  path = encoder.export_encoder(run, workdir, params)
  print(f"Encoder export of {folder} at step {step} (univit_jax.load_encoder): {path}")


def _embed(run: run_config.RunConfig, workdir: str | None) -> None:
  from univit_jax import embed
  print(f"Embeddings: {embed.run_embed(run, workdir)}")


# The modes that write Orbax checkpoints or exports into the workdir.
_CHECKPOINTING_MODES = ("train", "pipeline", "export")

MODES = {"summary": _summary, "extract": _extract, "cluster": _cluster, "train": _train,
         "pipeline": _pipeline, "eval": _eval, "export": _export, "embed": _embed}


def _user_errors() -> dict[type[Exception], str]:
  """The exceptions that report a problem in the user's config, data or files (not a bug), each
  with the word that names its kind in the one line `main` prints for it."""
  from univit_jax import train
  from univit_jax.clustering import store
  from univit_jax.clustering.kmeans import lloyd
  from univit_jax.data import pipeline, sources
  return {config_lib.ConfigError: "Config", sources.SourceError: "Data",
          pipeline.BadInputError: "Data", store.FeatureStoreError: "Feature store",
          lloyd.KMeansError: "Clustering", train.LabelError: "Cluster label",
          train.CheckpointMismatchError: "Checkpoint", FileNotFoundError: "Input",
          paths.StorageError: "Storage"}


def _one_line(message: str) -> str:
  """A message as one line: its lines (e.g. a rejected manifest's bad rows) joined by "; "."""
  lines = (line.strip() for line in message.splitlines())
  return "; ".join(line for line in lines if line).replace(":; ", "; ")


def _disk_full(error: BaseException | None) -> bool:
  """Whether `error`, or an error it was raised from, reports a full disk: Python's OSError
  ENOSPC, or TensorStore's (Orbax's) RESOURCE_EXHAUSTED naming the same."""
  while error is not None:
    if ((isinstance(error, OSError) and error.errno == errno.ENOSPC)
        or "No space left on device" in str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _fail(code: int, line: str, teardown: bool = True) -> NoReturn:
  """Prints `line` to stderr and exits with `code`; in a multi-process run every other process
  ends too, printing it (`collectives.abort_all`), instead of waiting in its next collective.
  `teardown=False` skips the interpreter's teardown (`os._exit`)."""
  from univit_jax import collectives
  print(line, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  collectives.abort_all(line, code)
  if not teardown:
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def run_stage(stage: Callable[[], Any]) -> Any:
  """Runs `stage` (a mode's work) under the entry point's error reporting; returns its result.

  An error in the user's config, data or files prints `<Kind> error: <message>` and exits 2; a
  non-finite loss or gradient prints `Training stopped: ...` and exits 1; a full disk prints
  `Disk full: ...` and exits 1 without the interpreter teardown (Orbax's failed background
  writes would print hundreds of lines of tracebacks while it shuts down, burying this one;
  every output is safe to abandon mid-write, as after a SIGKILL: benchmarks/faults.py).
  `--verbosity=1` raises them instead, with their traceback, as any other error (a bug) is.
  In a multi-process run each of these exits, and any raised error (after its traceback, exit
  1), ends every other process at once with the failing one's message and exit code
  (`collectives.abort_all`), where they would otherwise wait in a collective for the coordination
  service's timeouts.
  """
  from univit_jax import collectives, train
  errors = _user_errors()
  try:
    try:
      return stage()
    except train.NonFiniteError as e:
      if _debugging():
        raise
      _fail(1, f"Training stopped: {e}")
    except tuple(errors) as e:
      if _debugging():
        raise
      kind = next(kind for cls, kind in errors.items() if isinstance(e, cls))
      _fail(2, f"{kind} error: {_one_line(str(e))}")
    except Exception as e:  # pylint: disable=broad-except
      if _debugging() or not _disk_full(e):
        raise
      _fail(1, f"Disk full: {_one_line(str(e))}. Free space and rerun the same command: finished "
               "work is kept and the run resumes.", teardown=False)
  except Exception as e:  # pylint: disable=broad-except
    if collectives.multi_process():
      traceback.print_exc()
      _fail(1, f"{type(e).__name__}: {_one_line(str(e))}")
    raise


def _device_count(config: ml_collections.ConfigDict, mode: str, available: int) -> int:
  """The devices the run's sections are built for: the `summary.devices` a summary simulates,
  else the `available` ones of this process.

  Raises:
    config_lib.ConfigError: naming the field, for an invalid `summary` section.
  """
  if mode == "summary":
    return stage_config.SummaryConfig.from_config(config).devices or available
  return available


def _check_workdir(workdir: str | None, mode: str) -> None:
  """Refuses a workdir the mode cannot write before any stage starts: a scheme without a
  filesystem here (naming the package to install), or one Orbax cannot hold checkpoints on.

  Raises:
    paths.StorageError: naming the workdir.
  """
  if not workdir:
    return
  paths.check(workdir, "--workdir")
  if mode in _CHECKPOINTING_MODES:
    from univit_jax import checkpointing
    checkpointing.check_location(workdir, "--workdir")


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; a bad config file, argument or override exits with one clear line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # config_flags folds an error raised while loading the file into the flag error's text.
    message = str(e).rsplit("ConfigError: ", 1)[-1].strip()
  except (AttributeError, KeyError, TypeError) as e:
    # ml_collections reports an unknown override key as AttributeError / KeyError.
    message = f"unknown or invalid config field in {[a for a in argv if '--config.' in a]}: " + (
      str(e.args[0]) if e.args else repr(e)).replace("\\n", " ")
  print(f"Config error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log every checkpoint operation at INFO; stages report progress themselves.
    logging.set_verbosity(logging.WARNING)
  import jax
  from univit_jax import collectives
  if os.environ.get("UNIVIT_DISTRIBUTED"):
    collectives.initialize()  # Multi-host: discovers the TPU slice or SLURM job (launch/).
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  mode = _MODE.value or config.mode
  if mode not in MODES:
    raise app.UsageError(f"--mode={mode!r}: expected one of {sorted(MODES)}")
  from univit_jax import preflight

  def stage() -> None:
    _check_workdir(_WORKDIR.value, mode)
    run = run_config.build(config, _device_count(config, mode, jax.device_count()))
    preflight.check(run, mode)
    MODES[mode](run, _WORKDIR.value)

  run_stage(stage)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
