"""Checkpointer round trips (state + grain iterator) and params-only exports."""

import itertools
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from univit_jax import checkpointing, rounds


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


class _Killed(BaseException):
  """Stands in for SIGKILL: raised mid-export, with no cleanup running after it."""


@pytest.mark.parametrize("previous", [False, True], ids=["first_export", "re_export"])
def test_export_killed_midway_is_not_taken_as_done_and_a_rerun_completes_it(
    tmp_path, monkeypatch, previous):
  folder = tmp_path / "round_1"
  path = folder / "export"
  config = json.dumps(dict(model=dict(width=8)))
  old, new = dict(w=jnp.zeros(3)), dict(w=jnp.ones(3))
  abstract = jax.eval_shape(lambda: new)
  if previous:
    checkpointing.save_export(path, old, config)

  def kill(*args):
    raise _Killed()

  # The kill lands after the new parameters and config are written, before the marker.
  with monkeypatch.context() as m:
    m.setattr(checkpointing.atomic, "fsync_tree", kill)
    with pytest.raises(_Killed):
      checkpointing.save_export(path, new, config)
  assert rounds.is_exported(str(folder)) == previous
  if previous:  # the old export is untouched and still loads
    np.testing.assert_array_equal(checkpointing.load_export(path, abstract)[0]["w"], old["w"])
  else:
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="not an export"):
      checkpointing.load_export(path, abstract)

  checkpointing.save_export(path, new, config)
  assert rounds.is_exported(str(folder))
  np.testing.assert_array_equal(checkpointing.load_export(path, abstract)[0]["w"], new["w"])
  assert sorted(os.listdir(folder)) == ["export"]  # no partial or set-aside folder left


def test_export_folder_without_completion_marker_is_not_an_export(tmp_path):
  """What a kill inside a non-atomic rewrite left: config.json beside params; not done."""
  folder = tmp_path / "round_1"
  checkpointing.save_export(folder / "export", dict(w=jnp.ones(3)), json.dumps({}))
  os.remove(folder / "export" / "COMPLETE")
  assert (folder / "export" / "config.json").exists()
  assert not rounds.is_exported(str(folder))
  with pytest.raises(FileNotFoundError, match="not an export"):
    checkpointing.read_export_config(folder / "export")
