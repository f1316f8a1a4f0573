"""The learning issue's isolation test: the demo encoder trained on the single items alone.

  python benchmarks/items_probe.py --labels=truth --steps=600
  python benchmarks/items_probe.py --labels=clusters --clusters=DIR/round_1 --steps=600
  python benchmarks/items_probe.py --steps=0                      # the same encoder untrained

Takes the demo config's `digits` source (the pipeline's own training items, same ids), labels
each item with its digit class (`truth`) or with the top-1 object-bank cluster its whole-image
row got in a pipeline round (`clusters`: `<round>/clusters/object/`), and trains the demo
encoder plus a class-centre bank with the pipeline's discrimination loss (`losses.
discrimination_loss` with `config.loss`'s kind, scale, margin and centring) and AdamW, on no
other data and no other term. The encoder is then probed like every row of the demo table
(`evaluation.run.evaluate`, linear probes on held-out records). Set against the pipeline's
round 1 trained on the same clusters, it separates what the clusters teach from what the
pipeline's mixture of terms and buckets lets the student learn of it.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
from univit_jax import encoder, losses, run_config, specs  # noqa: E402
from univit_jax.clustering import labels as cluster_labels  # noqa: E402
from univit_jax.data import pipeline  # noqa: E402
from univit_jax.run_config import data_config  # noqa: E402
from univit_jax.evaluation import features, report, run  # noqa: E402
from univit_jax.models import heads, vit  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", os.path.join(ROOT, "configs", "demo.py"), "the demo config", lock_config=True)
_LABELS = flags.DEFINE_enum("labels", "truth", ["truth", "clusters"], "the items' targets")
_CLUSTERS = flags.DEFINE_string("clusters", None, "a pipeline round folder (--labels=clusters)")
_STEPS = flags.DEFINE_integer("steps", 600, "training steps")
_BATCH = flags.DEFINE_integer("batch", 128, "items per step")
_SEED = flags.DEFINE_integer("seed", 0, "initialisation and batch-order seed")


def item_targets(data_cfg: data_config.DataConfig, labels: str, clusters: str | None
                 ) -> tuple[np.ndarray, np.ndarray, int]:
  """uint8 frames `[N, S, S, 3]` of the `digits` source, their targets `[N]` and the class count."""
  opened = pipeline.open_sources(data_cfg)
  source, ids = opened["digits"], pipeline.id_ranges(data_cfg, opened)["digits"]
  records = [source[i] for i in range(len(source))]
  frames = np.stack([r["frames"][0] for r in records])
  if labels == "truth":
    return frames, np.array([r["label"] for r in records], np.int32), 10
  out = cluster_labels.load_clusters(clusters, specs.OBJECT_BANK)
  whole = {int(example): int(row[0])
           for (example, sub), row in zip(out["ids"], out["labels"]) if sub == -1}
  return frames, np.array([whole[ids[i]] for i in range(len(records))], np.int32), int(
    out["centroids"].shape[0])


def main(argv):
  del argv
  run_cfg = run_config.build(_CONFIG.value, jax.device_count())
  cfg = run_cfg.model
  disc = run_cfg.loss.discrimination
  frames, targets, num_classes = item_targets(run_cfg.data, _LABELS.value, _CLUSTERS.value)
  mean = np.asarray(run_cfg.data.transform.mean, np.float32)
  std = np.asarray(run_cfg.data.transform.std, np.float32)

  class Student(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.encoder = vit.UniViT(cfg, rngs=rngs)
      self.heads = heads.ClassBanks({specs.OBJECT_BANK: num_classes}, cfg.width, rngs=rngs)

  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(Student(nnx.Rngs(_SEED.value)))
  steps = max(_STEPS.value, 1)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, run_cfg.optim.lr,
                                                      min(50, steps // 10), steps),
                   weight_decay=run_cfg.optim.weight_decay)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      embedding, _ = model.encoder((x.astype(jnp.float32) / 255.0 - mean) / std)
      loss, _ = losses.discrimination_loss(embedding, y[:, None], None,
                                           model.heads[specs.OBJECT_BANK].centres[...], rng, disc)
      return loss
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(_SEED.value)
  start = time.perf_counter()
  for i in range(_STEPS.value):
    idx = rng.integers(0, len(frames), _BATCH.value)
    params, opt_state, loss = step(params, opt_state, frames[idx, None], targets[idx],
                                   jax.random.key(i))
    if (i + 1) % 100 == 0:
      print(f"step {i + 1}: loss {float(loss):.3f} ({time.perf_counter() - start:.0f} s)",
            flush=True)
  with nnx.use_eager_sharding(False):
    encoder_params = nnx.split(nnx.merge(graphdef, params).encoder)[1]
  name = f"items only, {_LABELS.value}, {_STEPS.value} steps"
  spec = encoder.EncoderSpec.from_sections(run_cfg.model, run_cfg.data, run_cfg.mesh)
  extractor = features.from_params(spec, encoder_params, name, "export", name)
  ctx = run.make_context(run_cfg.eval, run_cfg.data.image_size)
  results = {extractor.name: run.evaluate(ctx, extractor, ("linear",))}
  print(report.markdown_table(run.results_dict(ctx, [extractor], results, {})))


if __name__ == "__main__":
  app.run(main)
