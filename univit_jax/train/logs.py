"""Training records: `metrics.jsonl`, TensorBoard events (tensorboardX) and `training.png`.

Only process 0 writes. `metrics.jsonl` has one JSON object per line, appended per logged step
(an append is not atomic: a SIGKILL mid-write leaves a torn last line; on an object store each
append rewrites the file by one put: `atomic.append_text`). On resume the file is rewritten
atomically with only the records up to the restored step, dropping the records of the
interrupted run past it and any torn last line, so the file describes exactly one history.
TensorBoard event files in a remote workdir go through `paths` too (`_RemoteEventFile`), one put
per flush.
"""

import io
import json
import os
from collections.abc import Mapping

import jax
from absl import logging

from univit_jax import atomic, paths

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"


class MetricsFileError(ValueError):
  """A line of `metrics.jsonl` other than a torn last one is not a JSON record."""


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` (an empty list when there is none).

  A last line without its newline that is not JSON is a record torn by a kill mid-append: it is
  left out with a warning (`MetricsLogger` removes it from the file on resume).

  Raises:
    MetricsFileError: naming `file:line` of any other line that is not JSON, since a corrupt
      record inside the history is not something a kill leaves behind.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not paths.path(path).exists():
    return []
  with paths.path(path).open() as f:
    lines = f.readlines()
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if not line.endswith("\n"):  # only the last line can lack its newline
        logging.warning("%s:%d: ignoring a torn last record (the run was killed mid-write): %r",
                        path, number, line[:80])
        break
      raise MetricsFileError(
        f"{path}:{number}: not a JSON record ({e}); repair or delete that line to resume") from e
  return records


class MetricsLogger:
  """Appends metrics records to `metrics.jsonl` and TensorBoard scalars to `workdir/tensorboard`.

  Args:
    workdir: the run's directory.
    resume_step: the step training resumes from; later records and a torn last line are removed
      (the file is rewritten atomically).

  Raises:
    MetricsFileError: `metrics.jsonl` has a corrupt line before its last (see `read_metrics`).
  """

  def __init__(self, workdir: str, resume_step: int):
    self._enabled = jax.process_index() == 0
    self._path = os.path.join(workdir, METRICS_FILE)
    self._writer = None
    if not self._enabled:
      return
    kept = [r for r in read_metrics(workdir) if r["step"] <= resume_step]
    with atomic.open_atomic(self._path) as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    if not paths.is_local(workdir):
      _register_remote_event_files(paths.scheme(workdir))
    self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    record = dict(step=int(step), **{k: float(v) for k, v in metrics.items()})
    atomic.append_text(self._path, json.dumps(record) + "\n")
    for name, value in metrics.items():
      self._writer.add_scalar(name, float(value), int(step))
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


class _RemoteEventFile:
  """A TensorBoard event file on an object store: the records gathered in memory, the whole file
  put on every flush (as tensorboardX's own `gs://` writer does, without google-cloud-storage).
  No `fileno`: tensorboardX fsyncs files that have one."""

  def __init__(self, path: str):
    self._path = path
    self._buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    paths.path(self._path).write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _RemoteEventFiles:
  """tensorboardX's writer factory (`record_writer.register_writer_factory`) for a scheme."""

  def open(self, path: str) -> _RemoteEventFile:
    return _RemoteEventFile(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores need no folders


def _register_remote_event_files(scheme: str) -> None:
  """Routes tensorboardX's event files of `scheme://` paths through `paths` (unregistered, it
  writes them under a local folder named `scheme:`)."""
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  record_writer.register_writer_factory(scheme, _RemoteEventFiles())


def plot_losses(workdir: str) -> str | None:
  """Draws every `*/loss` term and the total loss against the step into `workdir/training.png`.

  Returns the path, or None when there is nothing to draw (or on processes other than 0).
  """
  records = read_metrics(workdir)
  if jax.process_index() or not records:
    return None
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  names = sorted({k for r in records for k in r if k == "loss" or k.endswith("/loss")})
  figure = Figure(figsize=(8, 5))
  FigureCanvasAgg(figure)
  ax = figure.add_subplot()
  for name in names:
    points = [(r["step"], r[name]) for r in records if name in r]
    ax.plot(*zip(*points), label=name, linewidth=2.0 if name == "loss" else 1.0)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (log scale)")
  ax.set_yscale("log")
  ax.set_title("UniViT training losses")
  ax.legend(fontsize="small")
  ax.grid(alpha=0.3)
  path = os.path.join(workdir, PLOT_FILE)
  with atomic.open_atomic(path, "wb") as f:
    figure.savefig(f, format="png", dpi=100)
  return path
