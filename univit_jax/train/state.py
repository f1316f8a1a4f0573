"""The train state: a plain pytree (step, params, opt_state, rng), created sharded inside jit.

`params` is the `nnx.State` of a `Model` (the encoder plus its class-centre banks); the graph
definition stays outside the state, so the train step is a pure function of arrays.
"""

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from univit_jax import checkpointing, config_lib, optim, paths, provenance, run_config, sharding
from univit_jax import encoder as encoder_lib
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
                 shardings: TrainState, seed: int, encoder: nnx.State | None = None
                 ) -> TrainState:
  """A fresh state, born sharded inside jit.

  Banks named in `centroids` start from those k-means centroids [K, width]; the others keep the
  random N(0, 0.01) initialisation of `heads.ClassBank`. The centroids are read on the host and
  copied shard by shard onto the bank sharding (`jax.make_array_from_callback`), never embedded
  in the compiled program as constants. `encoder`, when given (already on the encoder's
  shardings, e.g. an export restored by `load_encoder_params`), replaces the random encoder.

  Raises:
    ValueError: centroids of a bank whose shape is not [bank size, model width].
  """
  for name, c in centroids.items():
    if c.shape != (bank_sizes[name], cfg.width):
      raise ValueError(f"bank {name!r}: centroids {c.shape} do not match the bank "
                       f"({bank_sizes[name]}, {cfg.width})")

  def create(banks: dict[str, jax.Array], encoder: nnx.State | None) -> TrainState:
    with nnx.use_eager_sharding(False):
      params = nnx.split(Model(cfg, bank_sizes, rngs=nnx.Rngs(seed)))[1]
    for name, centres in banks.items():
      params["heads"]["banks"][name]["centres"].set_value(centres.astype(cfg.param_dtype))
    if encoder is not None:
      params["encoder"] = encoder
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))

  bank_shardings = {name: shardings.params["heads"]["banks"][name]["centres"]
                    for name in centroids}
  banks = {name: jax.make_array_from_callback(c.shape, bank_shardings[name],
                                               lambda index, c=c: np.asarray(c[index], np.float32))
           for name, c in centroids.items()}
  encoder_shardings = None if encoder is None else shardings.params["encoder"]
  return jax.jit(create, in_shardings=(bank_shardings, encoder_shardings),
                 out_shardings=shardings)(banks, encoder)


def load_encoder_params(path: str, model: config_lib.ModelConfig,
                        abstract: TrainState) -> nnx.State:
  """The encoder parameters of the export at `path`, restored onto `abstract.params["encoder"]`
  (shapes and shardings of this run, whose encoder is `model`), to start a run from
  (`train.init_encoder`).

  Raises:
    ConfigError: the export's model has another shape than this run's (names both).
  """
  exported = model_shape(encoder_lib.read_spec(path).model)
  ours = model_shape(model)
  if exported != ours:
    raise config_lib.ConfigError(
      f"train.init_encoder={path!r}: its model {exported} differs from this run's {ours}")
  params, _ = checkpointing.load_export(path, abstract.params["encoder"])
  return params


def checkpoint_encoder(run: run_config.RunConfig, workdir: str, step: int | None = None,
                       mesh: Mesh | None = None) -> tuple[str, int, nnx.State]:
  """The encoder parameters of a run's checkpoint, placed for inference
  (`encoder.inference_shapes`).

  The run is the first of `encoder.run_folders(workdir, run.rounds)` with a checkpoint: the
  workdir's own (a `train` run), else the newest pipeline round's. Only the encoder's arrays are
  read (`Checkpointer.restore_part`), not the class banks nor the optimiser moments, so neither
  the cluster outputs nor `train_run.json` are needed.

  Args:
    run: the run's config (its model, data and mesh: `encoder.EncoderSpec.from_sections`).
    workdir: the run's folder.
    step: the checkpoint's step; None: the newest.
    mesh: as for `encoder.load_encoder`.

  Returns:
    (the run's folder, the step, the encoder parameters).

  Raises:
    FileNotFoundError: no checkpoint in any of the folders, or none for `step` in the run's.
  """
  _, shapes = encoder_lib.inference_shapes(
    encoder_lib.EncoderSpec.from_sections(run.model, run.data, run.mesh), mesh)
  for folder in encoder_lib.run_folders(workdir, run.rounds):
    directory = os.path.join(folder, "checkpoints")
    if not paths.path(directory).is_dir():
      continue
    with checkpointing.Checkpointer(directory) as ckpt:
      latest = ckpt.latest_step()
      if latest is None:
        continue
      step = latest if step is None else step
      part = ckpt.restore_part(step, {"params": {"encoder": shapes}})
    return folder, step, part["params"]["encoder"]
  raise FileNotFoundError(
    f"no checkpoint in {workdir} (looked in checkpoints/ and round_<r>/checkpoints/)")


def model_shape(m: config_lib.ModelConfig) -> dict:
  """The fields of a model config that fix its parameter shapes."""
  return dict(width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
              patch_size=m.patch_size, channels=m.channels, scan=m.scan,
              param_dtype=m.param_dtype, time_embedding=m.time_embedding)


def fingerprint(run: run_config.RunConfig, bank_sizes: Mapping[str, int],
                label_versions: Mapping[str, str], opt_state: optax.OptState,
                data: Mapping[str, Any]) -> dict:
  """What a checkpoint must agree with to be resumed (`train_run.json`; docs/training.md,
  "Resuming with another config"), as JSON.

  A resume is refused when one of these differs: `model` (the parameter shapes and what the
  parameters mean: `model.rope`), `bank_sizes`, `label_versions`, `data` (what fixes the
  batches: `pipeline.batches_fingerprint`) and `optimizer` (the optimiser state's parts, e.g.
  `ScaleByAdamState`: another list is another state tree). `schedule` (total_steps and the
  fields of the learning-rate and loss schedules, functions of step / total_steps) may differ
  only with `train.allow_schedule_change`.

  Args:
    run: the run's config (its model, total_steps, optim section and `loss.event_schedule`
      as given: without clips a run uses none of it, but records it all the same).
    bank_sizes: classes per trained bank.
    label_versions: the cluster-label version of each trained bank.
    opt_state: the optimiser state (abstract is enough).
    data: `pipeline.batches_fingerprint` of the run's data.
  """
  # optax.chain's state is a plain tuple of its parts' states (which are NamedTuples).
  chain = isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields")
  parts = opt_state if chain else (opt_state,)
  return provenance.jsonable(dict(
    model=dict(model_shape(run.model), rope=dataclasses.asdict(run.model.rope)),
    bank_sizes=dict(bank_sizes), label_versions=dict(label_versions), data=dict(data),
    optimizer=[type(part).__name__ for part in parts],
    schedule=dict(total_steps=run.train.total_steps,
                  optim={f: getattr(run.optim, f) for f in optim.SCHEDULE_FIELDS},
                  loss=dict(event_schedule=run.record["loss"]["event_schedule"]))))
