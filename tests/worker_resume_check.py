"""Resume with grain worker processes (mp_prefetch): run as a script by test_pipeline.py.

Takes batches from a 2-worker pipeline, saves through univit_jax.checkpointing, restores into a
fresh 2-worker iterator and checks the next batches equal those of the uninterrupted iterator.
"""

import itertools
import sys
import tempfile

import numpy as np
from absl import flags

from univit_jax import checkpointing, config_lib
from univit_jax.data import pipeline
from univit_jax.run_config import data_config

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fakes import FakeSource  # pylint: disable=g-import-not-at-top,wrong-import-position


def build():
  specs = (config_lib.SourceSpec("img", "demo", None, (("kind", "objects"),)),
           config_lib.SourceSpec("vid", "demo", None, (("kind", "events"),)))
  cfg = data_config.DataConfig(
    sources=specs, frames=(1, 2), bucket_weights=(1, 1), tokens_per_batch=16 * 8,
    image_size=16, patch_size=4, transform=data_config.TransformConfig(16), worker_count=2)
  return pipeline.build_train_dataset(
    cfg, sources=dict(img=FakeSource(30, boxes=True), vid=FakeSource(12, num_frames=3)),
    process_index=0, process_count=1)


def main():
  flags.FLAGS.mark_as_parsed()
  with tempfile.TemporaryDirectory() as tmp:
    it = iter(build())
    for _ in range(4):
      next(it)
    with checkpointing.Checkpointer(tmp) as ckpt:
      ckpt.save(4, dict(step=np.int32(4)), it)
      ckpt.wait_until_finished()
    expected = list(itertools.islice(it, 6))
    it.close()
    fresh = iter(build())
    with checkpointing.Checkpointer(tmp) as ckpt:
      import jax  # pylint: disable=g-import-not-at-top
      ckpt.restore(4, jax.eval_shape(lambda: dict(step=np.int32(0))), fresh)
    got = list(itertools.islice(fresh, 6))
    fresh.close()
  for a, b in zip(expected, got, strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  print("resumed exactly")


if __name__ == "__main__":
  main()
