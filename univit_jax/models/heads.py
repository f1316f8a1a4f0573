"""Class-centre banks: the trainable cluster centres that the discrimination losses score against.

UniViT discriminates offline clusters in one unified embedding space made of several banks: one
object bank (image-region clusters) and one event bank per temporal granularity g (clips cut into
g ordered segments, each granularity clustered on its own; their names: `univit_jax/specs.py`).
A bank is a matrix W [K, D] of class centres, compared by cosine with the encoder's embeddings
(`univit_jax/losses.py`).

Initialisation follows MLCD / OneVision-Encoder: from the k-means centroids of the bank when they
are given (`clusters/<bank>/centroids.npy`), else normal(0, init_std) with init_std = 0.01
(OneVision-Encoder `training/fused_partial_fc_v2_multi_res.py`). Storage is float32.

Sharding: a bank can hold millions of classes, so its class axis is the one that is split; the
centres carry the logical axis names ("classes", None). The embedding axis is left unnamed on
purpose: the default rules map "classes" to ("fsdp", "model") and "embed" to "fsdp", and a mesh
axis may appear only once in a PartitionSpec, so naming both would either be rejected or silently
drop "fsdp" from the class axis. Keeping the whole row D of a centre on one device also keeps the
row gather of the sampled classes (partial FC) local to the shard that owns it.

The optimiser gives the banks their own learning rate and weight decay (OneVision-Encoder keeps a
separate lr multiplier and weight decay for its PartialFC weights). It finds them by path: every
bank parameter lives under an attribute named `banks` (see `is_bank_param`).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BANKS_ATTRIBUTE = "banks"
LOGICAL_AXES = ("classes", None)


def _constant_init(centroids: np.ndarray):
  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    del key
    return jnp.asarray(centroids, dtype).reshape(shape)
  return init


class ClassBank(nnx.Module):
  """One bank of class centres.

  Attributes:
    centres: nnx.Param [K, D], logical axes ("classes", None).
  """

  def __init__(self, num_classes: int, dim: int, *, rngs: nnx.Rngs,
               centroids: np.ndarray | jax.Array | None = None, init_std: float = 0.01,
               param_dtype: Any = jnp.float32, name: str = "bank"):
    """Builds the centres from `centroids` [K, D] when given, else from normal(0, init_std).

    Raises:
      ValueError: naming the bank, for a non-positive size or centroids of the wrong shape or with
        non-finite values.
    """
    if num_classes <= 0 or dim <= 0:
      raise ValueError(f"bank {name!r}: num_classes={num_classes} and dim={dim} must be positive")
    if centroids is None:
      init = nnx.initializers.normal(init_std)
    else:
      centroids = np.asarray(centroids)
      if centroids.shape != (num_classes, dim):
        raise ValueError(
          f"bank {name!r}: centroids have shape {centroids.shape}, expected "
          f"(num_classes, dim) = {(num_classes, dim)}")
      if not np.all(np.isfinite(centroids)):
        raise ValueError(f"bank {name!r}: centroids contain non-finite values")
      init = _constant_init(centroids)
    self.num_classes = num_classes
    self.dim = dim
    self.centres = nnx.Param(
      nnx.with_partitioning(init, LOGICAL_AXES)(rngs.params(), (num_classes, dim), param_dtype))


class ClassBanks(nnx.Module):
  """The unified label space: named banks, e.g. "object", "event_1", "event_2", "event_4", ...

  Attributes:
    banks: nnx.Dict name -> ClassBank. Every bank parameter's path passes through this attribute
      (`BANKS_ATTRIBUTE`), which is how the optimiser labels them.
  """

  def __init__(self, sizes: Mapping[str, int], dim: int, *, rngs: nnx.Rngs,
               centroids: Mapping[str, np.ndarray | jax.Array] | None = None,
               init_std: float = 0.01, param_dtype: Any = jnp.float32):
    """Builds one bank per entry of `sizes` (name -> number of classes).

    Args:
      sizes: bank name -> K.
      dim: embedding width D (the encoder's output).
      rngs: `rngs.params` draws the random initialisation.
      centroids: optional bank name -> k-means centroids [K, D]; banks not named are random.
      init_std: standard deviation of the random initialisation.
      param_dtype: storage dtype of the centres.

    Raises:
      ValueError: for no banks, or centroids for a bank that is not in `sizes`.
    """
    centroids = dict(centroids or {})
    if not sizes:
      raise ValueError("ClassBanks needs at least one bank in `sizes`")
    unknown = sorted(set(centroids) - set(sizes))
    if unknown:
      raise ValueError(f"centroids given for unknown banks {unknown}; banks are {sorted(sizes)}")
    self.banks = nnx.Dict({
      name: ClassBank(size, dim, rngs=rngs, centroids=centroids.get(name), init_std=init_std,
                      param_dtype=param_dtype, name=name)
      for name, size in sizes.items()})

  def __getitem__(self, name: str) -> ClassBank:
    if name not in self.banks:
      raise KeyError(f"no bank named {name!r}; banks are {sorted(self.banks)}")
    return self.banks[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self.banks)


def is_bank_param(path: Sequence[Any]) -> bool:
  """Whether a parameter path (nnx state keys or jax tree-path entries) lies in a bank."""
  for entry in path:
    key = getattr(entry, "key", getattr(entry, "name", entry))
    if key == BANKS_ATTRIBUTE:
      return True
  return False
