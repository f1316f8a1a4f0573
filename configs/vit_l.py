"""UniViT ViT-L/14, the paper-scale recipe (302.9M backbone parameters).

  python -m univit_jax.main --config=configs/vit_l.py --workdir=gs://BUCKET/univit_l
  python -m univit_jax.main --config=configs/vit_l.py:runlocal --workdir=/tmp/univit_l --mode=summary
  python -m univit_jax.main --config=configs/vit_l.py --workdir=/tmp/univit_l --mode=summary \
    --config.summary.devices=64

AdamW lr 1e-3, weight decay 0.2 (the paper's, via secondary summaries); image batch 16K at 224 px and
frame buckets 1/2/4/8/16 under the same token budget. `:runlocal` shrinks frames and batches for
one CPU; `:variant=B/16` swaps the size. See config_lib.pretraining_config for the shared recipe.

Memory (docs/scaling.md; the third command above prints it): on 64 devices (a v5p-128 slice)
the 16K batch, 256 images or 16 16-frame clips per device, fits a v5p's 95 GiB in every bucket
with 1M-class banks (85.79 GiB in the 16-frame bucket, the largest). The blocks are
rematerialised whole (`remat="full"`, this file's one change to the shared recipe: saving their
matmul outputs, "dots", takes 78.74 GiB in the image bucket and 172.85 in the 16-frame one,
against 30.18 and 85.79). The encoder is FSDP, as the recipe shards it: the 64-way `fsdp` axis
splits the batch, the encoder's weights and the banks' classes, and the blocks pin their
activations to the batch's split, so each gathers its weights rather than the batch; at this
batch that saves 5.9 to 6.9 GiB per device in every bucket over a data-parallel encoder
(`embed` unsharded).
"""

import ml_collections

from univit_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_lib.pretraining_config(arg, variant="L/14", tokens_per_batch=16384 * 256)
  c.model.remat = "full"
  return c
