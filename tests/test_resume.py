"""Resuming with another config: every row of docs/training.md, "Resuming with another config".

A checkpoint's `train_run.json` holds the fingerprint of the run that wrote it
(`state_lib.fingerprint`); `loop.check_compatible` compares it with the fingerprint of the
config resuming it. Each row below changes one field of the tiny training config and checks the
outcome: the resume goes on, is refused with a `CheckpointMismatchError` naming the field, or
(the schedule) needs `train.allow_schedule_change`. Real resumes of real checkpoints are in
tests/test_train.py.
"""

import json
import os

import helpers
import jax
import pytest
import train_fixtures

from univit_jax import atomic, optim
from univit_jax.data import pipeline
from univit_jax.train import loop
from univit_jax.train import state as state_lib

SIZES = train_fixtures.BANK_SIZES
VERSIONS = {bank: "v1" for bank in SIZES}


def _fingerprint(config, sizes=SIZES, versions=VERSIONS, batch_multiple=1) -> dict:
  """The fingerprint `loop.run_train` records and compares for `config` (with batch sizes
  rounded to `batch_multiple`, the data-parallel size; typed for one device, which divides
  every batch)."""
  run = helpers.typed(config, num_devices=1)
  tx = optim.make_optimizer(run.optim, run.train.total_steps)
  _, params = state_lib.abstract_model(run.model, sizes)
  data = pipeline.batches_fingerprint(run.data, pipeline.open_sources(run.data),
                                      run.data.batch_sizes(batch_multiple))
  return state_lib.fingerprint(run, sizes, versions, jax.eval_shape(tx.init, params), data)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> str:
  """A workdir whose run file is that of the unchanged tiny config."""
  workdir = str(tmp_path_factory.mktemp("run"))
  atomic.write_json(os.path.join(workdir, loop.RUN_FILE),
                    _fingerprint(train_fixtures.tiny_config()))
  return workdir


def _changed(**fields):
  """The tiny config with `fields` ("a.b" -> value, dots as "__") set."""
  config = train_fixtures.tiny_config()
  for path, value in fields.items():
    *parents, leaf = path.split("__")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


RESUMES = [
  dict(train__log_every=5), dict(train__checkpoint_every=3), dict(train__keep_checkpoints=1),
  dict(train__progress_bar=True), dict(train__collapse_threshold=0.5),
  dict(train__compilation_cache_dir="none"),
  dict(eval__every=2), dict(eval__train_probes=("linear",)),
  dict(data__read_threads=3), dict(data__worker_buffer_size=4), dict(data__augment=True),
  dict(data__max_bad_fraction=0.5), dict(model__dtype="bfloat16"), dict(model__remat="full"),
  dict(optim__weight_decay=0.0), dict(optim__b2=0.99), dict(optim__grad_clip_norm=0.5),
  dict(loss__contrastive=dict(weight=0.5, temperature=0.2)), dict(mesh__shape=(1, -1, 1)),
  dict(train__bank_init="random"), dict(train__init_encoder="/elsewhere/export"), dict(seed=5),
]


def _id(value):
  """A test id: the first field a row changes."""
  return next(iter(value)).replace("__", ".") if isinstance(value, dict) else None


@pytest.mark.parametrize("fields", RESUMES, ids=_id)
def test_observation_and_hyperparameter_changes_resume(checkpointed, fields):
  assert loop.check_compatible(checkpointed, _fingerprint(_changed(**fields))) == []


REFUSED = [
  (dict(model__depth=3), "model shape.*model.depth was 2, now 3"),
  (dict(model__time_embedding="none"), "model.time_embedding was 'sincos', now 'none'"),
  (dict(model__rope=dict(mode="temporal_low", base=10_000.0, split=(4, 6, 6),
                         virtual_frames=64, temporal_span=1.0)),
   "model.rope.temporal_span was 3.14.*, now 1.0"),
  (dict(data__sources__events__num_examples=17),
   r"data \(.*data.sources.events.records was 16, now 17"),
  (dict(data__sources__events__seed=3), "data.sources.events.spec.seed was absent, now 3"),
  (dict(data__frames=(1, 2, 4), data__bucket_weights=(1, 1, 1)),
   r"data.frames was \[1, 2\], now \[1, 2, 4\]"),
  (dict(data__bucket_weights=(2, 1)), r"data.bucket_weights was \[1.0, 1.0\], now \[2.0, 1.0\]"),
  (dict(data__tokens_per_batch=512), "data.tokens_per_batch was 256, now 512"),
  (dict(data__image_size=64), "data.image_size was 32, now 64"),
  (dict(data__shuffle_seed=1), "data.shuffle_seed was 0, now 1"),
  (dict(data__worker_count=2), "data.worker_count was 0, now 2"),
  (dict(optim__grad_clip_norm=0.0), "optimiser state parts.*optimizer was"),
  (dict(optim__bank_lr_scale=2.0), "optimiser state parts.*optimizer was"),
]


@pytest.mark.parametrize("fields,message", REFUSED, ids=_id)
def test_changes_of_what_the_checkpoint_is_are_refused_naming_the_field(checkpointed, fields,
                                                                        message):
  fingerprint = _fingerprint(_changed(**fields))
  for allow in (False, True):  # the schedule flag does not lift these
    with pytest.raises(loop.CheckpointMismatchError, match=message):
      loop.check_compatible(checkpointed, fingerprint, allow)


def test_other_banks_labels_batch_sizes_or_hosts_are_refused(checkpointed, monkeypatch):
  config = train_fixtures.tiny_config()
  with pytest.raises(loop.CheckpointMismatchError, match="class-bank sizes.*object was 10, now 12"):
    loop.check_compatible(checkpointed, _fingerprint(config, sizes=dict(SIZES, object=12)))
  with pytest.raises(loop.CheckpointMismatchError,
                     match="cluster-label versions.*event_2 was 'v1', now 'v2'"):
    loop.check_compatible(checkpointed, _fingerprint(config, versions=dict(VERSIONS, event_2="v2")))
  # A data-parallel size that rounds the batches differently (a mesh change) changes them.
  with pytest.raises(loop.CheckpointMismatchError, match="data.batch_sizes.1 was 16, now 15"):
    loop.check_compatible(checkpointed, _fingerprint(config, batch_multiple=3))
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(loop.CheckpointMismatchError, match="data.processes was 1, now 2"):
    loop.check_compatible(checkpointed, _fingerprint(config))


SCHEDULE = [
  (dict(total_steps=12), "total_steps was 6, now 12"),
  (dict(optim__lr=1e-3), "optim.lr was 0.002, now 0.001"),
  (dict(optim__schedule="cosine"), "optim.schedule was 'constant', now 'cosine'"),
  (dict(optim__warmup_steps=2), "optim.warmup_steps was 0, now 2"),
  (dict(optim__end_lr_fraction=0.1), "optim.end_lr_fraction was 0.0, now 0.1"),
  (dict(loss__event_schedule=((0.0, (1,)), (0.5, (1, 2)))), "loss.event_schedule was"),
]


@pytest.mark.parametrize("fields,message", SCHEDULE, ids=_id)
def test_schedule_changes_need_allow_schedule_change(checkpointed, fields, message):
  fingerprint = _fingerprint(_changed(**fields))
  with pytest.raises(loop.CheckpointMismatchError,
                     match=f"another schedule: {message}.*allow_schedule_change=True"):
    loop.check_compatible(checkpointed, fingerprint)
  accepted = loop.check_compatible(checkpointed, fingerprint, allow_schedule_change=True)
  assert len(accepted) == 1 and accepted[0].startswith(message.split(" was")[0])


def test_a_run_file_of_an_older_version_is_refused(tmp_path):
  config = train_fixtures.tiny_config()
  old = {k: v for k, v in _fingerprint(config).items() if k in ("model", "bank_sizes",
                                                                 "label_versions")}
  with open(tmp_path / loop.RUN_FILE, "w") as f:
    json.dump(old, f)
  with pytest.raises(loop.CheckpointMismatchError, match="data was not recorded"):
    loop.check_compatible(str(tmp_path), _fingerprint(config))
