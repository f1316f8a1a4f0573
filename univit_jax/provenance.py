"""What a stage's output was made from, and how a rerun's inputs differ from that.

Every output one stage hands to another records its inputs as a JSON dict (docs/architecture.md,
"Stages and the files between them"): the feature store in `features/<bank>/meta.json`
(`inputs`: the data sources, the extract settings), the clusters in `stats.json` (the same, and
their version hashes it), training in `train_run.json` (label versions, data, model, optimiser,
schedule). A rerun computes its inputs the same way and refuses outputs recorded with other
ones, naming each difference (`differences`), so nothing made from other data or settings is
silently reused.
"""

import json
from collections.abc import Mapping
from typing import Any


def jsonable(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists, keys strings), so that a record
  computed now compares equal to the same record read from a file."""
  return json.loads(json.dumps(value, sort_keys=True))


def differences(recorded: Any, current: Any, path: str = "") -> list[str]:
  """Each difference between a recorded input and the current one, as "<path> was X, now Y".

  Dicts are compared key by key, so a difference is named at its deepest path, e.g.
  "data.sources.digits.records was 48, now 64".

  Args:
    recorded: the record read from a stage's output (None: that output records none).
    current: the record computed from the current config (`jsonable`).
    path: the name of the record, prefixed to the keys below it.
  """
  if recorded is None and current is not None:
    what = f"{path} was not recorded" if path else "nothing was recorded"
    return [f"{what} (an output of an older version)"]
  return _differences(recorded, current, path)


def _differences(recorded: Any, current: Any, path: str) -> list[str]:
  if isinstance(recorded, Mapping) and isinstance(current, Mapping):
    out = []
    for key in sorted(set(recorded) | set(current)):
      sub = f"{path}.{key}" if path else str(key)
      if key not in recorded:
        out.append(f"{sub} was absent, now {current[key]!r}")
      elif key not in current:
        out.append(f"{sub} was {recorded[key]!r}, now absent")
      else:
        out.extend(_differences(recorded[key], current[key], sub))
    return out
  if recorded == current:
    return []
  return [f"{path or 'the record'} was {recorded!r}, now {current!r}"]
