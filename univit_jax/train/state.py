"""The train state: a plain pytree (step, params, opt_state, rng), created sharded inside jit.

`params` is the `nnx.State` of a `Model` (the encoder plus its class-centre banks); the graph
definition stays outside the state, so the train step is a pure function of arrays.
"""

from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from univit_jax import config_lib, sharding
from univit_jax.models import heads, vit


class Model(nnx.Module):
  """The encoder and the unified label space (`heads.ClassBanks`) it is trained against."""

  def __init__(self, cfg: config_lib.ModelConfig, bank_sizes: Mapping[str, int], *,
               rngs: nnx.Rngs):
    self.encoder = vit.UniViT(cfg, rngs=rngs)
    self.heads = heads.ClassBanks(bank_sizes, cfg.width, rngs=rngs)


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32 [] steps done.
    params: nnx.State of `Model`.
    opt_state: the optax state.
    rng: uint32 [2] base key; step s uses fold_in(rng, s), so a resumed run draws the same
      randomness as an uninterrupted one.
  """
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


def abstract_model(cfg: config_lib.ModelConfig, bank_sizes: Mapping[str, int]
                   ) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graph and parameter shapes, without allocating weights."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Model(cfg, bank_sizes, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def state_shardings(abstract_params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: sharding.Rules) -> TrainState:
  """NamedShardings of every state leaf: parameters and their optimiser moments follow the
  parameters' logical axes; counters and the rng are replicated."""
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  return TrainState(
    step=sharding.replicated(mesh),
    params=sharding.tree_shardings(abstract_params, mesh, rules),
    opt_state=sharding.tree_shardings(abstract_opt, mesh, rules),
    rng=sharding.replicated(mesh))


def abstract_state(cfg: config_lib.ModelConfig, bank_sizes: Mapping[str, int],
                   tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
  """`jax.ShapeDtypeStruct`s (with shardings) of the state, to restore a checkpoint onto."""
  _, params = abstract_model(cfg, bank_sizes)
  shapes = TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
    opt_state=jax.eval_shape(tx.init, params),
    rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
  return sharding.sharded_shapes(shapes, shardings)


def create_state(cfg: config_lib.ModelConfig, bank_sizes: Mapping[str, int],
                 centroids: Mapping[str, np.ndarray], tx: optax.GradientTransformation,
                 shardings: TrainState, seed: int) -> TrainState:
  """A fresh state, born sharded inside jit.

  Banks named in `centroids` start from those k-means centroids [K, width]; the others keep the
  random N(0, 0.01) initialisation of `heads.ClassBank`. The centroids are read on the host and
  copied shard by shard onto the bank sharding (`jax.make_array_from_callback`), never embedded
  in the compiled program as constants.

  Raises:
    ValueError: centroids of a bank whose shape is not [bank size, model width].
  """
  for name, c in centroids.items():
    if c.shape != (bank_sizes[name], cfg.width):
      raise ValueError(f"bank {name!r}: centroids {c.shape} do not match the bank "
                       f"({bank_sizes[name]}, {cfg.width})")

  def create(banks: dict[str, jax.Array]) -> TrainState:
    with nnx.use_eager_sharding(False):
      params = nnx.split(Model(cfg, bank_sizes, rngs=nnx.Rngs(seed)))[1]
    for name, centres in banks.items():
      params["heads"]["banks"][name]["centres"].set_value(centres.astype(cfg.param_dtype))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))

  bank_shardings = {name: shardings.params["heads"]["banks"][name]["centres"]
                    for name in centroids}
  banks = {name: jax.make_array_from_callback(c.shape, bank_shardings[name],
                                               lambda index, c=c: np.asarray(c[index], np.float32))
           for name, c in centroids.items()}
  return jax.jit(create, in_shardings=(bank_shardings,), out_shardings=shardings)(banks)


def fingerprint(config: ml_collections.ConfigDict, bank_sizes: Mapping[str, int],
                label_versions: Mapping[str, str]) -> dict:
  """What a checkpoint must agree with to be resumed: model shape, banks and label versions."""
  m = config_lib.model_config(config)
  return dict(
    model=dict(width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
               patch_size=m.patch_size, channels=m.channels, scan=m.scan,
               param_dtype=m.param_dtype),
    bank_sizes=dict(sorted(bank_sizes.items())),
    label_versions=dict(sorted(label_versions.items())))
