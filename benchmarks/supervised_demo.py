"""The supervised upper bound: the demo encoder trained on the demo's labels directly.

  python benchmarks/supervised_demo.py --steps=1000 [--config.model.time_embedding=none]

Same architecture and preprocessing as `configs/demo.py`; linear heads on the embedding for the
digit class (single items), object presence (multi-label, objects), a clip's first and last
action and its event sequence (event clips), summed softmax / sigmoid cross-entropies, AdamW.
Training records come from the demo's train digits (seed 0, as the pipeline's): 16,000 renderings
per image kind and 8,000 clips by default, each a fresh placement, scale, tilt and colour, so
more records augment (with 2,000 it overfits: digit class 0.31 after 600 steps against 0.48
after 1,000 steps on 16,000, docs/training.md); the probes then
run on the evaluation's held-out records like every other row of the demo table. If this row
cannot beat raw pixels on a task, no self-supervised claim on that task means much.

As a script it trains, probes the encoder (linear probes and order sensitivity by default) and
prints the table; `benchmarks/demo_table.py` imports `train_supervised` for its row.
"""

import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
from univit_jax import config_lib, encoder, run_config  # noqa: E402
from univit_jax.data import demo  # noqa: E402
from univit_jax.evaluation import features, report, run, tasks  # noqa: E402
from univit_jax.models import vit  # noqa: E402

HEADS = {"digit": demo.NUM_CLASSES, "presence": demo.NUM_CLASSES, "first": len(demo.ACTIONS),
         "last": len(demo.ACTIONS), "sequence": demo.NUM_EVENT_LABELS}
BATCH = {"items": 64, "objects": 64, "events": 16}


class Supervised(nnx.Module):
  """The encoder with one linear head per label."""

  def __init__(self, cfg: config_lib.ModelConfig, *, rngs: nnx.Rngs):
    self.encoder = vit.UniViT(cfg, rngs=rngs)
    self.heads = nnx.Dict({name: nnx.Linear(cfg.width, n, rngs=rngs)
                           for name, n in HEADS.items()})


def _records(kind: str, num: int, image_size: int, clip_frames: int) -> dict[str, np.ndarray]:
  source = demo.DemoSource(kind, "train", num_examples=num, image_size=image_size,
                           num_frames=clip_frames, seed=0)
  data = tasks.EvalData({kind: tasks.RecordSet(kind, {"train": source},
                                                clip_frames if kind == "events" else 1,
                                                image_size)})
  by_name = {t.name: t for t in tasks.DEMO_TASKS}
  out = {"frames": data.frames(kind, "train")}
  if kind == "items":
    out["digit"] = data.targets(by_name["digit_class"], "train")
  elif kind == "objects":
    out["presence"] = data.targets(by_name["object_presence"], "train").astype(np.float32)
  else:
    for head, task in (("first", "first_action"), ("last", "last_action"),
                       ("sequence", "event_sequence")):
      out[head] = data.targets(by_name[task], "train")
  return out


def train_supervised(run_cfg: run_config.RunConfig, seed: int, steps: int,
                     num_records: int = 16000, log=print) -> features.FeatureExtractor:
  """Trains the supervised encoder of `run_cfg.model`; returns it as a feature extractor."""
  data = {kind: _records(kind, num_records if kind != "events" else num_records // 2,
                         run_cfg.data.image_size, run_cfg.eval.clip_frames)
          for kind in BATCH}
  mean = np.asarray(run_cfg.data.transform.mean, np.float32)
  std = np.asarray(run_cfg.data.transform.std, np.float32)
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(Supervised(run_cfg.model, rngs=nnx.Rngs(seed)))
  schedule = optax.warmup_cosine_decay_schedule(0.0, run_cfg.optim.lr, min(50, steps // 10),
                                                steps)
  tx = optax.adamw(schedule, weight_decay=run_cfg.optim.weight_decay)
  opt_state = tx.init(params)

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    total = 0.0
    for kind, heads in (("items", ("digit",)), ("objects", ("presence",)),
                        ("events", ("first", "last", "sequence"))):
      frames = (batch[kind]["frames"].astype(jnp.float32) / 255.0 - mean) / std
      embedding, _ = model.encoder(frames)
      for head in heads:
        logits = model.heads[head](embedding)
        if head == "presence":
          total += optax.sigmoid_binary_cross_entropy(logits, batch[kind][head]).sum(-1).mean()
        else:
          total += optax.softmax_cross_entropy_with_integer_labels(
            logits, batch[kind][head]).mean()
    return total

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for i in range(steps):
    batch = {kind: {k: v[idx] for k, v in data[kind].items()}
             for kind in BATCH
             for idx in [rng.integers(0, len(data[kind]["frames"]), BATCH[kind])]}
    params, opt_state, loss = step(params, opt_state, batch)
    if (i + 1) % 100 == 0:
      log(f"supervised step {i + 1}: loss {float(loss):.3f} "
          f"({time.perf_counter() - start:.0f} s)")
  with nnx.use_eager_sharding(False):
    encoder_params = nnx.split(nnx.merge(graphdef, params).encoder)[1]
  spec = encoder.EncoderSpec.from_sections(run_cfg.model, run_cfg.data, run_cfg.mesh)
  return features.from_params(spec, encoder_params, f"supervised (seed {seed})", "supervised",
                              f"supervised:{seed}")


_CONFIG = config_flags.DEFINE_config_file(
  "config", os.path.join(ROOT, "configs", "demo.py"), "the demo config (model, data, eval)",
  lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 1000, "training steps")
_SEED = flags.DEFINE_integer("seed", 0, "initialisation and batch-order seed")
_RECORDS = flags.DEFINE_integer("records", 16000, "training records per image kind (clips: half; "
                                "each record is a fresh rendering, so more records augment)")


def main(argv):
  del argv
  run_cfg = run_config.build(_CONFIG.value, jax.device_count())
  extractor = train_supervised(run_cfg, _SEED.value, _STEPS.value, _RECORDS.value)
  ctx = run.make_context(run_cfg.eval, run_cfg.data.image_size)
  results = {extractor.name: run.evaluate(ctx, extractor, ctx.cfg.probes)}
  out = run.results_dict(ctx, [extractor], results, {})
  print(report.markdown_table(out))


if __name__ == "__main__":
  app.run(main)
