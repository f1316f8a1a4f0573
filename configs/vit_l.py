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
with 1M-class banks (91.86 GiB in the 16-frame bucket, the largest), by two choices made here.
The blocks are rematerialised whole (`remat="full"`: saving their matmul outputs, "dots", takes
84 GiB in the image bucket alone, against 36). The encoder is data parallel (`embed` unsharded,
3.5 GiB of parameters and moments per device) while the 64-way `fsdp` axis shards the batch and
the banks' classes: sharding `embed` over it too makes GSPMD gather the batch instead of the
weights (192 GiB of temporaries in the forward pass alone), until the blocks pin their
activations to the batch axis.
"""

import ml_collections

from univit_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_lib.pretraining_config(arg, variant="L/14", tokens_per_batch=16384 * 256)
  c.model.remat = "full"
  c.sharding_rules = tuple((name, None if name == "embed" else axes)
                           for name, axes in c.sharding_rules)
  return c
