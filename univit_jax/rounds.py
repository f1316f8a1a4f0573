"""`--mode=pipeline`: rounds of extract -> cluster -> train, each round's encoder exported.

Round 1 extracts features with `config.extract.teacher` (the `pixels` bootstrap, a given export,
a SigLIP tower or precomputed features); round r > 1 uses round r - 1's exported encoder. Each
round lives in `<workdir>/round_<r>/` (features/, clusters/, checkpoints/, metrics, export/),
and every stage skips what is already complete there, so rerunning the same command after a
crash or a SIGTERM continues where it stopped. A rerun whose data or extract settings differ
from those a round's features record is refused, finished rounds included
(`extract.checked_inputs`).
"""

import os
from collections.abc import Callable

import jax

from univit_jax import atomic, checkpointing, collectives, encoder, paths, preflight, run_config
from univit_jax import train
from univit_jax.clustering import extract, labels
from univit_jax.evaluation import run as eval_run
from univit_jax.train import logs as train_logs
from univit_jax.train import loop as train_loop

def round_dir(workdir: str, r: int) -> str:
  return os.path.join(workdir, f"round_{r}")


def is_exported(folder: str) -> bool:
  """Whether the round in `folder` is done: its export is complete (an export interrupted by a
  kill is not, so the round runs again and replaces it)."""
  return checkpointing.is_export(encoder.export_dir(folder))


def round_config(run: run_config.RunConfig, workdir: str, r: int) -> run_config.RunConfig:
  """`run` for round r: round r - 1's export is the teacher for r > 1, and where its encoder
  starts when `train.warm_start`; every round compiles into one persistent cache,
  `<workdir>/jax_cache` (unless `train.compilation_cache_dir` or `$JAX_COMPILATION_CACHE_DIR`
  names one: `train.loop.compilation_cache_dir`), so later rounds reuse the first round's
  programs."""
  changes = dict(compilation_cache_dir=train_loop.compilation_cache_dir(run.train, workdir))
  if r > 1:
    previous = encoder.export_dir(round_dir(workdir, r - 1))
    run = run.with_fields("extract", teacher=previous)
    if run.train.warm_start:
      changes["init_encoder"] = previous
  return run.with_fields("train", **changes)


def run_pipeline(run: run_config.RunConfig, workdir: str,
                 log: Callable[[str], None] = print) -> dict:
  """Runs `rounds` rounds in `workdir`; returns a summary (also in pipeline.json).

  Raises:
    config_lib.ConfigError: for a config the pipeline cannot run, before the first stage runs
      (`preflight.check`).
    clustering.store.FeatureStoreError: a round's features were made from other inputs than
      `run` gives (`extract.checked_inputs`), as any refusal of the stages themselves.
  """
  preflight.check(run, "pipeline")
  summary = dict(workdir=workdir, rounds=[])
  for r in range(1, run.rounds + 1):
    folder, cfg = round_dir(workdir, r), round_config(run, workdir, r)
    if is_exported(folder):
      extract.checked_inputs(cfg, folder)  # a finished round made from other data is refused
      log(f"round {r}: complete ({encoder.export_dir(folder)})")
    else:
      log(f"round {r}: extract with teacher {cfg.extract.teacher!r}")
      extract.run_extract(cfg, folder)
      log(f"round {r}: cluster")
      labels.run_cluster_stage(folder, labels.extracted_specs(cfg, folder), log=log)
      log(f"round {r}: train {cfg.train.total_steps} steps")
      result = train.run_train(cfg, folder, eval_run.training_evaluator(cfg))
      if result.preempted:
        log(f"round {r}: stopped by SIGTERM at step {result.step}; rerun to continue")
        summary["preempted"] = True
        return summary
      encoder.export_encoder(cfg, folder, result.state.params["encoder"])
    summary["rounds"].append(_round_summary(folder))
  summary["export"] = encoder.export_dir(round_dir(workdir, run.rounds))
  if jax.process_index() == 0:
    atomic.write_json(os.path.join(workdir, "pipeline.json"), summary)
    _print_summary(summary, log)
  collectives.barrier("pipeline done")
  return summary


def _round_summary(folder: str) -> dict:
  clusters = {}
  for bank in sorted(p.name for p in paths.path(os.path.join(folder, "clusters")).iterdir()):
    stats = labels.read_stats(folder, bank)
    if stats:
      clusters[bank] = dict(k=stats["config"]["num_clusters"], objective=stats["objective"][-1],
                            version=stats["version"])
  records = train_logs.read_metrics(folder)
  terms = sorted(k for k in set().union(*records) if k.endswith("/loss")) if records else []
  # Each term's first and last logged value (the curriculum switches terms on over time).
  first = {k: next(r[k] for r in records if k in r) for k in terms}
  last = {k: next(r[k] for r in reversed(records) if k in r) for k in terms}
  cosines = [r["embedding_cosine"] for r in records if "embedding_cosine" in r]
  return dict(folder=folder, clusters=clusters, first_losses=first, last_losses=last,
              total_loss=next((r["loss"] for r in reversed(records) if "loss" in r), None),
              embedding_cosine=(cosines[0], cosines[-1]) if cosines else None,
              plot=os.path.join(folder, "training.png"), export=encoder.export_dir(folder))


def _print_summary(summary: dict, log: Callable[[str], None]) -> None:
  log("")
  log(f"UniViT pipeline: {len(summary['rounds'])} round(s) in {summary['workdir']}")
  for r, info in enumerate(summary["rounds"], 1):
    log(f"round {r}:")
    for bank, c in info["clusters"].items():
      log(f"  clusters {bank:<8} K={c['k']}, mean cosine to centroid {c['objective']:.3f}")
    for key, value in info["last_losses"].items():
      log(f"  {key:<22} {info['first_losses'][key]:9.4f} -> {value:.4f}")
    if info["embedding_cosine"]:
      log("  mean pairwise cosine of embeddings {:.3f} -> {:.3f} (near 1: collapse)".format(
        *info["embedding_cosine"]))
    log(f"  training curves {info['plot']}")
  log(f"encoder export: {summary['export']}")
