"""Training: cluster labels on batches, the train state and step, and the preemption-safe loop.

  from univit_jax import train
  result = train.run_train(run, workdir)  # run: run_config.build(config, jax.device_count())
"""

from univit_jax.train.labels import LabelError
from univit_jax.train.loop import CheckpointMismatchError, NonFiniteError, TrainResult, run_train

__all__ = ["CheckpointMismatchError", "LabelError", "NonFiniteError", "TrainResult", "run_train"]
