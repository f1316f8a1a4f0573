"""Converts any configured source into ArrayRecord shards (`records`), resumably.

  python -m univit_jax.data.convert \
      --source='{"type": "image_folder", "path": "/data/images"}' \
      --out=gs://bucket/images_ar [--records_per_shard=1024]

`--source` is one `config.data.sources` entry as JSON, of any type. Its records are read through
the same `Source` objects training uses, so a converted dataset holds what the source yields, in
its order: files are copied as they are (not decoded), pixels held in memory (TFDS, demo) are
stored as PNGs. Then train on `{"type": "array_record", "path": "<out>", "kind": "image" |
"video"}` (printed at the end).

Atomic and resumable: `plan.json` (the source, its content digest, the record count and shard
size) is written first; each shard is written under a temporary name and renamed
(`atomic.local_file`), `keys.txt` and `manifest.json` last. A rerun with the same plan keeps
complete shards and writes the rest; one with another plan is refused. The same input gives the
same bytes.
"""

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import grain
from absl import app, flags, logging
from array_record.python import array_record_module

from univit_jax import atomic, config_lib, paths
from univit_jax.data import records, sources

_SOURCE = flags.DEFINE_string(
  "source", None, "One data.sources entry as JSON, e.g. "
  "'{\"type\": \"video_folder\", \"path\": \"/data/clips.csv\"}'.")
_OUT = flags.DEFINE_string("out", None, "The dataset folder to write (local or gs://...).")
_RECORDS_PER_SHARD = flags.DEFINE_integer(
  "records_per_shard", records.RECORDS_PER_SHARD, "Records per shard (the last holds the rest).")


class ConvertError(ValueError):
  """A conversion that cannot go on: `--out` holds another conversion, a kept shard disagrees
  with the plan, or the source's keys are not unique; the message says what to do."""


def _plan(spec: config_lib.SourceSpec, source: sources.Source, records_per_shard: int
          ) -> dict[str, Any]:
  """What a conversion writes, so that a rerun can tell whether kept shards are its own (as
  `plan.json` reads back)."""
  content = source.content_key() if hasattr(source, "content_key") else None
  return json.loads(atomic.json_bytes(dict(
    format=records.FORMAT, version=records.FORMAT_VERSION,
    kind="video" if spec.is_video else "image", source=spec.to_dict(), content=content,
    records=len(source), records_per_shard=records_per_shard)))


def _start(out: str, plan: dict[str, Any]) -> None:
  """Writes `plan.json`, or checks that a previous run's is the same plan; removes temporary
  shards a killed run left.

  Raises:
    ConvertError: `out` holds a conversion with another plan.
  """
  folder = paths.path(out)
  file = folder / records.PLAN
  if file.exists():
    previous = json.loads(file.read_text())
    changed = sorted(k for k in plan.keys() | previous.keys() if previous.get(k) != plan.get(k))
    if changed:
      raise ConvertError(
        f"{out} holds a conversion with another {records.PLAN} (differs in {changed}); "
        "convert into another --out, or delete it first")
  else:
    atomic.write_json(str(file), plan)
  for stale in folder.glob(".data-*.tmp"):
    stale.unlink()


def _write_shard(source: sources.Source, indices: range, keys: Sequence[str],
                 target: str) -> list[str]:
  """Writes records `indices` of `source`, named by their `keys` (`sources.record_keys`), as the
  shard `target`; returns their keys.

  Raises:
    ConvertError: a record that cannot be read, naming its key and index.
  """
  with atomic.local_file(target) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, records.WRITER_OPTIONS)
    try:
      for i in indices:
        try:
          writer.write(records.encode(source[i], keys[i]))
        except OSError as e:
          raise ConvertError(f"record {i} ({keys[i]}) of {source!r}: {type(e).__name__}: "
                             f"{e}") from e
    finally:
      writer.close()
  return [keys[i] for i in indices]


def _shard_keys(target: str, count: int) -> list[str]:
  """The keys of the complete shard `target`, checked to hold `count` records.

  Raises:
    ConvertError: it holds another count.
  """
  shard = grain.sources.ArrayRecordDataSource(target)
  if len(shard) != count:
    raise ConvertError(f"{target} holds {len(shard)} records, the plan {count}: delete it and "
                       "rerun")
  return [records.decode(shard[i])["key"] for i in range(count)]


def _check_keys(keys: Sequence[str]) -> None:
  """Raises ConvertError for keys that are repeated or hold a newline (keys.txt lines)."""
  seen, repeated = set(), []
  for key in keys:
    if key in seen or "\n" in key:
      repeated.append(key)
    seen.add(key)
  if repeated:
    raise ConvertError(f"{len(repeated)} record keys are repeated or hold a newline, e.g. "
                       f"{repeated[:3]}: a key must name one record")


def convert(spec: config_lib.SourceSpec, out: str,
            records_per_shard: int = records.RECORDS_PER_SHARD) -> dict[str, Any]:
  """Converts the source `spec` describes into the dataset folder `out`; returns its manifest.

  Raises:
    ConvertError: see `_start`, `_write_shard`, `_shard_keys`, `_check_keys`.
    sources.SourceError: the source cannot be listed or has no records.
  """
  if records_per_shard < 1:
    raise ValueError(f"records_per_shard={records_per_shard} must be positive")
  source = sources.build_source(spec)
  if not len(source):
    raise sources.SourceError(f"{source!r} has no records")
  plan = _plan(spec, source, records_per_shard)
  _start(out, plan)
  folder = paths.path(out)
  num_shards = math.ceil(len(source) / records_per_shard)
  source_keys = sources.record_keys(source)
  keys, shards = [], []
  for shard in range(num_shards):
    name = records.shard_name(shard, num_shards)
    indices = range(shard * records_per_shard, min(len(source), (shard + 1) * records_per_shard))
    if (folder / name).exists():
      keys.extend(_shard_keys(str(folder / name), len(indices)))
      logging.info("Kept %s (complete)", name)
    else:
      keys.extend(_write_shard(source, indices, source_keys, str(folder / name)))
      logging.info("Wrote %s (%d records)", name, len(indices))
    shards.append(dict(file=name, records=len(indices)))
  _check_keys(keys)
  listed = "".join(f"{key}\n" for key in keys).encode()
  atomic.write_bytes(str(folder / records.KEYS), listed)
  manifest = dict(plan, shards=shards, keys_file=records.KEYS,
                  keys_sha256=hashlib.sha256(listed).hexdigest())
  atomic.write_json(str(folder / records.MANIFEST), manifest)
  return manifest


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    spec = config_lib.SourceSpec.from_dict("source", json.loads(_SOURCE.value))
    paths.check(_OUT.value, "--out")
    manifest = convert(spec, _OUT.value, _RECORDS_PER_SHARD.value)
  except (ConvertError, sources.SourceError, config_lib.ConfigError, paths.StorageError) as e:
    sys.exit(f"convert: {e}")
  entry = dict(type="array_record", path=paths.absolute(_OUT.value), kind=manifest["kind"])
  print(f"{manifest['records']} records in {len(manifest['shards'])} shards; as a data source: "
        f"{json.dumps(entry)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["source", "out"])
  app.run(main)
