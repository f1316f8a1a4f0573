"""UniViT ViT-L/14, the paper-scale recipe (302.9M backbone parameters).

  python -m univit_jax.main --config=configs/vit_l.py --workdir=gs://BUCKET/univit_l
  python -m univit_jax.main --config=configs/vit_l.py:runlocal --workdir=/tmp/univit_l --mode=summary

AdamW lr 1e-3, weight decay 0.2 (the paper's, via secondary summaries); image batch 16K at 224 px and
frame buckets 1/2/4/8/16 under the same token budget. `:runlocal` shrinks frames and batches for
one CPU; `:variant=B/16` swaps the size. See config_lib.pretraining_config for the shared recipe.
"""

import ml_collections

from univit_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return config_lib.pretraining_config(arg, variant="L/14", tokens_per_batch=16384 * 256)
