"""The running mean embedding (`loss.center_embeddings`): kept by the train step, subtracted by
the encoder, invisible to the batch-centred discrimination terms."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers import demo_config, typed
from test_summary import _random_batch
from univit_jax import sharding, summary
from univit_jax.train import state as state_lib
from univit_jax.train import step as step_lib


def _setup(momentum: float = 0.5):
  config = demo_config()
  config.model.depth = 1
  config.data.frames, config.data.bucket_weights = (1, 2), (1, 1)
  config.data.image_size, config.data.tokens_per_batch = 16, 8 * 8
  config.cluster.num_clusters = dict(object=16, event_1=16, event_2=16)
  config.loss.bank_weights = dict(object=1.0, event_1=1.0, event_2=1.0)
  config.loss.event_schedule = ((0.0, (1,)),)
  config.loss.center_momentum = momentum
  run = typed(config)
  assert run.model.embedding_center
  mesh = sharding.make_mesh(run.mesh)
  setup = summary.TrainSetup.build(run, mesh)
  spec = step_lib.StepSpec.for_bucket(1, tuple(setup.sizes), run.data.max_boxes > 0)
  shapes = step_lib.abstract_batch(run.data, spec, run.data.batch_sizes()[1], setup.top_k,
                                   run.loss.image_labels)
  batch_sharding = sharding.batch_sharding(mesh, run.mesh.rules)
  batch = jax.device_put(_random_batch(shapes, 16, 16, run.model.patch_size), batch_sharding)
  weights = step_lib.term_weights(run.loss, 0.0, tuple(setup.sizes))
  compiled = step_lib.compile_step(
    step_lib.make_train_step(setup.graphdef, setup.tx, lambda step: 1e-3, run.loss, spec),
    setup.abstract, setup.shardings, shapes, dict.fromkeys(shapes, batch_sharding), weights,
    sharding.replicated(mesh))
  state = state_lib.create_state(run.model, setup.sizes, {}, setup.tx, setup.shardings, seed=0)
  return setup, batch, weights, compiled, state


def _raw_mean(setup, params, batch) -> np.ndarray:
  """The mean of the encoder's embeddings of the batch before any centring."""
  encoder = nnx.merge(setup.graphdef, jax.tree.map(jnp.copy, params)).encoder
  encoder.embedding_center[...] = jnp.zeros_like(encoder.embedding_center[...])
  embedding, _ = encoder(batch["frames"], positions=batch["positions"],
                         frame_mask=batch["frame_mask"])
  return np.asarray(embedding).mean(0)


def _center(params) -> tuple[np.ndarray, np.ndarray]:
  return (np.asarray(params["encoder"]["embedding_center"][...]),
          np.asarray(params["encoder"]["embedding_center_count"][...]))


def test_the_step_keeps_the_mean_embedding_of_its_bucket():
  setup, batch, weights, compiled, state = _setup(momentum=0.5)
  mean0 = _raw_mean(setup, state.params, batch)
  state1, metrics1 = compiled(jax.tree.map(jnp.copy, state), batch, weights)
  center, count = _center(state1.params)
  # The first update takes the batch's mean whole (no trace of the zero start); the other
  # lengths' rows are untouched.
  np.testing.assert_allclose(center[0], mean0, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(center[1:], 0.0)
  np.testing.assert_array_equal(count, [1.0, 0, 0, 0, 0, 0, 0])
  mean1 = _raw_mean(setup, state1.params, batch)
  state2, _ = compiled(jax.tree.map(jnp.copy, state1), batch, weights)
  center, count = _center(state2.params)
  np.testing.assert_allclose(center[0], 0.5 * mean0 + 0.5 * mean1, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(count, [2.0, 0, 0, 0, 0, 0, 0])
  # The batch-centred discrimination terms do not see the center: the same step from state1
  # with its center zeroed scores every bank alike.
  zeroed = jax.tree.map(jnp.copy, state1)
  model = nnx.merge(setup.graphdef, zeroed.params)
  model.encoder.embedding_center[...] = jnp.zeros_like(model.encoder.embedding_center[...])
  _, centred_metrics = compiled(jax.tree.map(jnp.copy, state1), batch, weights)
  _, zeroed_metrics = compiled(
    state_lib.TrainState(step=zeroed.step, params=nnx.state(model),
                         opt_state=zeroed.opt_state, rng=zeroed.rng), batch, weights)
  for key in ("object/loss", "object_region/loss", "event_1/loss"):
    if key in centred_metrics:
      np.testing.assert_allclose(zeroed_metrics[key], centred_metrics[key], rtol=1e-5,
                                 err_msg=key)
  assert "object/loss" in centred_metrics
