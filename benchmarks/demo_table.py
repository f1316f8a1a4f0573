"""The demo table: what each encoder learns, on the same held-out tasks and probes, over seeds.

  python benchmarks/demo_table.py                      # every variant, 3 seeds
  python benchmarks/demo_table.py --seeds=0 --variants=univit --probes=linear,order
  python benchmarks/demo_table.py --variants=items_only --set=total_steps=150 --workdir=DIR

Rows: raw pixels (time-averaged, and frames in order), the pixels bootstrap teacher (the features
round 1's clusters are made of: `features.pixels_teacher`), random init, the supervised upper bound
(`supervised_demo.py`: the same architecture trained on the demo's labels), the demo pipeline's
round 1 and round 2 exports, and one-round ablations of the demo config: image-only (object bank only),
video-only (event banks only), single granularity (event_1 only), each other U-RoPE allocation
mode, and no structured contrastive term; on request (`--variants`), the learning issue's
image-only rounds (`items_only`, `items_only_augment`, `items_and_objects`: 600 steps, object bank
only, no contrastive term). Each variant runs `configs/demo.py` with
`seed` = `data.shuffle_seed` = `cluster.seed` = the seed, in `--workdir/<variant>/seed_<s>` (a
finished pipeline is reused; the XLA compilation cache is shared by all runs). Every encoder is
then probed by `univit_jax.evaluation` on one shared set of held-out demo records (the records do
not change with the seed: the seeds measure training variance). Cells are the mean over seeds ±
the standard deviation. The baseline and univit rows get every probe (`--probes`); the
one-round ablations the cheap ones (`--ablation_probes`), to stay within an hour on 2 cores;
compare an ablation with "univit round 1".

Writes benchmarks/results/demo_table.json (and the report, results.md and report.html, in
`--workdir/report/`); paste the printed table into README.md and docs/evaluation.md.
"""

import ast
import contextlib
import io
import json
import os
import sys
import time

from absl import app, flags, logging
import jax
import ml_collections
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
import machine  # noqa: E402  # pylint: disable=import-error
from univit_jax import atomic, encoder, rounds, run_config  # noqa: E402
from univit_jax.evaluation import common, report, run  # noqa: E402
from univit_jax.evaluation import features as features_lib  # noqa: E402
from univit_jax.run_config import stage_config  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))
import helpers  # noqa: E402  # pylint: disable=import-error
import supervised_demo  # noqa: E402  # pylint: disable=import-error

EVENT_BANKS = ("event_1", "event_2", "event_4", "event_8")


def _weights(**overrides) -> dict:
  weights = dict(object=1.0, **{bank: 1.0 for bank in EVENT_BANKS})
  weights.update(overrides)
  return weights


_DIGITS = dict(type="demo", kind="items", split="train", num_examples=1024, frames=(1,))
_OBJECTS = dict(type="demo", kind="objects", split="train", num_examples=1024, frames=(1,))
_IMAGE_ROUND = (
  ("data.frames", (1,)), ("data.bucket_weights", (1,)),
  ("loss.bank_weights", dict(object=1.0, event_1=0.0)), ("loss.event_schedule", ((0.0, (1,)),)),
  ("loss.contrastive.weight", 0.0), ("total_steps", 600), ("data.augment", False))
ITEMS_ONLY = (("data.sources", ml_collections.ConfigDict(dict(digits=_DIGITS))),) + _IMAGE_ROUND

# variant -> (rounds, config overrides as (dotted field, value)).
VARIANTS = {
  "univit": (2, ()),
  "image_only": (1, (("loss.bank_weights", _weights(**{b: 0.0 for b in EVENT_BANKS})),)),
  "video_only": (1, (("loss.bank_weights", _weights(object=0.0)),)),
  "event_1_only": (1, (("loss.bank_weights", _weights(event_2=0.0, event_4=0.0, event_8=0.0)),
                       ("loss.event_schedule", ((0.0, (1,)),)))),
  "rope_per_axis": (1, (("model.rope.mode", "per_axis"),)),
  "rope_chunked": (1, (("model.rope.mode", "chunked"),)),
  "rope_interleaved": (1, (("model.rope.mode", "interleaved"),)),
  "no_contrastive": (1, (("loss.contrastive.weight", 0.0),)),
  # The learning issue's localisation (docs/training.md): round 1 on images only, object bank
  # only, no contrastive term, 600 steps, no random crops: the single items alone (also with the
  # crops), and the items with the multi-object images.
  "items_only": (1, ITEMS_ONLY),
  "items_only_augment": (1, ITEMS_ONLY + (("data.augment", True),)),
  "items_and_objects": (1, (("data.sources", ml_collections.ConfigDict(
    dict(digits=_DIGITS, objects=_OBJECTS))),) + _IMAGE_ROUND),
}

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "training seeds")
ON_REQUEST = ("items_only", "items_only_augment", "items_and_objects")
_VARIANTS = flags.DEFINE_list("variants", [v for v in VARIANTS if v not in ON_REQUEST],
                              f"pipeline variants to run (of {list(VARIANTS)})")
_PROBES = flags.DEFINE_list("probes", ["linear", "knn", "attentive", "dense", "qa", "order"],
                            "probes of the baseline and univit rows (evaluation.run.EVALUATORS)")
_ABLATION_PROBES = flags.DEFINE_list("ablation_probes", ["linear", "knn", "dense", "order"],
                                     "probes of the one-round ablation rows (the cheap ones)")
_QA_EPOCHS = flags.DEFINE_integer("qa_epochs", 8, "epochs of the QA probe")
_ABLATION_SEEDS = flags.DEFINE_list("ablation_seeds", None,
                                    "seeds of the ablation variants (default: --seeds)")
_SUPERVISED_SEEDS = flags.DEFINE_list("supervised_seeds", None,
                                      "seeds of the supervised row (default: --seeds; '' = none)")
_SUPERVISED_STEPS = flags.DEFINE_integer("supervised_steps", 1000,
                                         "steps of the supervised upper bound")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 1500, "probe-train records per task")
_NUM_TEST = flags.DEFINE_integer("num_test", 500, "test records per task")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/univit_demo_table", "pipelines and report")
_SET = flags.DEFINE_multi_string(
  "set", [], "FIELD=VALUE (a Python literal) applied to every variant after its own overrides, "
  "e.g. --set=total_steps=150; a finished pipeline in --workdir is reused, so give each set "
  "of overrides its own --workdir")
_FROM_JSON = flags.DEFINE_string("from_json", None,
                                 "only print the tables of an earlier run's JSON")
_OUT = flags.DEFINE_string("out", os.path.join(ROOT, "benchmarks", "results", "demo_table.json"),
                           "JSON results path")


def _parse_set(item: str) -> tuple[str, object]:
  field, sep, value = item.partition("=")
  try:
    if not sep:
      raise ValueError("no '='")
    return field, ast.literal_eval(value)
  except (ValueError, SyntaxError) as e:
    raise app.UsageError(f"--set={item}: expected FIELD=<Python literal> ({e})") from None


def variant_config(variant: str, seed: int, workdir: str) -> run_config.RunConfig:
  rounds_, overrides = VARIANTS[variant]
  config = helpers.load_config("demo")
  config.rounds = rounds_
  config.seed = config.data.shuffle_seed = config.cluster.seed = seed
  config.train.progress_bar = False
  config.train.compilation_cache_dir = os.path.join(workdir, "jax_cache")
  config.eval.num_train, config.eval.num_test = _NUM_TRAIN.value, _NUM_TEST.value
  config.eval.probes = tuple(_PROBES.value)
  config.eval.qa_epochs = _QA_EPOCHS.value
  for field, value in tuple(overrides) + tuple(_parse_set(item) for item in _SET.value):
    *path, leaf = field.split(".")
    node = config
    for part in path:
      node = node[part]
    node[leaf] = value
  return run_config.build(config, jax.device_count())


def run_pipeline(variant: str, seed: int) -> tuple[run_config.RunConfig, str, float]:
  folder = os.path.join(_WORKDIR.value, variant, f"seed_{seed}")
  config = variant_config(variant, seed, _WORKDIR.value)
  start = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):
    rounds.run_pipeline(config, folder, log=lambda _: None)
  return config, folder, time.perf_counter() - start


def aggregate(per_seed: list[dict[str, common.ProbeResult]]) -> dict[str, dict]:
  """Mean ± std over seeds of each column, with each seed's value."""
  cells = {}
  for column in per_seed[0]:
    values = [r[column].value for r in per_seed if column in r]
    cells[column] = dict(metric=per_seed[0][column].metric, value=float(np.mean(values)),
                         spread=float(np.std(values)), n=len(values), seeds=values)
  return cells


def _subset(results: dict, encoders: list[str], columns: list[str] | None = None) -> dict:
  columns = columns or [c for c in results["tasks"]
                        if any(c in results["values"][e] for e in encoders)]
  return dict(encoders=[e for e in results["encoders"] if e["name"] in encoders],
              tasks={c: results["tasks"][c] for c in columns},
              values={e: results["values"][e] for e in encoders})


def summary_tables(results: dict) -> str:
  """Two Markdown tables: the baseline, supervised and univit encoders on every probe; the
  ablations next to univit round 1 on their probes (order sensitivity aside), with each
  encoder's mean over those probes."""
  names = [e["name"] for e in results["encoders"]]
  ablations = [n for n in names if n.endswith("(1 round)")]
  main_rows = [n for n in names if n not in ablations]
  text = report.markdown_table(_subset(results, main_rows))
  if ablations:
    compared = [n for n in ("univit round 1",) if n in names] + ablations
    columns = [c for c in results["tasks"]
               if all(c in results["values"][n] for n in compared)
               and results["tasks"][c]["metric"] != "one_minus_cos"]
    table = _subset(results, compared, columns)
    table["tasks"]["mean of the rows above"] = dict(metric="mean", chance=None, majority=None)
    for n in compared:
      cells = [results["values"][n][c]["value"] for c in columns]
      table["values"][n] = dict(table["values"][n], **{"mean of the rows above": dict(
        value=float(np.mean(cells)))})
    text += "\n" + report.markdown_table(table)
  return text


def _seed_list(flag: list[str] | None, default: list[int]) -> list[int]:
  return default if flag is None else [int(s) for s in flag if s]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _FROM_JSON.value:
    with open(_FROM_JSON.value) as f:
      print(summary_tables(json.load(f)))
    return
  seeds = [int(s) for s in _SEEDS.value]
  unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"--variants: unknown {unknown}; expected some of {list(VARIANTS)}")
  base = variant_config("univit", seeds[0], _WORKDIR.value)
  ctx = run.make_context(base.eval, base.data.image_size)
  rows: dict[str, list] = {}
  kinds: dict[str, str] = {}
  timings = {}
  start = time.perf_counter()

  def probe(row: str, extractor: features_lib.FeatureExtractor,
            probes: tuple[str, ...] = ctx.cfg.probes) -> None:
    t0 = time.perf_counter()
    rows.setdefault(row, []).append(run.evaluate(ctx, extractor, probes, log=lambda _: None))
    kinds[row] = extractor.kind
    ctx.data.forget(extractor.name)
    print(f"  {row}: probed in {time.perf_counter() - t0:.0f} s", flush=True)

  for mode in stage_config.PIXEL_BASELINES:
    probe(features_lib.pixels(mode, base.model.patch_size).name,
          features_lib.pixels(mode, base.model.patch_size))
  probe("pixels bootstrap teacher", features_lib.pixels_teacher(base.extract, base.data, base.seed))
  spec = encoder.EncoderSpec.from_sections(base.model, base.data, base.mesh)
  for seed in seeds:
    probe("random init", features_lib.random_init(spec, seed))
  for seed in _seed_list(_SUPERVISED_SEEDS.value, seeds):
    t0 = time.perf_counter()
    extractor = supervised_demo.train_supervised(base, seed, _SUPERVISED_STEPS.value,
                                                 log=lambda _: None)
    timings[f"supervised/seed_{seed}"] = time.perf_counter() - t0
    probe("supervised (upper bound)", extractor)
  for variant in _VARIANTS.value:
    for seed in (seeds if variant == "univit" else _seed_list(_ABLATION_SEEDS.value, seeds)):
      config, folder, seconds = run_pipeline(variant, seed)
      timings[f"{variant}/seed_{seed}"] = seconds
      print(f"{variant} seed {seed}: pipeline {seconds:.0f} s", flush=True)
      for r in range(1, config.rounds + 1):
        main_row = variant == "univit"
        row = f"{variant} round {r}" if main_row else f"{variant} (1 round)"
        export = encoder.export_dir(rounds.round_dir(folder, r))
        probe(row, features_lib.export(export, f"{variant}/seed_{seed}/round_{r}"),
              ctx.cfg.probes if main_row else tuple(_ABLATION_PROBES.value))

  values = {row: aggregate(per_seed) for row, per_seed in rows.items()}
  results = dict(
    encoders=[dict(name=row, kind=kinds[row], path=None) for row in rows],
    tasks=run.task_columns(ctx, {row: r[0] for row, r in rows.items()}),
    values=values,
    meta=dict(benchmark="demo_table", seeds=seeds, variants=_VARIANTS.value,
              ablation_seeds=_seed_list(_ABLATION_SEEDS.value, seeds),
              supervised_seeds=_seed_list(_SUPERVISED_SEEDS.value, seeds),
              supervised_steps=_SUPERVISED_STEPS.value,
              probes=_PROBES.value, ablation_probes=_ABLATION_PROBES.value, num_train=_NUM_TRAIN.value, num_test=_NUM_TEST.value,
              overrides=_SET.value,
              command="python benchmarks/demo_table.py " + " ".join(sys.argv[1:]),
              total_seconds=time.perf_counter() - start, pipeline_seconds=timings,
              machine=machine.describe()))
  report.write_report(os.path.join(_WORKDIR.value, "report"), results)
  atomic.write_bytes(_OUT.value, json.dumps(results, indent=1).encode())  # keeps row order
  print(summary_tables(results))
  print(f"total {time.perf_counter() - start:.0f} s; written {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
