"""The device mesh over several slices (TPU multislice): only `mesh.dcn_axis` crosses slices."""

import dataclasses

import jax
import numpy as np
import pytest

from univit_jax import config_lib, sharding


@dataclasses.dataclass(frozen=True)
class _SliceDevice:
  """A CPU device as a slice of a multislice job sees it (real TPU devices carry
  `slice_index`; the test's fake CPU devices do not)."""
  device: jax.Device
  slice_index: int

  def __getattr__(self, name):
    return getattr(self.device, name)


def _mesh_config(shape, dcn_axis="data"):
  return config_lib.MeshConfig(axes=("data", "fsdp", "model"), shape=shape,
                               rules=config_lib.DEFAULT_SHARDING_RULES, dcn_axis=dcn_axis)


def _slices(num_slices):
  devices = jax.devices()
  per = len(devices) // num_slices
  return [_SliceDevice(d, i // per) for i, d in enumerate(devices)]


@pytest.mark.parametrize("shape,dcn_axis", [((2, 2, 2), "data"), ((4, 2, 1), "data"),
                                            ((1, 4, 2), "fsdp")])
def test_only_the_dcn_axis_crosses_slices(shape, dcn_axis):
  cfg = _mesh_config(shape, dcn_axis)
  grid = sharding.hybrid_devices(cfg, shape, _slices(2))
  assert grid.shape == shape
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  axis = cfg.axes.index(dcn_axis)
  # Moving along any other axis stays in the slice; the DCN axis's halves are the two slices.
  for other in range(3):
    if other != axis:
      assert (np.diff(slice_of, axis=other) == 0).all()
  first, second = np.split(slice_of, 2, axis=axis)
  assert (first == 0).all() and (second == 1).all()
  assert sorted(d.id for d in grid.flat) == sorted(d.id for d in jax.devices())


def test_uneven_split_over_slices_is_refused_naming_the_axis():
  with pytest.raises(config_lib.ConfigError, match=r"mesh.dcn_axis='data' \(size 1\)"):
    sharding.hybrid_devices(_mesh_config((1, 8, 1)), (1, 8, 1), _slices(2))


def test_dcn_axis_must_be_a_mesh_axis():
  with pytest.raises(config_lib.ConfigError, match="mesh.dcn_axis='dcn' is not among"):
    _mesh_config((-1, 1, 1), dcn_axis="dcn")


def test_one_slice_keeps_the_plain_mesh():
  mesh = sharding.make_mesh(_mesh_config((2, 2, 2)))
  assert mesh.devices.shape == (2, 2, 2) and mesh.axis_names == ("data", "fsdp", "model")
