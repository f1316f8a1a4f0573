"""Training: cluster labels on batches, the train state and step, and the preemption-safe loop.

  from univit_jax import train
  result = train.run_train(config, workdir)
"""

from univit_jax.train.loop import (CheckpointMismatchError, NonFiniteError, TrainResult,
                                   run_train)
from univit_jax.train.labels import LabelError

__all__ = ["CheckpointMismatchError", "LabelError", "NonFiniteError", "TrainResult", "run_train"]
