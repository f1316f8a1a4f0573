"""`--mode=eval`: probe frozen encoders on held-out tasks; results.json, a table and report.html.

  python -m univit_jax.main --config=configs/demo.py --workdir=DIR --mode=eval
  python -m univit_jax.main --config=configs/demo.py --workdir=DIR --mode=eval \
      --config.eval.encoder=/path/to/export

The encoder under test is `config.eval.encoder`: an export folder, "checkpoint" (the newest
checkpoint of the run in DIR, or of its newest pipeline round), "random" (a fresh encoder of
the config's architecture), or "" (DIR's export: `DIR/export`, else the last pipeline round's).
`config.eval.baselines` adds rows to compare against ("random", "pixels_mean", "pixels_ordered",
and "teacher": the round-1 bootstrap teacher's features). Probes are named in
`config.eval.probes` and resolved through the one mapping `EVALUATORS`; each takes the shared
`tasks.EvalData` and an extractor and returns `{column: common.ProbeResult}`, with columns named
"<task>/<probe>". Outputs go to `DIR/eval/` (`results.json`, `results.md`, `report.html`).
"""

import dataclasses
import datetime
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from univit_jax import collectives, encoder, run_config
from univit_jax.evaluation import attentive, common, dense, knn, linear, qa, report, tasks
from univit_jax.evaluation import features as features_lib
from univit_jax.run_config import stage_config

EVAL_DIR = "eval"


@dataclasses.dataclass(frozen=True)
class Context:
  """What every evaluator reads: the records and cached features, the tasks, the settings."""
  data: tasks.EvalData
  tasks: tuple[tasks.Task, ...]
  cfg: stage_config.EvalConfig


Evaluator = Callable[[Context, features_lib.FeatureExtractor], dict[str, common.ProbeResult]]


def _loader(ctx: Context, extractor, task: tasks.Task, field: str) -> common.TestLoader:
  return lambda: ctx.data.split(extractor, task, "test", field)


def _classification(ctx: Context) -> list[tasks.Task]:
  return [t for t in ctx.tasks if t.type in ("multiclass", "multilabel")]


def linear_evaluator(ctx: Context, extractor) -> dict[str, common.ProbeResult]:
  """Logistic regression on the pooled embedding of every classification task."""
  return {f"{t.name}/linear": linear.linear_probe(
    ctx.data.split(extractor, t, "train"), _loader(ctx, extractor, t, "embedding"),
    multilabel=t.type == "multilabel", num_classes=t.num_classes,
    val_fraction=ctx.cfg.val_fraction, seed=ctx.cfg.seed) for t in _classification(ctx)}


def knn_evaluator(ctx: Context, extractor) -> dict[str, common.ProbeResult]:
  """Weighted k-NN on the pooled embedding of every multiclass task."""
  return {f"{t.name}/knn": knn.knn_probe(
    ctx.data.split(extractor, t, "train"), _loader(ctx, extractor, t, "embedding"),
    num_classes=t.num_classes, val_fraction=ctx.cfg.val_fraction, seed=ctx.cfg.seed)
    for t in ctx.tasks if t.type == "multiclass"}


def attentive_evaluator(ctx: Context, extractor) -> dict[str, common.ProbeResult]:
  """A MAP-head probe on the frozen tokens of every classification task."""
  return {f"{t.name}/attentive": attentive.attentive_probe(
    ctx.data.split(extractor, t, "train", "tokens"), _loader(ctx, extractor, t, "tokens"),
    multilabel=t.type == "multilabel", num_classes=t.num_classes,
    epochs=ctx.cfg.attentive_epochs, val_fraction=ctx.cfg.val_fraction, seed=ctx.cfg.seed)
    for t in _classification(ctx)}


def dense_evaluator(ctx: Context, extractor) -> dict[str, common.ProbeResult]:
  """A per-patch linear classifier on the tokens of every dense task (segmentation mIoU)."""
  results = {}
  for t in ctx.tasks:
    if t.type != "dense":
      continue
    grid = ctx.data.features(extractor, t.records, "train").grid
    results[f"{t.name}/dense"] = dense.dense_probe(
      ctx.data.split(extractor, t, "train", "tokens"), _loader(ctx, extractor, t, "tokens"),
      grid=grid, num_classes=t.num_classes, val_fraction=ctx.cfg.val_fraction,
      seed=ctx.cfg.seed)
  return results


def qa_evaluator(ctx: Context, extractor) -> dict[str, common.ProbeResult]:
  """Templated questions about images ("objects") and clips ("events"), answered by a small
  decoder over the frozen tokens."""
  results = {}
  for kind in qa.KIND_QUESTION_TYPES:
    if kind not in ctx.data.record_sets:
      continue

    def split(name: str, kind=kind) -> common.Split:
      return qa.build_qa_split(
        ctx.data.features(extractor, kind, name).tokens, None, ctx.data.records(kind, name),
        kind, seed=ctx.cfg.seed + (name == "test"), per_record=ctx.cfg.qa_per_record)

    results[f"qa_{kind}/qa"] = qa.qa_probe(
      split("train"), lambda split=split: split("test"), epochs=ctx.cfg.qa_epochs,
      val_fraction=ctx.cfg.val_fraction, seed=ctx.cfg.seed)
  return results


def order_sensitivity(embeddings: np.ndarray, reversed_embeddings: np.ndarray
                      ) -> common.ProbeResult:
  """Mean 1 - cos between each clip's embedding and its time-reversed copy's `[N, D]`."""
  a = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
  b = reversed_embeddings / np.maximum(
    np.linalg.norm(reversed_embeddings, axis=1, keepdims=True), 1e-12)
  gaps = 1.0 - np.sum(a * b, axis=1)
  return common.ProbeResult(
    metric="one_minus_cos", value=float(gaps.mean()),
    details=dict(median=float(np.median(gaps)), max=float(gaps.max()), num_clips=len(gaps)))


def order_evaluator(ctx: Context, extractor) -> dict[str, common.ProbeResult]:
  """Order sensitivity on the test clips of every multi-frame record set."""
  results = {}
  for name, record_set in ctx.data.record_sets.items():
    if record_set.num_frames > 1:
      forward = ctx.data.features(extractor, name, "test").embedding
      backward = ctx.data.features(extractor, name, "test", reverse_time=True).embedding
      results[f"{name}/order"] = order_sensitivity(forward, backward)
  return results


# One evaluator per name of `stage_config.PROBES` (the names `eval.probes` is checked against).
EVALUATORS: dict[str, Evaluator] = {
  "linear": linear_evaluator,
  "knn": knn_evaluator,
  "attentive": attentive_evaluator,
  "dense": dense_evaluator,
  "qa": qa_evaluator,
  "order": order_evaluator,
}


def make_context(cfg: stage_config.EvalConfig, image_size: int) -> Context:
  """Record sets and tasks of the `eval` section at the model's frame size.

  Raises:
    config_lib.ConfigError: when there is nothing to probe (`EvalConfig.check_probed`).
  """
  cfg.check_probed()
  return Context(data=tasks.demo_eval_data(cfg, image_size), tasks=tasks.tasks_for(cfg), cfg=cfg)


def evaluate(ctx: Context, extractor: features_lib.FeatureExtractor,
             probes: Sequence[str], log: Callable[[str], None] = print
             ) -> dict[str, common.ProbeResult]:
  """Runs the named probes on one extractor; columns "<task>/<probe>"."""
  results = {}
  for name in probes:
    start = time.perf_counter()
    found = EVALUATORS[name](ctx, extractor)
    log(f"eval {extractor.name}: {name} ({time.perf_counter() - start:.0f} s): " + ", ".join(
      f"{column} {result.value:.3f}" for column, result in found.items()))
    results.update(found)
  return results


def task_columns(ctx: Context, results: Mapping[str, Mapping[str, common.ProbeResult]]
                 ) -> dict[str, dict[str, Any]]:
  """Column metadata for the report: metric, chance level (1 / classes), majority-class rate on
  the test split (multiclass probes report it) and description of every column."""
  described = {t.name: t for t in ctx.tasks}
  columns = {}
  for per_encoder in results.values():
    for column, result in per_encoder.items():
      if column in columns:
        continue
      task = described.get(column.split("/")[0])
      chance = None
      if task is not None and task.type == "multiclass":
        chance = 1.0 / task.num_classes
      elif task is not None and task.type == "multilabel":
        chance = 0.5
      columns[column] = dict(
        metric=result.metric, chance=chance, majority=result.details.get("majority"),
        description=task.description if task else _extra_description(column))
  return columns


def _extra_description(column: str) -> str:
  name, probe = column.split("/")
  if probe == "order":
    return f"{name}: mean 1 - cos(clip, time-reversed clip); 0 = blind to order"
  if probe == "qa":
    return f"{name}: exact-match accuracy of templated questions"
  return column


def feature_visuals(ctx: Context, extractor, count: int = 2) -> list[dict]:
  """Frames and PCA-of-patch-features maps of a few test images and clips."""
  visuals = []
  for name in ctx.data.record_sets:
    feats = ctx.data.features(extractor, name, "test")
    frames = ctx.data.frames(name, "test")
    basis = report.pca_basis(feats.tokens[:count].reshape(-1, feats.tokens.shape[-1]))
    for i in range(min(count, len(frames))):
      visuals.append(dict(title=f"{name} test #{i}", frames=frames[i],
                          pca=report.pca_rgb(feats.tokens[i], feats.grid, basis)))
  return visuals


def resolve_extractor(run: run_config.RunConfig, workdir: str | None, spec: str
                      ) -> features_lib.FeatureExtractor:
  """The extractor `eval.encoder` (or a baseline name) names; see the module docstring.

  Raises:
    FileNotFoundError: naming the folder when no export or checkpoint is there.
  """
  if spec == "random":
    return features_lib.random_init(
      encoder.EncoderSpec.from_sections(run.model, run.data, run.mesh), run.seed)
  if spec in stage_config.PIXEL_BASELINES:
    return features_lib.pixels(spec, run.model.patch_size)
  if spec == "teacher":
    return features_lib.pixels_teacher(run.extract, run.data, run.seed)
  if spec == "checkpoint":
    if not workdir:
      raise FileNotFoundError("eval.encoder='checkpoint' needs --workdir (the training run)")
    return features_lib.checkpoint(run, workdir)
  if spec:
    return features_lib.export(spec, f"export {spec}")
  if not workdir:
    raise FileNotFoundError("eval.encoder is empty: pass --workdir holding an export, or set "
                            "eval.encoder to an export path, 'checkpoint' or 'random'")
  try:
    found = encoder.find_export(workdir, run.rounds)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}; train first or set eval.encoder") from e
  return features_lib.export(found, f"export {os.path.relpath(found, workdir)}")


def results_dict(ctx: Context, extractors: Sequence[features_lib.FeatureExtractor],
                 results: Mapping[str, Mapping[str, common.ProbeResult]],
                 meta: Mapping[str, Any]) -> dict[str, Any]:
  """The report's results dict (`report.write_report`)."""
  return dict(
    encoders=[dict(name=e.name, kind=e.kind, path=e.path) for e in extractors],
    tasks=task_columns(ctx, results),
    values={name: {k: v.to_json() for k, v in per.items()} for name, per in results.items()},
    meta=dict(meta))


def run_eval(run: run_config.RunConfig, workdir: str | None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Evaluates `eval.encoder` and the baselines; writes `workdir/eval/`.

  Every process evaluates (feature extraction takes part in collectives); process 0 alone writes
  the report, and the others wait for it at the `eval done` barrier.

  Returns:
    The results dict (as written to results.json).
  """
  ctx = make_context(run.eval, run.data.image_size)
  specs = [ctx.cfg.encoder] + [b for b in ctx.cfg.baselines if b != ctx.cfg.encoder]
  extractors, results, visuals = [], {}, {}
  for spec in specs:
    extractor = resolve_extractor(run, workdir, spec)
    extractors.append(extractor)
    results[extractor.name] = evaluate(ctx, extractor, ctx.cfg.probes, log)
    if extractor.kind != "pixels":
      visuals[extractor.name] = feature_visuals(ctx, extractor)
    ctx.data.forget(extractor.name)
  meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              workdir=workdir, encoder=ctx.cfg.encoder or "(the workdir's export)",
              probes=list(ctx.cfg.probes), num_train=ctx.cfg.num_train,
              num_test=ctx.cfg.num_test, seed=ctx.cfg.seed)
  out = results_dict(ctx, extractors, results, meta)
  if jax.process_index() == 0:
    written = report.write_report(os.path.join(workdir or ".", EVAL_DIR), out, visuals)
    log(report.markdown_table(out))
    log(f"Evaluation written to {written['html']}")
  collectives.barrier("eval done")
  return out


def training_evaluator(run: run_config.RunConfig
                       ) -> Callable[[int, Any], dict[str, float]] | None:
  """The in-training hook: every `eval.every` steps, `eval.train_probes` on live parameters,
  returned as flat {"eval/<task>/<probe>": value} for metrics.jsonl and TensorBoard; None when
  `eval.every` is 0 (then no eval set is built: a run without probes needs none)."""
  if not run.eval.every:
    return None
  ctx = make_context(run.eval, run.data.image_size)
  spec = encoder.EncoderSpec.from_sections(run.model, run.data, run.mesh)

  def evaluate_live(step: int, encoder_params) -> dict[str, float]:
    extractor = features_lib.live(spec, encoder_params, step)
    results = evaluate(ctx, extractor, ctx.cfg.train_probes, log=lambda _: None)
    ctx.data.forget(extractor.name)
    return {f"eval/{k}": v.value for k, v in results.items()}

  return evaluate_live

