"""Class-centre banks: initialisation, logical sharding names, and how the optimiser finds them."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from univit_jax import config_lib, specs
from univit_jax.models import heads


def _banks(**kwargs) -> heads.ClassBanks:
  with nnx.use_eager_sharding(False):
    return heads.ClassBanks(kwargs.pop("sizes"), kwargs.pop("dim"), rngs=nnx.Rngs(0), **kwargs)


def test_bank_names_and_granularity():
  assert specs.bank_names((1, 2, 4, 8)) == (
    "object", "event_1", "event_2", "event_4", "event_8")
  assert specs.event_granularity("event_4") == 4
  assert specs.event_granularity("object") is None
  assert specs.event_granularity("event_x") is None


def test_centroid_and_random_initialisation():
  centroids = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)
  banks = _banks(sizes={"object": 32, "event_1": 4000}, dim=6, centroids={"object": centroids})
  assert banks.names() == ("object", "event_1")
  np.testing.assert_array_equal(np.asarray(banks["object"].centres[...]), centroids)
  random = np.asarray(banks["event_1"].centres[...])
  assert random.dtype == np.float32 and random.shape == (4000, 6)
  assert abs(random.std() - 0.01) < 0.001 and abs(random.mean()) < 0.001


def test_bad_inputs_name_the_bank():
  with pytest.raises(ValueError, match="'object'.*shape"):
    _banks(sizes={"object": 8}, dim=4, centroids={"object": np.zeros((8, 5))})
  with pytest.raises(ValueError, match="non-finite"):
    _banks(sizes={"object": 2}, dim=2, centroids={"object": np.array([[0, np.nan], [1, 1]])})
  with pytest.raises(ValueError, match="unknown banks"):
    _banks(sizes={"object": 8}, dim=4, centroids={"event_2": np.zeros((8, 4))})
  with pytest.raises(KeyError, match="event_8"):
    _banks(sizes={"object": 8}, dim=4)["event_8"]


class _Model(nnx.Module):
  """An encoder stand-in next to the banks, as the train state holds them."""

  def __init__(self):
    with nnx.use_eager_sharding(False):
      self.encoder = nnx.Linear(3, 4, rngs=nnx.Rngs(1))
      self.banks = heads.ClassBanks({"object": 8, "event_2": 8}, 4, rngs=nnx.Rngs(0))


def test_bank_params_are_identifiable_by_path():
  params = nnx.state(_Model(), nnx.Param)
  flags = {path: heads.is_bank_param(path) for path, _ in nnx.to_flat_state(params)}
  assert sorted(p for p, is_bank in flags.items() if is_bank) == [
    ("banks", "banks", "event_2", "centres"), ("banks", "banks", "object", "centres")]
  assert all(p[0] == "encoder" for p, is_bank in flags.items() if not is_bank)
  # The same rule works on jax tree paths (optax.multi_transform labels are built from these).
  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: heads.is_bank_param(path), nnx.to_pure_dict(params))
  assert sum(jax.tree_util.tree_leaves(labels)) == 2


def test_class_axis_is_sharded_under_the_default_rules():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(config_lib.DEFAULT_SHARDING_RULES):
    bank = heads.ClassBanks({"object": 64}, 8, rngs=nnx.Rngs(0))["object"]
  centres = bank.centres[...]
  assert bank.centres.get_metadata()["out_sharding"] == ("classes", None)
  assert centres.sharding.spec == P(("fsdp", "model"), None)
  assert {s.data.shape for s in centres.addressable_shards} == {(16, 8)}
