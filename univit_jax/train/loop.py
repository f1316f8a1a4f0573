"""The `train` mode: the preemption-safe training loop.

  python -m univit_jax.main --config=configs/demo.py --workdir=DIR --mode=train

Reads `clusters/<bank>/` (under `config.train.clusters_workdir`, default DIR) for every bank with
a positive `config.loss.bank_weights` entry that the data feeds (`RunConfig.parts`: no
event banks without clips, no object bank without images), and writes under DIR:
  checkpoints/<step>/   Orbax: train state + data-iterator position (async, newest N kept)
  train_run.json        what the checkpoints belong to (`state_lib.fingerprint`): model, bank
                        sizes, label versions, data, optimiser parts, schedule
  metrics.jsonl         one record per `log_every` steps; tensorboard/ the same as events
  training.png          the loss terms against the step (at the end of the run)
  jax_cache/            the persistent compilation cache (unless configured elsewhere)

Safety: the run resumes from the newest checkpoint (bit-exact on CPU: same state, same batches, same
per-step randomness); it refuses a checkpoint made for other cluster labels, model, banks, data or
optimiser, and one made for another schedule unless `train.allow_schedule_change`
(`check_compatible`; docs/training.md); it attaches cluster labels by record key, refusing labels
made for another version of a source that numbers its records, or that leave too many records
without labels (`labels_lib.load_bank`); SIGTERM saves the current step and returns; SIGKILL loses
the steps since the last save; a non-finite loss or gradient raises `NonFiniteError` naming the step
and term, without saving (the step itself leaves the state untouched). A bank whose class count the
mesh's class shards do not divide is kept whole on every device; a warning names it and the nearest
class counts that would be split (`config_lib.replicated_bank`).
"""

import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Self

import jax
import numpy as np
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from univit_jax import atomic, checkpointing, collectives, config_lib, optim, provenance, run_config
from univit_jax import paths, sharding
from univit_jax.clustering import extract
from univit_jax.data import pipeline
from univit_jax.run_config import data_config, stage_config
from univit_jax.train import labels as labels_lib
from univit_jax.train import logs
from univit_jax.train import state as state_lib
from univit_jax.train import step as step_lib

RUN_FILE = "train_run.json"


class NonFiniteError(RuntimeError):
  """A step produced a non-finite loss or gradient; the message names the step and term."""


class CheckpointMismatchError(ValueError):
  """The checkpoints in the workdir belong to another model, bank layout or label version."""


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """How `run_train` ended.

  Attributes:
    step: the step reached (total_steps, or where a SIGTERM stopped the run).
    preempted: stopped by SIGTERM (after saving `step`).
    label_versions: bank -> cluster-label version trained on.
    state: the final train state.
    data_state: the data iterator's position (grain state).
    compile_s: seconds spent compiling the step of every bucket (0 when nothing was trained).
  """
  step: int
  preempted: bool
  label_versions: dict[str, str]
  state: state_lib.TrainState
  data_state: Any
  compile_s: float = 0.0


def compilation_cache_dir(train: stage_config.TrainConfig, workdir: str) -> str:
  """Where training keeps its persistent XLA cache: `train.compilation_cache_dir`, else
  `$JAX_COMPILATION_CACHE_DIR` (JAX's own setting, which the launch scripts set so that every
  run on a machine shares one cache), else `<workdir>/jax_cache`; "none" turns it off."""
  return (train.compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
          or os.path.join(workdir, "jax_cache"))


def _compilation_cache(train: stage_config.TrainConfig, workdir: str) -> None:
  """Points the persistent compilation cache at `compilation_cache_dir`.

  JAX decides once per process whether the cache is used, at the first compile; an earlier stage
  in the same process (extraction in --mode=pipeline) may have compiled already, so the decision
  is reset when the folder changes.
  """
  path = compilation_cache_dir(train, workdir)
  if path != "none" and jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()


# Teacher names (as `extract` records them) whose feature space is not one of our encoders'.
FOREIGN_TEACHERS = ("pixels", extract.SIGLIP, extract.FEATURES)


def initial_centroids(banks: dict[str, labels_lib.BankLabels], width: int, mode: str
                      ) -> dict[str, np.ndarray]:
  """The banks initialised from their k-means centroids (`train.bank_init`).

  "auto": every bank whose centroids have the encoder's width and come from a UniViT encoder
  teacher; a bank clustered in another feature space (the `pixels` bootstrap, a SigLIP tower,
  precomputed features, or a width that differs, e.g. concatenated segment features) starts
  from N(0, 0.01) instead. "random": none.

  Raises:
    config_lib.ConfigError: for an unknown mode.
  """
  if mode not in stage_config.BANK_INITS:
    raise config_lib.ConfigError(
      f"train.bank_init={mode!r}: expected one of {stage_config.BANK_INITS}")
  chosen = {} if mode == "random" else {
    name: bank.centroids for name, bank in banks.items()
    if bank.centroids.shape[1] == width and not bank.teacher.startswith(FOREIGN_TEACHERS)}
  for name, bank in banks.items():
    logging.info("Bank %s: %d classes, initialised from %s", name, bank.num_classes,
                 "its k-means centroids" if name in chosen else
                 f"N(0, 0.01) (centroids: width {bank.centroids.shape[1]}, teacher "
                 f"{bank.teacher or 'unknown'}; encoder width {width})")
  return chosen


# The sections of the run fingerprint (`state_lib.fingerprint`) a resume must match, in the
# order they are checked, each with what a refusal calls it.
_REFUSED = (
  ("label_versions", "cluster-label versions"),
  ("bank_sizes", "class-bank sizes"),
  ("model", "model shape or parameter meaning"),
  ("data", "data (what fixes the batches and the data iterator's saved position)"),
  ("optimizer", "optimiser state parts (optim.grad_clip_norm > 0 and optim.bank_lr_scale != 1 "
                "each add one)"),
)


def check_compatible(workdir: str, fingerprint: dict, allow_schedule_change: bool = False
                     ) -> list[str]:
  """Refuses to resume checkpoints recorded (in `RUN_FILE`) with another run fingerprint
  (`state_lib.fingerprint`; docs/training.md, "Resuming with another config").

  Args:
    workdir: the run's folder.
    fingerprint: this run's.
    allow_schedule_change: `train.allow_schedule_change`: accept another `schedule` section.

  Returns:
    The schedule changes accepted, e.g. ["total_steps was 6, now 4"]; empty when none.

  Raises:
    CheckpointMismatchError: naming each difference in the first section that differs (or the
      schedule's without `allow_schedule_change`) and how to proceed.
  """
  path = os.path.join(workdir, RUN_FILE)
  if not paths.path(path).exists():
    raise CheckpointMismatchError(
      f"{workdir}/checkpoints has checkpoints but {path} is missing, so their cluster labels and "
      "model shape are unknown; train in a new workdir")
  saved = json.loads(paths.path(path).read_text())
  for section, what in _REFUSED:
    changed = provenance.differences(saved.get(section), fingerprint[section], section)
    if changed:
      raise CheckpointMismatchError(
        f"the checkpoints in {workdir}/checkpoints were made with other {what}: "
        f"{'; '.join(changed)}. Refusing to resume; use a new workdir (or restore the matching "
        "clusters/ and config)")
  changed = provenance.differences(saved.get("schedule"), fingerprint["schedule"])
  if changed and not allow_schedule_change:
    raise CheckpointMismatchError(
      f"the checkpoints in {workdir}/checkpoints were made for another schedule: "
      f"{'; '.join(changed)}. The learning rate and the loss curriculum are functions of step / "
      "total_steps, so resuming would change them mid-run; set "
      "--config.train.allow_schedule_change=True to resume on the new schedules from the "
      "restored step on, or use a new workdir")
  return changed


def _nonfinite_message(step: int, metrics: dict[str, Any], last_saved: int | None) -> str:
  bad = sorted(name[:-len("/loss")] for name, value in metrics.items()
               if name.endswith("/loss") and not np.isfinite(value))
  what = (f"loss term(s) {bad}" if bad else
          "total loss" if not np.isfinite(metrics["loss"]) else "gradient")
  return (f"non-finite {what} at step {step} (loss={metrics['loss']}, "
          f"grad_norm={metrics['grad_norm']}); stopped without saving. The last good checkpoint "
          f"is step {last_saved}" + ("" if last_saved is not None else " (none)"))


def _loggable(metrics: dict[str, Any]) -> dict[str, Any]:
  """The metrics to record: a term with no valid row in this batch (e.g. the object bank in a
  clip bucket) is left out rather than logged as a misleading 0."""
  empty = {k[:-len("/valid_rows")] for k, v in metrics.items()
           if k.endswith("/valid_rows") and v == 0}
  return {k: v for k, v in metrics.items()
          if k != "finite" and k.split("/", 1)[0] not in empty}


class _Preemption:
  """Remembers a SIGTERM so the loop can save and return at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> Self:
    # Python delivers signals to the main thread only; elsewhere SIGTERM keeps its old handler.
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process was asked to stop (all processes must save the same step)."""
    return collectives.any_process(self.requested)

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def run_train(run: run_config.RunConfig, workdir: str,
              evaluate: Callable[[int, Any], Mapping[str, float]] | None = None
              ) -> TrainResult:
  """Trains `train.total_steps` steps in `workdir`, resuming from its newest checkpoint.

  `evaluate(step, encoder_params) -> {name: value}` (e.g. `evaluation.run.training_evaluator`)
  runs every `eval.every` steps and at the end; its values are logged with the step.

  Raises:
    config_lib.ConfigError: no workdir, or an export to start from of another model.
    labels_lib.LabelError: missing or inconsistent cluster outputs, labels made for another
      version of a source that numbers its records, or too many records without labels.
    CheckpointMismatchError: checkpoints the config may not resume (`check_compatible`).
    NonFiniteError: a non-finite loss or gradient.
  """
  if not workdir:
    raise config_lib.ConfigError("--workdir is required for --mode=train")
  model_cfg, loss_cfg, data_cfg, train = run.model, run.loss, run.data, run.train
  total = train.total_steps
  paths.path(workdir).mkdir(parents=True, exist_ok=True)
  _compilation_cache(train, workdir)

  sources = pipeline.open_sources(data_cfg)
  names = loss_cfg.trained_banks
  banks = labels_lib.load_banks(train.clusters_workdir or workdir, names,
                                labels_lib.examples_of(data_cfg, sources),
                                train.max_unlabelled_fraction)
  sizes = {name: bank.num_classes for name, bank in banks.items()}
  versions = {name: bank.version for name, bank in banks.items()}
  initial = initial_centroids(banks, model_cfg.width, train.bank_init)

  mesh = sharding.make_mesh(run.mesh)
  rules = run.mesh.rules
  class_shards = run.mesh.shards("classes", mesh.size)
  for name, k in sizes.items():
    replicated = config_lib.replicated_bank(name, k, class_shards)
    if replicated:
      logging.warning("%s (clusters in %s; cluster.num_clusters.%s)", replicated,
                      train.clusters_workdir or workdir, name)
  tx = optim.make_optimizer(run.optim, total)
  learning_rate = optim.learning_rate(run.optim, total)
  graphdef, abstract_params = state_lib.abstract_model(model_cfg, sizes)
  shardings = state_lib.state_shardings(abstract_params, tx, mesh, rules)
  abstract = state_lib.abstract_state(model_cfg, sizes, tx, shardings)

  batch_multiple = sharding.batch_shards(mesh, rules)
  batch_sizes = data_cfg.batch_sizes(math.lcm(batch_multiple, jax.process_count()))
  iterator = iter(pipeline.build_train_dataset(data_cfg, sources=sources,
                                               batch_multiple=batch_multiple)
                  .map(labels_lib.LabelAttacher(banks, loss_cfg.image_labels)))

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=train.keep_checkpoints)
  fingerprint = state_lib.fingerprint(run, sizes, versions, abstract.opt_state,
                                      pipeline.batches_fingerprint(data_cfg, sources,
                                                                   batch_sizes))
  try:
    latest = ckpt.latest_step()
    if latest is None:
      start = (state_lib.load_encoder_params(train.init_encoder, model_cfg, abstract)
               if train.init_encoder else None)
      state = state_lib.create_state(model_cfg, sizes, initial, tx, shardings, run.seed, start)
      if jax.process_index() == 0:
        atomic.write_json(os.path.join(workdir, RUN_FILE), fingerprint)
    else:
      accepted = check_compatible(workdir, fingerprint, train.allow_schedule_change)
      state = ckpt.restore(latest, abstract, iterator)
      if jax.process_index() == 0:
        if accepted:  # the schedule now in force is the one later resumes compare with
          atomic.write_json(os.path.join(workdir, RUN_FILE), fingerprint)
        print(f"Resumed from step {latest} in {workdir}" + (
          f" on a new schedule ({'; '.join(accepted)})" if accepted else ""), flush=True)
    job = _Run(train=train, eval_every=run.eval.every, workdir=workdir, banks=banks,
               graphdef=graphdef, tx=tx, learning_rate=learning_rate, loss_cfg=loss_cfg,
               abstract=abstract, shardings=shardings, mesh=mesh, rules=rules,
               data_cfg=data_cfg, batch_sizes=batch_sizes, evaluate=evaluate)
    result = _loop(job, state, iterator, ckpt)
  finally:
    ckpt.close()  # after the saves, which read the iterator's position
    # Stops the grain worker processes and frees their shared memory now, not when (or if) the
    # iterator is collected: a pipeline goes on to the next round in this process.
    iterator.close()
  # Process 0 wrote train_run.json, metrics.jsonl and training.png: whole before any process
  # goes on to read them (a pipeline's round summary).
  collectives.barrier("train done")
  return result


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the loop needs besides the state, the iterator and the checkpointer."""
  train: stage_config.TrainConfig
  eval_every: int
  workdir: str
  banks: dict[str, labels_lib.BankLabels]
  graphdef: Any
  tx: Any
  learning_rate: Any
  loss_cfg: config_lib.LossConfig
  abstract: state_lib.TrainState
  shardings: state_lib.TrainState
  mesh: jax.sharding.Mesh
  rules: tuple
  data_cfg: data_config.DataConfig
  batch_sizes: dict[int, int]
  evaluate: Callable[[int, Any], Mapping[str, float]] | None = None


def _compile_buckets(run: _Run, has_boxes: bool) -> tuple[dict, dict]:
  """One compiled step per frame bucket, and the batch keys each step takes.

  The buckets' gradients compile one by one; their update, which depends only on the
  parameters, compiles once and is shared (`step_lib.TrainStep`).
  """
  names = tuple(run.banks)
  top_k = max(bank.top_k for bank in run.banks.values())
  batch_sharding = sharding.batch_sharding(run.mesh, run.rules)
  replicated = sharding.replicated(run.mesh)
  update = step_lib.compile_update(step_lib.make_update(run.tx, run.learning_rate),
                                   run.abstract, run.shardings, replicated)
  compiled, inputs = {}, {}
  for t in run.data_cfg.frames:
    spec = step_lib.StepSpec.for_bucket(t, names, has_boxes)
    batch = step_lib.abstract_batch(run.data_cfg, spec, run.batch_sizes[t], top_k,
                                    run.loss_cfg.image_labels)
    inputs[t] = tuple(batch)
    train_step = step_lib.make_train_step(
      run.graphdef, run.tx, run.learning_rate, run.loss_cfg, spec,
      sharding.logits_sharding(run.mesh, run.rules),
      sharding.activation_sharding(run.mesh, run.rules))
    gradients = step_lib.compile_gradients(
      train_step, run.abstract, run.shardings, batch, {k: batch_sharding for k in batch},
      step_lib.term_weights(run.loss_cfg, 0.0, names), replicated)
    compiled[t] = step_lib.TrainStep(gradients=gradients, update=update)
  return compiled, inputs


class StepWindow:
  """Throughput and input wait over the steps since the last metrics record.

  `data_wait_s` is the time the loop spent waiting for the next host batch (`next(iterator)`:
  decoding in this process, or the grain workers not keeping up), `to_device_s` the time
  assembling it into global device arrays (`pipeline.to_global_batch`: the host-to-device copy
  where it is synchronous); both are per step, so `(data_wait_s + to_device_s) / step_time_s` is
  the fraction of the step the input stalled it (benchmarks/input_stalls.py).
  """

  def __init__(self, tokens_per_frame: int):
    self._tokens_per_frame = tokens_per_frame
    self._reset()

  def _reset(self) -> None:
    self._start = time.perf_counter()
    self._steps = self._samples = self._tokens = 0
    self._data_wait = self._to_device = 0.0

  def add_step(self, batch_size: int, num_frames: int, data_wait: float,
               to_device: float) -> None:
    """Counts one step of `batch_size` global examples of `num_frames` frames."""
    self._steps += 1
    self._samples += batch_size
    self._tokens += batch_size * num_frames * self._tokens_per_frame
    self._data_wait += data_wait
    self._to_device += to_device

  def take(self) -> dict[str, float]:
    """The window's rates and per-step times; starts the next window."""
    elapsed = time.perf_counter() - self._start
    out = dict(samples_per_s=self._samples / elapsed, tokens_per_s=self._tokens / elapsed,
               step_time_s=elapsed / self._steps, data_wait_s=self._data_wait / self._steps,
               to_device_s=self._to_device / self._steps)
    self._reset()
    return out


def _progress_bar(run: _Run, step: int):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=run.train.total_steps, initial=step, unit="step", dynamic_ncols=True,
              disable=not run.train.progress_bar or jax.process_index() != 0)


def _loop(run: _Run, state: state_lib.TrainState, iterator, ckpt: checkpointing.Checkpointer
          ) -> TrainResult:
  workdir, data_cfg, loss_cfg = run.workdir, run.data_cfg, run.loss_cfg
  names, versions = tuple(run.banks), {n: b.version for n, b in run.banks.items()}
  train, total = run.train, run.train.total_steps
  step = int(jax.device_get(state.step))
  batch_sharding = sharding.batch_sharding(run.mesh, run.rules)
  logger = logs.MetricsLogger(workdir, step)
  if step >= total:
    logger.close()
    return TrainResult(step=step, preempted=False, label_versions=versions, state=state,
                       data_state=iterator.get_state())

  # The first batch tells whether batches carry boxes; then every bucket compiles up front.
  first = next(iterator)
  start = time.perf_counter()
  compiled, inputs = _compile_buckets(run, "boxes" in first)
  compile_s = time.perf_counter() - start
  logging.info("Compiled %d buckets in %.1fs", len(compiled), compile_s)

  preempted = False
  bar = _progress_bar(run, step)
  window = StepWindow(config_lib.tokens_per_frame(data_cfg.image_size, data_cfg.patch_size))

  def fetch(index: int, metrics: dict[str, jax.Array]) -> dict[str, Any]:
    """The metrics of step `index` (0-based) on the host; raises if that step was not finite."""
    metrics = jax.device_get(metrics)
    if not metrics["finite"]:
      raise NonFiniteError(_nonfinite_message(index, metrics, ckpt.latest_step()))
    return metrics

  # A step's metrics are fetched after the next step is dispatched, except where the loop needs
  # them or the state at once (logging, evaluation, saving, the last step): the host reads and
  # places the next batch while the devices compute, instead of waiting for every step to end.
  # A non-finite step is then reported one step late, never after a save.
  pending = None
  try:
    with _Preemption() as preemption:
      while step < total:
        if preemption.agreed():
          if pending is not None:
            fetch(*pending)
          # Before this process's first step the iterator is one batch ahead (`first`), and the
          # step is either saved already (a resume) or 0 (nothing to keep): save nothing then.
          if first is None and ckpt.latest_step() != step:
            ckpt.save(step, state, iterator, force=True)
          logging.warning("SIGTERM at step %d: checkpoint saved; exiting", step)
          preempted = True
          break
        asked = time.perf_counter()
        host = first if first is not None else next(iterator)
        first = None
        received = time.perf_counter()
        t = host["frames"].shape[1]
        batch = pipeline.to_global_batch({k: host[k] for k in inputs[t]}, batch_sharding)
        on_device = time.perf_counter()
        weights = step_lib.term_weights(loss_cfg, step / total, names)
        state, metrics = compiled[t](state, batch, weights)
        if pending is not None:
          fetch(*pending)
        pending = (step, metrics)
        step += 1
        window.add_step(host["frames"].shape[0] * jax.process_count(), t,
                        data_wait=received - asked, to_device=on_device - received)
        logged = step % train.log_every == 0 or step == total
        evaluated = run.evaluate is not None and (step % run.eval_every == 0 or step == total)
        saved = step % train.checkpoint_every == 0 or step == total
        if logged or evaluated or saved:
          metrics, pending = fetch(*pending), None
        if logged:
          record = _loggable(metrics)
          record.update(frames=t, **window.take())
          logger.write(step, record)
          if record["embedding_cosine"] > train.collapse_threshold:
            logging.warning(
              "Possible collapse at step %d: mean pairwise cosine of embeddings %.3f > "
              "train.collapse_threshold=%.3f", step, record["embedding_cosine"],
              train.collapse_threshold)
          bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        if evaluated:
          logger.write(step, run.evaluate(step, state.params["encoder"]))
        if saved:
          ckpt.save(step, state, iterator, force=True)
        bar.update(1)
  finally:
    bar.close()
    logger.close()
    ckpt.wait_until_finished()
  logs.plot_losses(workdir)
  return TrainResult(step=step, preempted=preempted, label_versions=versions, state=state,
                     data_state=iterator.get_state(), compile_s=compile_s)
