"""The device mesh and the mapping from logical axis names to mesh axes.

Parameters are annotated with logical names (`nnx.with_partitioning`); `config.sharding_rules`
maps each name to mesh axes (or None). This module is the only place that turns names into
`PartitionSpec`s, so one rule change re-shards the whole model.
"""

import collections
import logging
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from univit_jax import config_lib

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(cfg: config_lib.MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the mesh `cfg.axes` x `cfg.shape` over `devices` (default: all).

  Devices of several slices (TPU multislice: their `slice_index` differs) are laid out by
  `hybrid_devices`, so that only `cfg.dcn_axis` crosses slices.

  Raises:
    config_lib.ConfigError: if the shape cannot be laid over the devices (or slices).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.resolved_shape(len(devices))
  axis_types = (AxisType.Auto,) * len(cfg.axes)
  if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
    return Mesh(hybrid_devices(cfg, shape, devices), cfg.axes, axis_types=axis_types)
  return jax.make_mesh(shape, cfg.axes, axis_types=axis_types, devices=devices)


def hybrid_devices(cfg: config_lib.MeshConfig, shape: Sequence[int],
                   devices: Sequence[jax.Device]) -> np.ndarray:
  """The device array of a mesh of `shape` over several slices: `cfg.dcn_axis` (e.g. data
  parallelism, whose gradient all-reduce tolerates the data-centre network) is split across
  the slices, every other axis stays inside a slice (its collectives on the chips' own links).

  Raises:
    config_lib.ConfigError: if the slices differ in size, or their count does not divide the
      DCN axis.
  """
  counts = collections.Counter(getattr(d, "slice_index", 0) for d in devices)
  axis = cfg.axes.index(cfg.dcn_axis)
  if len(set(counts.values())) > 1 or shape[axis] % len(counts):
    raise config_lib.ConfigError(
      f"mesh.shape={tuple(shape)} over {len(counts)} slices of {sorted(counts.values())} "
      f"devices: mesh.dcn_axis={cfg.dcn_axis!r} (size {shape[axis]}) must be split evenly "
      "across equal slices")
  dcn = [len(counts) if i == axis else 1 for i in range(len(shape))]
  ici = [s // d for s, d in zip(shape, dcn)]
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> P:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once.

  Raises:
    ValueError: naming a logical axis that has no rule.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no entry in sharding_rules {sorted(table)}")
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, where: str) -> P:
  """Drops mesh axes from dimensions they do not divide (those dimensions are replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    group = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in group])) if group else 1
    if dim % size:
      logging.info("%s: dim %d not divisible by mesh axes %s; replicated", where, dim, group)
      axes = None
    fitted.append(axes)
  return P(*fitted)


def _names_of(variable) -> tuple[str | None, ...] | None:
  return variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Variable) else None


def tree_shardings(abstract_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for an (abstract) nnx.State: annotated Variables follow their logical names,
  everything else is replicated. The result has the structure of `abstract_tree`."""
  def one(path, leaf):
    where = jax.tree_util.keystr(path)
    names = _names_of(leaf)
    shape = tuple(leaf.shape)
    if not names:
      spec = P()
    else:
      spec = _fit(logical_to_spec(names, rules), shape, mesh, where)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
    one, abstract_tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_shapes(abstract_tree, shardings):
  """`jax.ShapeDtypeStruct`s of `abstract_tree` carrying `shardings`, a prefix tree of it (one
  NamedSharding per nnx.Variable, as `tree_shardings` returns): what a restore lands onto."""
  return jax.tree.map(
    lambda s, sub: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), sub), shardings, abstract_tree)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  """Sharding of an array whose leading axis is the batch."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


# Logical axes of the encoder's activations between blocks, `[B, N, D]`.
ACTIVATION_AXES = ("batch", "tokens", "embed")


def activation_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of the encoder's activations between blocks `[B, N, D]` (`vit.UniViT`'s
  `activation_sharding`): the logical axes ACTIVATION_AXES, i.e. under the default rules the
  batch over ("data", "fsdp") and tokens and width whole. A mesh axis is used once, so when
  `embed` maps to the batch's `fsdp` axis (FSDP: weights split over the devices that split the
  batch) the activations keep their width and split their batch, and each block gathers its
  weights rather than the batch."""
  return NamedSharding(mesh, logical_to_spec(ACTIVATION_AXES, rules))


def constrain(x: jax.Array, target: NamedSharding | None) -> jax.Array:
  """`x` pinned to `target` inside jit (`jax.lax.with_sharding_constraint`); a dimension whose
  mesh axes do not divide it is left replicated (a batch smaller than the mesh). None: `x`
  unchanged, its layout left to GSPMD."""
  if target is None:
    return x
  spec = _fit(target.spec, tuple(x.shape), target.mesh, "activations")
  return jax.lax.with_sharding_constraint(x, NamedSharding(target.mesh, spec))


def logits_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of the partial-FC logits `[N, M]` (`losses.discrimination_loss`): the logical axes
  ("batch", "classes"), i.e. rows over the batch's mesh axes and the sampled classes over the
  class axes the batch leaves free ("model" under the default rules)."""
  return NamedSharding(mesh, logical_to_spec(("batch", "classes"), rules))


def batch_shards(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch axis is split: global batches must be multiples of this."""
  spec = logical_to_spec(("batch",), rules)[0]
  group = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return int(np.prod([mesh.shape[a] for a in group])) if group else 1


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
