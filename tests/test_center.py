"""The running mean embedding (`loss.center_embeddings`): kept by the train step, subtracted by
the encoder, invisible to the batch-centred discrimination terms."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import train_fixtures
from helpers import demo_config
from univit_jax import sharding
from univit_jax.train import state as state_lib
from univit_jax.train import step as step_lib


def _setup(momentum: float = 0.5):
  """The 1-frame bucket's whole step of the demo config at one block and 16 px, with 1- and
  2-frame buckets (so two rows of the running mean could move) and `loss.center_momentum`."""
  config = demo_config()
  config.model.depth = 1
  config.data.frames, config.data.bucket_weights = (1, 2), (1, 1)
  config.data.image_size, config.data.tokens_per_batch = 16, 8 * 8
  config.cluster.num_clusters = dict(object=16, event_1=16, event_2=16)
  config.loss.bank_weights = dict(object=1.0, event_1=1.0, event_2=1.0)
  config.loss.event_schedule = ((0.0, (1,)),)
  config.loss.center_momentum = momentum
  run, mesh, setup, spec, shapes, batch_sharding, batch, weights, state = (
    train_fixtures.bucket_step_inputs(config, num_classes=16))
  assert run.model.embedding_center
  compiled = step_lib.compile_step(
    step_lib.make_train_step(setup.graphdef, setup.tx, lambda step: 1e-3, run.loss, spec),
    setup.abstract, setup.shardings, shapes, dict.fromkeys(shapes, batch_sharding), weights,
    sharding.replicated(mesh))
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


def test_computing_the_statistics_leaves_the_incoming_parameters_alone():
  """`center_statistics` returns the moved running mean without writing it into the parameters
  it was given: the step's finiteness guard falls back to those."""
  setup, batch, _, _, state = _setup()
  before = _center(state.params)
  rows = batch["frames"].shape[0]
  moved = step_lib.center_statistics(setup.graphdef, state.params,
                                     np.ones((rows, before[0].shape[1]), np.float32),
                                     np.ones(rows, bool), 1, 0.5)
  np.testing.assert_array_equal(_center(state.params)[0], before[0])
  np.testing.assert_array_equal(_center(state.params)[1], before[1])
  assert np.asarray(moved["encoder"]["embedding_center_count"][...])[0] == 1.0
