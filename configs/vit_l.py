"""UniViT ViT-L/14, the paper-scale recipe (~303M backbone parameters).

  python -m univit_jax.main --config=configs/vit_l.py --workdir=gs://BUCKET/univit_l
  python -m univit_jax.main --config=configs/vit_l.py:runlocal --workdir=/tmp/univit_l --mode=summary

Recipe (paper, via secondary summaries): AdamW lr 1e-3, weight decay 0.2, image batch 16K, frame
buckets 1/2/4/8/16 with a constant token budget, object and event cluster banks of up to 1M classes.
`runlocal` keeps the model but shrinks frames and batches so it compiles and runs on one CPU.
"""

import ml_collections

from univit_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, variant="L/14", runlocal=False)
  c = config_lib.default_config(arg.variant)
  c.model.dtype = "bfloat16"
  c.model.scan = True
  c.model.remat = "dots"
  c.data.image_size = 224
  c.data.tokens_per_batch = 16384 * 256
  c.mesh.shape = (1, -1, 1)
  if arg.runlocal:
    c.model.dtype = "float32"
    c.data.image_size = 4 * c.model.patch_size
    c.data.tokens_per_batch = 16 * 16 * 8
    c.mesh.shape = (-1, 1, 1)
  return c
