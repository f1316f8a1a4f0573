"""Checkpoints: the one module that talks to Orbax (its API moves; only this file should follow).

Training checkpoints (`Checkpointer`) hold two items per step under `directory/<step>/`:
  state  the train-state pytree (Orbax StandardSave; arrays keep their sharding), and
  data   the grain iterator position of every host (`process_<i>-of-<n>.json`),
so a resumed run sees exactly the batches an uninterrupted run would have. Saves are
asynchronous (`wait_until_finished` before exiting) and the newest `max_to_keep` are kept.

  ckpt = checkpointing.Checkpointer(workdir / "checkpoints", max_to_keep=3)
  step = ckpt.latest_step()
  if step is not None:
    state = ckpt.restore(step, abstract_state, data_iterator)   # data_iterator moved in place
  ...
  ckpt.save(step, state, data_iterator)
  ckpt.wait_until_finished()

Exports (`save_export` / `load_export`) are params-only Orbax checkpoints plus the config as
JSON, for inference and as the next round's teacher:
  <path>/params/       the parameter pytree
  <path>/config.json   the run's config
  <path>/...           files the caller adds (`univit_jax.encoder`: encoder.json,
                       encoder.safetensors)
  <path>/COMPLETE      written last: only a folder holding it is an export (`is_export`)
Locally an export is built in a sibling folder and renamed into place, so a kill while
(re-)exporting leaves the previous export or none, never old files beside missing or partial new
ones. On an object store (no rename) the old export's marker is deleted first and the new one
written in place, marker last (`atomic.commit_dir`): it is an export again only when complete.

Orbax writes arrays through TensorStore, which reaches local folders and `gs://` only
(`check_location`); the rest of a checkpoint goes through `epath`.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from univit_jax import atomic, collectives, paths

_STATE, _DATA = "state", "data"
# The schemes TensorStore, under Orbax, writes arrays to (None: a local path).
_TENSORSTORE_SCHEMES = (None, "gs")
_EXPORT_COMPLETE = "COMPLETE"


def check_location(path: str | os.PathLike, what: str) -> None:
  """Refuses a folder Orbax cannot write checkpoints or exports to.

  Orbax 0.12 stores arrays through TensorStore with its `file` driver or, for `gs://`, its `gcs`
  driver; any other scheme (s3://, a scheme fsspec serves) would become a relative local path.

  Raises:
    paths.StorageError: naming `what` and `path`.
  """
  if paths.scheme(path) not in _TENSORSTORE_SCHEMES:
    raise paths.StorageError(
      f"{what}={os.fspath(path)}: Orbax checkpoints and exports are written through TensorStore, "
      f"which reaches local folders and gs:// only, not {paths.scheme(path)}://")


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs, asynchronously, keeping the last N.

  Args:
    directory: where step folders are written (created if missing).
    max_to_keep: number of newest checkpoints kept; older ones are deleted.
    save_interval_steps: `save` ignores steps that are not multiples of this (unless forced).
    async_save: write in a background thread (arrays are copied to host first).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               save_interval_steps: int = 1, async_save: bool = True):
    self.directory = paths.path(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
        enable_async_checkpointing=async_save),
      item_names=(_STATE, _DATA))

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None, *,
           force: bool = False) -> bool:
    """Starts saving `state` (and the iterator's position) as `step`; True if a save started.

    The iterator state is read now, synchronously, so the caller may keep iterating at once.
    """
    items = {_STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator | None = None) -> Any:
    """Restores the state of `step`; moves `data_iterator` (if given) to the saved position.

    Args:
      step: a step from `latest_step` / `all_steps`.
      abstract_state: a pytree of `jax.ShapeDtypeStruct` (with shardings) shaped like the
        saved state, e.g. from `jax.eval_shape`; arrays are restored onto those shardings.
      data_iterator: a fresh iterator of the same pipeline (same sources, worker count and host
        layout); restored in place.

    Raises:
      FileNotFoundError: no checkpoint for `step`.
    """
    self._check_step(step)
    items = {_STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored[_STATE]

  def restore_part(self, step: int, abstract_part: dict[str, Any]) -> dict[str, Any]:
    """Restores only some arrays of the state of `step`; nothing else is read from disk.

    Args:
      step: a step from `latest_step` / `all_steps`.
      abstract_part: nested dicts of the state's field names down to the wanted subtrees of
        `jax.ShapeDtypeStruct`s (with shardings), e.g. `{"params": {"encoder": ...}}`.

    Returns:
      `abstract_part`'s structure, with arrays.

    Raises:
      FileNotFoundError: no checkpoint for `step`.
    """
    self._check_step(step)
    part = ocp.args.PyTreeRestore(
      item=abstract_part, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part),
      partial_restore=True)
    return self._manager.restore(step, args=ocp.args.Composite(**{_STATE: part}))[_STATE]

  def _check_step(self, step: int) -> None:
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
        f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")

  def latest_step(self) -> int | None:
    """The newest saved step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def save_export(path: str | os.PathLike, params: Any, config_json: str,
                files: Mapping[str, bytes] | None = None) -> None:
  """Writes a params-only export: `<path>/params/` (Orbax), `<path>/config.json` and `files`,
  then the completion marker `<path>/COMPLETE`.

  They are written to `atomic.staging_dir(path)`, committed by `atomic.commit_dir`: locally a
  sibling folder renamed over `path`, which holds the previous export until the new one is
  complete; on an object store `path` itself, not an export until its marker is written.
  Blocks until written. Every process calls this (Orbax writes each process's shards).

  Args:
    path: export folder.
    params: the parameter pytree (jax or numpy arrays).
    config_json: the run's config serialised as JSON (e.g. `config.to_json_best_effort()`).
    files: further files of the export, name -> content, written by process 0 (e.g. the
      encoder's `encoder.json` and `encoder.safetensors`).

  Raises:
    ValueError: if `config_json` is not valid JSON.
  """
  json.loads(config_json)
  path = os.fspath(path)
  staging = paths.path(atomic.staging_dir(path))
  primary = jax.process_index() == 0
  if primary:
    atomic.clear_staging(path, _EXPORT_COMPLETE)
  collectives.barrier("univit_export_start")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(staging / "params", params)
    checkpointer.wait_until_finished()
  if primary:
    atomic.write_bytes(str(staging / "config.json"), config_json.encode())
    for name, content in (files or {}).items():
      atomic.write_bytes(str(staging / name), content)
    atomic.commit_dir(path, _EXPORT_COMPLETE)
  collectives.barrier("univit_export_done")


def is_export(path: str | os.PathLike) -> bool:
  """Whether `path` holds a complete export (its completion marker is written last)."""
  return (paths.path(path) / _EXPORT_COMPLETE).exists()


def load_export(path: str | os.PathLike,
                abstract_params: Any = None) -> tuple[Any, dict[str, Any]]:
  """Reads an export written by `save_export`.

  Args:
    path: export folder.
    abstract_params: optional pytree of `jax.ShapeDtypeStruct` (with shardings) to restore onto;
      without it arrays come back as saved, on the default device.

  Returns:
    (params, config dict).

  Raises:
    FileNotFoundError: if `path` holds no complete export.
  """
  config = read_export_config(path)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(paths.path(path) / "params", abstract_params)
  return params, config


def read_export_config(path: str | os.PathLike) -> dict[str, Any]:
  """The config dict of the export at `path`, without reading its parameters (e.g. to build the
  abstract parameters `load_export` restores onto).

  Raises:
    FileNotFoundError: if `path` holds no complete export.
  """
  if not is_export(path):
    raise FileNotFoundError(
      f"{path} is not an export (no {_EXPORT_COMPLETE} marker: missing, or interrupted while "
      "written; exporting again, e.g. rerunning --mode=train, replaces it)")
  return json.loads((paths.path(path) / "config.json").read_text())
