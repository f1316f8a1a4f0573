"""The encoder consumes the pipeline's batches of every VS² bucket as they come, sharded."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import demo_config, typed
from univit_jax import sharding
from univit_jax.data import pipeline
from univit_jax.models import vit


@pytest.mark.slow
def test_encoder_consumes_a_batch_of_each_bucket():
  config = demo_config()
  config.mesh.shape = (8, 1, 1)
  config.data.sources.digits.num_examples = 64
  config.data.sources.objects.num_examples = 64
  config.data.sources.events.num_examples = 32
  run = typed(config)
  cfg = run.model
  mesh = sharding.make_mesh(run.mesh)
  dataset = pipeline.build_train_dataset(run.data, batch_multiple=8)
  graphdef, abstract = vit.abstract_encoder(cfg)
  shardings = sharding.tree_shardings(abstract, mesh, run.mesh.rules)
  _, params = vit.init_encoder(cfg, 0, shardings)
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))

  @jax.jit
  def forward(params, batch):
    embedding, aux = nnx.merge(graphdef, params)(
      batch["frames"], positions=batch["positions"], frame_mask=batch["frame_mask"],
      segments=(2,), boxes=batch["boxes"])
    return embedding, aux["token_mask"], aux["regions"]

  seen = {}
  for batch in dataset:
    t = batch["frames"].shape[1]
    if t in seen:
      continue
    assert batch["frames"].shape[0] == run.data.batch_sizes()[t]
    global_batch = pipeline.to_global_batch(batch, batch_sharding)
    embedding, token_mask, regions = forward(params, global_batch)
    np.testing.assert_array_equal(token_mask, batch["token_mask"])
    assert embedding.shape == (batch["frames"].shape[0], 64)
    assert regions.shape[:2] == batch["boxes"].shape[:2]
    assert np.isfinite(np.asarray(embedding)).all()
    seen[t] = True
    if len(seen) == len(config.data.frames):
      break
  assert sorted(seen) == [1, 2, 4, 8, 16]
