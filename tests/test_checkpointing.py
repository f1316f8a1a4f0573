"""Checkpointer round trips (state + grain iterator) and params-only exports."""

import itertools
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from univit_jax import checkpointing


def _state(step):
  return dict(step=jnp.asarray(step), params=dict(w=jnp.arange(6.0).reshape(2, 3) * step))


def test_save_restore_state_and_iterator(tmp_path):
  ds = grain.MapDataset.range(100).shuffle(seed=1).repeat().to_iter_dataset().batch(4)
  it = iter(ds)
  for _ in range(3):
    next(it)
  with checkpointing.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step), it if step == 3 else None)
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 3
    assert ckpt.all_steps() == [2, 3]
  expected = [next(it) for _ in range(3)]

  fresh = iter(ds)
  with checkpointing.Checkpointer(tmp_path / "ckpt") as ckpt:
    abstract = jax.eval_shape(lambda: _state(0))
    state = ckpt.restore(ckpt.latest_step(), abstract, fresh)
    with pytest.raises(FileNotFoundError, match="step 7"):
      ckpt.restore(7, abstract)
  np.testing.assert_array_equal(state["params"]["w"], _state(3)["params"]["w"])
  assert int(state["step"]) == 3
  for want, got in zip(expected, itertools.islice(fresh, 3)):
    np.testing.assert_array_equal(want, got)


def test_export_round_trip(tmp_path):
  params = dict(dense=dict(kernel=jnp.ones((3, 2)), bias=jnp.zeros(2, jnp.bfloat16)))
  config = json.dumps(dict(model=dict(width=8)))
  checkpointing.save_export(tmp_path / "export", params, config)
  checkpointing.save_export(tmp_path / "export", params, config)  # replacing works
  loaded, loaded_config = checkpointing.load_export(tmp_path / "export", jax.eval_shape(
    lambda: params))
  assert loaded_config == dict(model=dict(width=8))
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert loaded["dense"]["bias"].dtype == jnp.bfloat16
  assert not list((tmp_path / "export").glob(".config.json.*"))


def test_export_errors(tmp_path):
  with pytest.raises(ValueError):
    checkpointing.save_export(tmp_path / "e", dict(w=jnp.ones(1)), "{not json")
  with pytest.raises(FileNotFoundError, match="not an export"):
    checkpointing.load_export(tmp_path / "missing")
