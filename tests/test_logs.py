"""metrics.jsonl after a kill: a torn last line is dropped, records past the resume step trimmed."""

import json
import os

import pytest

from univit_jax.train import logs


def _write(workdir, steps, tail=""):
  with open(os.path.join(workdir, logs.METRICS_FILE), "w") as f:
    f.writelines(json.dumps(dict(step=s, loss=1.0 / s)) + "\n" for s in steps)
    f.write(tail)


def _lines(workdir):
  with open(os.path.join(workdir, logs.METRICS_FILE)) as f:
    return f.read().splitlines(keepends=True)


def test_resume_after_sigkill_drops_the_torn_line_and_records_past_the_checkpoint(
    tmp_path, caplog):
  # The killed run logged steps 1..5 and was killed mid-append at step 6; its newest checkpoint
  # is step 3, so the resumed run restarts from there and logs 4, 5, 6 again.
  _write(tmp_path, range(1, 6), tail='{"step": 6, "lo')
  with caplog.at_level("WARNING"):
    assert [r["step"] for r in logs.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
  assert f"{logs.METRICS_FILE}:6: ignoring a torn last record" in caplog.text
  logger = logs.MetricsLogger(str(tmp_path), resume_step=3)
  assert all(line.endswith("\n") for line in _lines(tmp_path))  # repaired before any append
  for step in (4, 5, 6):
    logger.write(step, dict(loss=0.5))
  logger.close()
  records = logs.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["loss"] for r in records[3:]] == [0.5] * 3  # the resumed run's, not the killed one's


def test_complete_last_record_without_newline_is_kept_and_terminated(tmp_path):
  _write(tmp_path, [1], tail=json.dumps(dict(step=2, loss=0.5)))
  logs.MetricsLogger(str(tmp_path), resume_step=2).close()
  assert [json.loads(line)["step"] for line in _lines(tmp_path)] == [1, 2]
  assert _lines(tmp_path)[-1].endswith("\n")


def test_corrupt_line_inside_the_history_names_file_and_line(tmp_path):
  _write(tmp_path, [1], tail="garbage\n" + json.dumps(dict(step=2)) + "\n")
  path = os.path.join(tmp_path, logs.METRICS_FILE)
  with pytest.raises(logs.MetricsFileError, match=f"{path}:2: not a JSON record"):
    logs.MetricsLogger(str(tmp_path), resume_step=2)
  assert len(_lines(tmp_path)) == 3  # left as it was, for a person to look at
