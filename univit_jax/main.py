"""The entry point: `python -m univit_jax.main --config=configs/<name>.py[:args] --workdir=DIR`.

`--mode` picks the stage (default: the config's own `mode`); `--config.a.b=value` overrides any
field of the locked config, so a typo fails at start-up instead of being ignored. Library INFO
logs are hidden unless `--verbosity=0` is given.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from univit_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/demo.py or configs/vit_l.py:runlocal.",
  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs, checkpoints and logs go.")
_MODE = flags.DEFINE_string("mode", None, "Stage to run; default: the config's `mode`.")


def _summary(config, workdir):
  from univit_jax import summary
  summary.run(config, workdir)


def _extract(config, workdir):
  from univit_jax.clustering import extract
  extract.run_extract(config, _require(workdir))


def _cluster(config, workdir):
  from univit_jax.clustering import labels
  labels.run_cluster_stage(_require(workdir), labels.extracted_specs(config, workdir))


def _require(workdir: str | None) -> str:
  if not workdir:
    raise app.UsageError("--workdir is required for this mode")
  return workdir


def _stopping_cleanly(run):
  """Runs a training stage; its errors about inputs or numerics end the run with one line."""
  from univit_jax import train
  try:
    return run()
  except (train.LabelError, train.CheckpointMismatchError, train.NonFiniteError) as e:
    print(f"Training stopped: {e}", file=sys.stderr)
    sys.exit(1)


def _train(config, workdir):
  from univit_jax import encoder, train
  from univit_jax.evaluation import run as eval_run
  evaluate = eval_run.training_evaluator(config)
  result = _stopping_cleanly(lambda: train.run_train(config, _require(workdir), evaluate))
  how = "stopped by SIGTERM (checkpoint saved)" if result.preempted else "finished"
  print(f"Training {how} at step {result.step}; cluster labels {result.label_versions}")
  if not result.preempted:
    path = encoder.export_encoder(config, workdir, result.state.params["encoder"])
    print(f"Encoder export (univit_jax.load_encoder): {path}")


def _pipeline(config, workdir):
  from univit_jax import rounds
  _stopping_cleanly(lambda: rounds.run_pipeline(config, _require(workdir)))


def _eval(config, workdir):
  from univit_jax.evaluation import run
  try:
    run.run_eval(config, workdir)
  except FileNotFoundError as e:
    print(f"Evaluation error: {e}", file=sys.stderr)
    sys.exit(2)


MODES = {"summary": _summary, "extract": _extract, "cluster": _cluster, "train": _train,
         "pipeline": _pipeline, "eval": _eval}


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
  if os.environ.get("UNIVIT_DISTRIBUTED"):
    import jax
    jax.distributed.initialize()  # Multi-host: discovers the slice (see launch/).
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  mode = _MODE.value or config.mode
  if mode not in MODES:
    raise app.UsageError(f"--mode={mode!r}: expected one of {sorted(MODES)}")
  try:
    MODES[mode](config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
