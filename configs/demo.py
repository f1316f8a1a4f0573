"""The embedded demo: a micro UniViT on CPU-sized frames, the README's main command.

  python -m univit_jax.main --config=configs/demo.py --workdir=/tmp/univit_demo

Two rounds of extract -> cluster -> train on the embedded demo data (MNIST digits composed into
single items, multi-object images and multi-event clips), round 1 from the pixels bootstrap
teacher, round 2 from round 1's encoder; then a summary of losses, clusters and outputs.

`runlocal` is accepted for symmetry with the other configs (the demo is already local-sized).
"""

import ml_collections

from univit_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # Patch 4 (64 tokens a 32-px frame): per item view it teaches the digit far more than patch 8
  # (docs/training.md, "Patch 4 and the images' own budget").
  arg = config_lib.parse_arg(arg, variant="mu/4", runlocal=False)
  c = config_lib.default_config(arg.variant)
  c.mode = "pipeline"
  c.rounds = 2
  c.data.image_size = 32
  c.data.frames = (1, 2, 4, 8, 16)
  c.data.bucket_weights = (4, 1, 1, 1, 1)
  c.data.tokens_per_batch = 16 * 16 * 8
  # The 1-frame bucket gets 4x the clips' budget: 128 images a step at patch 4 (the clip buckets
  # 2,048 tokens: 16 two-frame ... 2 sixteen-frame clips), as 2,048 gave 128 images at patch 8.
  c.data.bucket_tokens = (4 * 2048, 2048, 2048, 2048, 2048)
  # Images of single items and of several objects (with boxes) feed the 1-frame bucket; the event
  # videos (16 frames) feed every bucket.
  c.data.sources = ml_collections.ConfigDict(dict(
    digits=dict(type="demo", kind="items", split="train", num_examples=1024, frames=(1,)),
    objects=dict(type="demo", kind="objects", split="train", num_examples=1024, frames=(1,)),
    events=dict(type="demo", kind="events", split="train", num_examples=512)))
  c.extract.batch_size = 64
  c.extract.proposal_grids = (2,)
  c.cluster.num_clusters = dict(object=64, event_1=32, event_2=32, event_4=32, event_8=32)
  # 3 positives per row (MLCD's 10 are 1e-5 of a million classes; 10 of 32 would be a third of
  # the bank, and every row would be pulled towards the same mean direction).
  c.cluster.top_k = 3
  # Digits on dark canvases: most tokens of every frame are the same background, so a fresh
  # encoder's embeddings share one large component (pairwise cosine ~0.97) and the
  # discrimination terms collapse them onto it; scoring batch-centred embeddings removes that
  # trivial solution (docs/training.md, "Embedding collapse").
  c.loss.center_embeddings = True
  # A cosine scale for tens of classes, not a million: s = 64 (RICE) makes the loss so sharply
  # convex in the cosines that any variation not yet following the labels is removed before it
  # can be learned; AdaCos's fixed scale sqrt(2) ln(K - 1) is 4.9-5.9 for K = 32-64.
  c.loss.scale = 8.0
  c.optim.lr = 1e-3
  c.optim.weight_decay = 0.05
  # No random crops, flips or colour jitter: on 32-px canvases a crop can cut away the digit its
  # cluster describes, and at 600 steps every augmentation tried measured worse on the held-out
  # probes (docs/training.md, "The demo recipe").
  c.data.augment = False
  # 600 steps a round (about 2.5 minutes on a 2-core CPU); round 2 starts from round 1's encoder
  # (`train.warm_start`), so the demo trains 1,200 steps in all.
  c.optim.warmup_steps = 20
  c.total_steps = 600
  c.train.log_every = 25
  c.train.checkpoint_every = 200
  c.eval.demo = True
  return c
