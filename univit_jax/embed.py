"""`--mode=embed`: an export's embeddings of every record of one source, written as arrays.

  python -m univit_jax.main --config=configs/demo.py --workdir=DIR --mode=embed \
      --config.embed.source='{"type": "image_folder", "path": "/data/images"}'

The source is one spec as in `config.data.sources` (an image or video folder, a manifest, a
TFDS split, the demo); the encoder is `embed.encoder` (default: DIR's export,
`encoder.find_export`). Records take the data pipeline's evaluation path
(`pipeline.eval_batches`) with the export's own preprocessing (`encoder.Preprocessing`): each
frame's centre square resized to its `image_size`, clips sampled uniformly to `embed.frames`
frames, normalised with its mean and std. Row i is therefore what
`univit_jax.load_encoder(export)(frames)` gives for the record's frames. The forward pass is
jitted over the devices of every process; each process reads the records i with
i % process_count == process_index, and process 0 gathers the rows and writes `embed.output`
(default `DIR/embeddings/`):

  embeddings.npy      float32 [N, D]: row i embeds the record ids[i]
  ids.npy             int64 [N]: the record's index in the source (rows in source order)
  keys.json           [N] strings: the record's key (`sources.record_keys`: a file's path relative
                      to its folder or manifest, an ArrayRecord record's stored key, else its
                      index)
  segments_<g>.npy    float32 [N, g, D] per g in `embed.segments`, with segment_mask_<g>.npy
                      bool [N, g] (False: a segment made of padding frames of a short clip)
  regions.npy         float32 [N, R, D], one embedding per box (`embed.regions`; R =
                      `data.max_boxes`), with region_mask.npy bool [N, R] (False: padding)
  embed.json          what was embedded: the export, the source, frames, counts

An unreadable record gets no row (embed.json counts the skipped records; more than
`data.max_bad_fraction` of them stop the run, as in training). Locally the folder is built beside
the output and renamed into place, so a kill leaves the previous output or none; on an object
store it is written in place, embed.json last and deleted first (`atomic.commit_dir`).
Rows are held in memory until written (N x D floats, plus segments and regions).
"""

import collections
import dataclasses
import math
import os

import jax
import numpy as np
import tqdm

from univit_jax import atomic, collectives, config_lib, encoder, paths, run_config, sharding
from univit_jax.data import pipeline
from univit_jax.data import sources as sources_lib
from univit_jax.run_config import data_config

OUTPUT_FORMAT = "univit_jax.embeddings"
OUTPUT_VERSION = 1
OUTPUT_MARKER = "embed.json"  # written last: on an object store, the output is complete with it


def _in_workdir(workdir: str | None, field: str) -> str:
  if not workdir:
    raise config_lib.ConfigError(f"{field} is empty: set it or pass --workdir")
  return workdir


def run_embed(run: run_config.RunConfig, workdir: str | None) -> str:
  """Writes the embeddings of `embed.source` (see the module docstring); returns the folder.

  Raises:
    config_lib.ConfigError: no `embed.source`, an empty `embed.encoder` or `embed.output`
      without a workdir, or a batch size the devices and processes do not divide.
    FileNotFoundError: no export where `embed.encoder` (or the workdir) points.
    sources_lib.SourceError: the source has no records, or no boxes with `embed.regions`.
  """
  cfg = run.embed
  source_spec = cfg.required_source()
  path = cfg.encoder or encoder.find_export(_in_workdir(workdir, "embed.encoder"), run.rounds)
  output = cfg.output or os.path.join(_in_workdir(workdir, "embed.output"), "embeddings")
  spec = encoder.read_spec(path)
  mesh = encoder.inference_mesh(spec.mesh_axes)
  enc = encoder.load_encoder(path, mesh)
  multiple = math.lcm(sharding.batch_shards(mesh, spec.sharding_rules), jax.process_count())
  if cfg.batch_size % multiple:
    raise config_lib.ConfigError(
      f"embed.batch_size={cfg.batch_size} must be a multiple of {multiple} (the devices the "
      "batch is split over and the processes)")
  pre = spec.preprocessing
  num_frames = (cfg.frames or max(pre.frames)) if source_spec.is_video else 1
  data_cfg = dataclasses.replace(
    run.data, sources=(source_spec,), frames=(num_frames,), bucket_weights=(1.0,),
    bucket_tokens=(), image_size=pre.image_size, patch_size=pre.patch_size,
    virtual_frames=spec.model.rope.virtual_frames, transform=data_config.TransformConfig(
      pre.image_size, augment=False, mean=pre.mean, std=pre.std))
  source = sources_lib.build_source(source_spec)
  if not len(source):
    raise sources_lib.SourceError(f"embed.source {source_spec.to_dict()} has no records")
  if cfg.regions and "boxes" not in source[0]:
    raise sources_lib.SourceError(
      f"embed.regions=True, but the records of embed.source {source_spec.to_dict()} have no boxes")

  batch_sharding = sharding.batch_sharding(mesh, spec.sharding_rules)
  total, batches = pipeline.eval_batches(data_cfg, [source_spec.name], num_frames,
                                         cfg.batch_size, {source_spec.name: source})
  rows = collections.defaultdict(list)
  for batch in tqdm.tqdm(batches, total=total, desc="embed", unit="batch",
                         disable=jax.process_index() != 0):
    names = ("frames", "frame_mask") + (("boxes",) if cfg.regions else ())
    inputs = pipeline.to_global_batch({k: batch[k] for k in names}, batch_sharding)
    embedding, aux = enc.apply(inputs["frames"], frame_mask=inputs["frame_mask"],
                               segments=cfg.segments, boxes=inputs.get("boxes"))
    outputs = {"embeddings": embedding}
    for g in cfg.segments:
      outputs[f"segments_{g}"] = aux["segments"][g]
      outputs[f"segment_mask_{g}"] = aux["segment_mask"][g]
    if cfg.regions:
      outputs["regions"] = aux["regions"]
    outputs = {k: collectives.gather(v) for k, v in outputs.items()}
    if cfg.regions:
      outputs["region_mask"] = collectives.gather_local(batch["box_mask"])
    outputs["ids"] = collectives.gather_local(batch["id"]).astype(np.int64)
    keep = collectives.gather_local(batch["example_mask"])
    for k, v in outputs.items():
      rows[k].append(v[keep])
  if jax.process_index() == 0:
    _write(output, rows, source, dict(
      format=OUTPUT_FORMAT, version=OUTPUT_VERSION, encoder=enc.name,
      export=paths.absolute(path), source=source_spec.to_dict(), frames=num_frames,
      image_size=pre.image_size, segments=list(cfg.segments), regions=cfg.regions,
      records=len(source)))
  collectives.barrier("embed done")
  return output


def _write(output: str, rows: dict[str, list[np.ndarray]], source: sources_lib.Source,
           meta: dict) -> None:
  """Writes the rows, in source order, with keys.json and embed.json into a folder that then
  replaces `output`."""
  arrays = {k: np.concatenate(v) for k, v in rows.items()}
  order = np.argsort(arrays["ids"], kind="stable")
  arrays = {k: v[order] for k, v in arrays.items()}
  ids = arrays["ids"]
  names = sources_lib.record_keys(source)
  keys = [names[int(i)] for i in ids]
  staging = atomic.staging_dir(output)
  atomic.clear_staging(output, OUTPUT_MARKER)  # left by a kill mid-write, or the old output
  for name, array in arrays.items():
    atomic.save_npy(os.path.join(staging, f"{name}.npy"), array)
  atomic.write_json(os.path.join(staging, "keys.json"), keys)
  info = dict(meta, rows=len(ids), skipped=meta["records"] - len(ids),
              files=sorted(f"{name}.npy" for name in arrays) + ["keys.json"])
  atomic.commit_dir(output, OUTPUT_MARKER, atomic.json_bytes(info))
