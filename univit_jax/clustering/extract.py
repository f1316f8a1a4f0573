"""`--mode=extract`: teacher features of the training data, streamed into the feature store.

Banks (see `store.py` for the on-disk layout; rows are `(example id, sub-index)`):

  object    images: one row per region, sub-index r: the teacher's region feature of box r
            (boxes from the dataset when it has them, else multi-scale grid proposals),
            L2-normalised; plus one global row per image, sub-index -1: the region feature of
            the full-frame box, so images and regions share one feature space.
  event_<g> clips of `clip_frames` frames cut into g ordered segments (g in `granularities`):
            one row per segment s: the per-frame L2-normalised teacher embeddings of
            `segment_frames` frames spread over the segment, concatenated, L2-normalised again.

The teacher (`extract.teacher`, docs/clustering.md "Teachers") is one of:
  pixels              with no encoder yet, the bootstrap: PCA of the amplitude spectrum and the
                      layout of standardised grey frames, fitted on a sample of the training
                      frames (a region: its crop, embedded the same way);
  <folder>            an exported UniViT encoder (any earlier round's) applied frame by frame (a
                      region: its region embedding, the patches in the box pooled by the MAP
                      head, so the full-frame box is the image embedding);
  siglip:<file.npz>   a big_vision SigLIP / SigLIP 2 image tower (`models/siglip.py`), run by our
                      encoder code on frames in [-1, 1] (a region: its patches pooled by the MAP
                      head, so the full-frame box is the image embedding);
  features:<folder>   embeddings a user precomputed with any model, one `.npy` per data source
                      (`PrecomputedFeatures`): no frame is read; images get whole-image rows only.

Extraction is jitted and sharded over the mesh (a global batch per step), and resumable: batch i
of a bank's sources is chunk i of the bank, so a killed run skips the chunks already committed.
Each bank records what it was made from (`feature_inputs`); a rerun whose config gives other
inputs is refused, naming what changed (`checked_inputs`), never served the old features.
Process 0 writes the store, and `features/keys.npy` (the record key of each sample id, for the
cluster stage: `store.write_keys`); every process takes part in the sharded forward passes.
"""

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from univit_jax import collectives, config_lib, encoder, losses, provenance, run_config, sharding
from univit_jax import paths, specs
from univit_jax.clustering import store
from univit_jax.data import pipeline
from univit_jax.models import masks, siglip, vit
from univit_jax.run_config import data_config, stage_config

GLOBAL_ROW = -1
SIGLIP = "siglip:"
FEATURES = "features:"


class TeacherError(config_lib.ConfigError):
  """The files `extract.teacher` names are missing or malformed; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Feature definitions (pure, jittable).


def segment_frame_indices(num_frames: int, num_segments: int, per_segment: int) -> np.ndarray:
  """`[g, F]` frame indices: F frames spread evenly over each of g ordered segments."""
  out = np.zeros((num_segments, per_segment), np.int32)
  for s, frames in enumerate(masks.segment_frame_masks(num_frames, num_segments)):
    members = np.flatnonzero(frames)
    out[s] = members[np.round(np.linspace(0, len(members) - 1, per_segment)).astype(int)]
  return out


def event_features(frame_embeddings: jax.Array, num_segments: int, per_segment: int
                   ) -> jax.Array:
  """Event features `[B, g, F * D]` from per-frame teacher embeddings `[B, T, D]`.

  Per-frame L2 normalisation, F frames per segment concatenated in time order, L2 normalisation
  again (OneVision-Encoder's "normalise, concatenate, normalise").
  """
  b, t, d = frame_embeddings.shape
  index = segment_frame_indices(t, num_segments, per_segment)
  frames = losses.l2_normalize(frame_embeddings.astype(jnp.float32))[:, index]  # [B, g, F, D]
  return losses.l2_normalize(frames.reshape(b, num_segments, per_segment * d))


def grid_proposals(grids: Sequence[int]) -> np.ndarray:
  """Multi-scale proposals `[R, 4]`: the cells of n x n grids over the frame, for n in grids."""
  boxes = [(i / n, j / n, (i + 1) / n, (j + 1) / n)
           for n in grids for i in range(n) for j in range(n)]
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def object_boxes(batch: dict, proposals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per image: its dataset boxes when it has any, else the proposals. `[B, R, 4]`, `[B, R]`."""
  b = batch["frames"].shape[0]
  r = max(proposals.shape[0], batch["boxes"].shape[1] if "boxes" in batch else 0)
  boxes = np.zeros((b, r, 4), np.float32)
  valid = np.zeros((b, r), bool)
  for i in range(b):
    own = batch["box_mask"][i] if "box_mask" in batch else np.zeros(0, bool)
    if own.any():
      n = own.shape[0]
      boxes[i, :n], valid[i, :n] = batch["boxes"][i], own
    else:
      n = proposals.shape[0]
      boxes[i, :n], valid[i, :n] = proposals, True
  return boxes, valid


# ---------------------------------------------------------------------------------------------
# Teachers. `embed`: frames [B, T, H, W, C] -> frame embeddings [B, T, D]; `regions`: one frame
# [B, H, W, C] and boxes [B, R, 4] -> region features [B, R, D], L2-normalised, in the space of
# the whole image's: the object bank's whole-image row is the region of the full-frame box, so
# whole images and their regions are clustered in one feature space.


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frame-wise feature function and the identity recorded in the store."""
  name: str
  dim: int
  embed: Callable[[jax.Array], jax.Array]
  regions: Callable[[jax.Array, jax.Array], jax.Array]


FULL_FRAME = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)


def _pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[F]` and the top `dim` principal directions `[F, dim]` of rows `x [N, F]`."""
  x = x.astype(np.float64)
  mean = x.mean(0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  if vt.shape[0] < dim:
    raise config_lib.ConfigError(
      f"extract.pixels_dim={dim} exceeds the {vt.shape[0]} principal components the fitting "
      "sample supports; lower it or raise extract.pixels_fit_examples")
  return mean.astype(np.float32), vt[:dim].T.astype(np.float32)


def _downsample(frames: jax.Array, size: int) -> jax.Array:
  """Average-pools `[..., H, W, C]` to `[..., size, size, C]` (H, W multiples of size)."""
  *lead, h, w, c = frames.shape
  x = frames.reshape(*lead, size, h // size, size, w // size, c)
  return x.mean(axis=(-4, -2))


def _standardize(gray: jax.Array) -> jax.Array:
  """Grey images `[..., H, W]` with zero mean and unit variance each."""
  gray = gray - gray.mean(axis=(-2, -1), keepdims=True)
  return gray / (gray.std(axis=(-2, -1), keepdims=True) + 1e-6)


def _gray(frames: jax.Array) -> jax.Array:
  """`[..., H, W, C]` -> the mean over channels `[..., H, W]`, float32."""
  return frames.astype(jnp.float32).mean(-1)


def _standard_gray(frames: jax.Array) -> jax.Array:
  """`[..., H, W, C]` -> standardised grey `[..., H, W]`: blind to the canvas colour, the item's
  tint and the overall brightness."""
  return _standardize(_gray(frames))


def _descriptors(gray: jax.Array, layout_size: int) -> tuple[jax.Array, jax.Array]:
  """The two views of the pixels teacher of standardised grey frames `[..., H, W]`: the
  amplitude spectrum `[..., H * W]` (|FFT|: the same wherever the content sits, so it follows
  shape, not placement) and the layout `[..., layout_size^2]` (average-pooled grey: placement)."""
  spectrum = jnp.abs(jnp.fft.fft2(gray))
  layout = _downsample(gray[..., None], layout_size)
  return (spectrum.reshape(*gray.shape[:-2], -1), layout.reshape(*gray.shape[:-2], -1))


def crop_boxes(frames: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """Bilinear crops `[B, R, size, size]` of grey frames `[B, H, W]` at boxes `[B, R, 4]`
  (ymin, xmin, ymax, xmax in [0, 1]); the full-frame box at size H returns the frame itself."""
  h, w = frames.shape[-2:]
  steps = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
  ys = (boxes[..., 0:1] + steps * (boxes[..., 2:3] - boxes[..., 0:1])) * h - 0.5  # [B, R, size]
  xs = (boxes[..., 1:2] + steps * (boxes[..., 3:4] - boxes[..., 1:2])) * w - 0.5

  def crop(image, y, x):
    grid = jnp.stack(jnp.broadcast_arrays(y[:, None], x[None, :]))
    return jax.scipy.ndimage.map_coordinates(image, list(grid), order=1, mode="nearest")

  return jax.vmap(jax.vmap(crop, (None, 0, 0)), (0, 0, 0))(frames, ys, xs)


def pixels_teacher(sample_frames: np.ndarray, dim: int, seed: int) -> Teacher:
  """The bootstrap teacher: PCA of two views of standardised grey frames (docs/clustering.md).

  A frame's embedding is the concatenation of the L2-normalised PCA (dim / 2 components each) of
  its amplitude spectrum and of its 8 x 8 layout (`_descriptors`). A region is cropped from the
  frame, resized to the frame's size and embedded the same way, so whole images and regions
  share one space. Standardised grey removes colour, so clusters follow shape and placement
  rather than the canvas colour and tint, which the RGB pixels of the demo are dominated by.

  Args:
    sample_frames: `[N, H, W, C]` training frames to fit the two PCAs on.
    dim: output width (even).
    seed: recorded in the teacher's name (fitting itself is deterministic).
  """
  if dim % 2:
    raise config_lib.ConfigError(f"extract.pixels_dim={dim} must be even (two views)")
  n, h, w, _ = sample_frames.shape
  layout_size = 8 if h % 8 == 0 and w % 8 == 0 else 1
  spectrum, layout = (np.asarray(v) for v in _descriptors(
    _standard_gray(jnp.asarray(sample_frames)), layout_size))
  fits = [_pca(spectrum, dim // 2), _pca(layout, dim // 2)]

  def embed_gray(gray: jax.Array) -> jax.Array:
    views = _descriptors(gray, layout_size)
    return jnp.concatenate([losses.l2_normalize((v - mean) @ proj)
                            for v, (mean, proj) in zip(views, fits)], axis=-1) / np.sqrt(2.0)

  def embed(frames: jax.Array) -> jax.Array:
    return embed_gray(_standard_gray(frames))

  def regions(frames: jax.Array, boxes: jax.Array) -> jax.Array:
    return embed_gray(_standardize(crop_boxes(_gray(frames), boxes, h)))

  digest = hashlib.sha1(b"".join(a.tobytes() for fit in fits for a in fit)).hexdigest()[:12]
  return Teacher(name=f"pixels-v2-pca{dim}-{digest}-seed{seed}", dim=dim, embed=embed,
                 regions=regions)


def encoder_teacher(export_dir: str, mesh: jax.sharding.Mesh) -> Teacher:
  """An exported UniViT encoder applied to every frame as an image (T = 1).

  A region is the encoder's region embedding: its patches pooled by the MAP head with the probe
  attending only to the patches in the box, the embedding the object term trained against the
  object bank. The full-frame box is then the image embedding, so whole images and regions share
  one space (the mean of the patch tokens, which no loss shapes, lives in another one).
  """
  teacher = encoder.load_encoder(export_dir, mesh)

  def embed(frames: jax.Array) -> jax.Array:
    b, t = frames.shape[:2]
    embedding, _ = teacher.apply(frames.reshape(b * t, 1, *frames.shape[2:]))
    return embedding.reshape(b, t, -1)

  def regions(frames: jax.Array, boxes: jax.Array) -> jax.Array:
    _, aux = teacher.apply(frames[:, None], boxes=boxes)
    return losses.l2_normalize(aux["regions"])

  return Teacher(name=teacher.name, dim=teacher.model.width, embed=embed, regions=regions)


def siglip_teacher(path: str, variant: str, data_cfg: data_config.DataConfig,
                   mesh: jax.sharding.Mesh, rules: Sequence[tuple]) -> Teacher:
  """A big_vision SigLIP / SigLIP 2 image tower (`models/siglip.py`) applied to every frame as an
  image; its embedding is the MAP head's output.

  A region is the tower's patches pooled by its MAP head with the probe attending only to the
  patches whose centre lies in the box, L2-normalised (`vit.UniViT`'s `boxes`): the full-frame
  box is then exactly the image embedding, so whole images and regions share the MAP head's
  space (the mean of SigLIP's patch tokens lives in another one).

  Frames arrive normalised by the data pipeline (`data.mean`, `data.std`); they are mapped back
  to [0, 1], then to [-1, 1] (big_vision's `value_range(-1, 1)`, the input SigLIP was trained
  on), and resized (bilinear) to the tower's resolution when `data.image_size` differs from it.

  Args:
    path: the big_vision `.npz`.
    variant: its tower, e.g. "B/16" (`extract.siglip_variant`).
    data_cfg: the data settings (normalisation of the incoming frames).
    mesh: where the weights are placed, by `rules` (`sharding_rules`).
    rules: logical-axis rules.
  """
  cfg, params = siglip.load_big_vision_npz(path, variant, scan=True)
  digest = hashlib.sha1()
  for x in jax.tree.leaves(params):
    digest.update(np.asarray(x).tobytes())
  graphdef, abstract = vit.abstract_encoder(cfg)
  params = jax.device_put(params, sharding.tree_shardings(abstract, mesh, rules))
  activations = sharding.activation_sharding(mesh, rules)
  mean = np.asarray(data_cfg.transform.mean, np.float32)
  std = np.asarray(data_cfg.transform.std, np.float32)
  size = (cfg.pos_grid[0] * cfg.patch_size, cfg.pos_grid[1] * cfg.patch_size)

  @jax.jit
  def forward(params, frames, boxes):
    x = (frames.astype(jnp.float32) * std + mean) * 2.0 - 1.0  # [B, H, W, C] in [-1, 1]
    if x.shape[1:3] != size:
      x = jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear")
    return nnx.merge(graphdef, params)(x, boxes=boxes, activation_sharding=activations)

  def embed(frames: jax.Array) -> jax.Array:
    b, t = frames.shape[:2]
    embedding, _ = forward(params, frames.reshape(b * t, *frames.shape[2:]), None)
    return embedding.reshape(b, t, -1)

  def regions(frames: jax.Array, boxes: jax.Array) -> jax.Array:
    _, aux = forward(params, frames, boxes)
    return losses.l2_normalize(aux["regions"])

  return Teacher(name=f"{SIGLIP}{paths.absolute(path)}:{variant}:{digest.hexdigest()[:12]}",
                 dim=cfg.width, embed=embed, regions=regions)


class FeatureFile(NamedTuple):
  """One source's precomputed embeddings: its file, the (locally memory-mapped) array, its
  example ids."""
  path: str
  array: np.ndarray
  ids: range


@dataclasses.dataclass(frozen=True)
class PrecomputedFeatures:
  """The `features:<folder>` teacher: embeddings computed with any model, one file per source.

  `<folder>/<source name>.npy`, for every configured data source, in the source's own record
  order: float `[N, D]` for an image source (one embedding per image) or `[N, F, D]` for a clip
  source (F = `extract.clip_frames` per-frame embeddings spread uniformly over the clip). Local
  files are memory-mapped (remote ones read whole into memory: `paths.load_npy`); a batch of
  example ids reads only its rows, and no frame is decoded.

  Attributes:
    name: recorded in the store: the folder and a digest of the files' shapes and end rows.
    dim: D.
    files: per source name.
  """
  name: str
  dim: int
  files: dict[str, FeatureFile]

  def rows(self, ids: np.ndarray) -> np.ndarray:
    """float32 rows of example ids `[n]` of one kind (images or clips): `[n, D]` or `[n, F, D]`.

    Raises:
      TeacherError: naming the file and the first row read with a non-finite value.
    """
    out = None
    for file in self.files.values():
      inside = (ids >= file.ids.start) & (ids < file.ids.stop)
      if not inside.any():
        continue
      local = ids[inside] - file.ids.start
      rows = np.asarray(file.array[local], np.float32)
      finite = np.isfinite(rows).reshape(len(rows), -1).all(axis=1)
      if not finite.all():
        raise TeacherError(f"{file.path}: row {local[~finite][0]} holds non-finite values "
                           "(the first such row)")
      if out is None:
        out = np.empty((len(ids), *rows.shape[1:]), np.float32)
      out[inside] = rows
    return out


def precomputed_features(folder: str, cfg: stage_config.ExtractConfig,
                         data_cfg: data_config.DataConfig) -> PrecomputedFeatures:
  """Opens and checks `<folder>/<source>.npy` of every configured source (`PrecomputedFeatures`).

  Row i of a source's file belongs to the source's record i, whose example id is
  `pipeline.id_ranges(...)[source][i]` (sources concatenated in name order).

  Raises:
    TeacherError: naming the file, when it is missing, is not a float array of the source's
      rank, has another row count than the source has records, another frame count than
      `extract.clip_frames`, or another width D than the other files.
  """
  ranges = pipeline.id_ranges(data_cfg, pipeline.open_sources(data_cfg))
  files = {}
  for spec in data_cfg.sources:
    path = os.path.join(folder, f"{spec.name}.npy")
    if not paths.path(path).exists():
      raise TeacherError(f"extract.teacher={FEATURES}{folder}: no features for the data source "
                         f"{spec.name!r}: {path} does not exist")
    array = paths.load_npy(path, mmap=True)
    n = len(ranges[spec.name])
    kind, want = (("clip", f"[N={n}, F={cfg.clip_frames}, D]") if spec.is_video
                  else ("image", f"[N={n}, D]"))
    if array.ndim != (3 if spec.is_video else 2) or array.dtype.kind != "f":
      raise TeacherError(f"{path}: a {array.dtype} array of shape {array.shape}; the {kind} "
                         f"source {spec.name!r} needs a float array {want}")
    if array.shape[0] != n:
      raise TeacherError(f"{path}: {array.shape[0]} rows, but the {kind} source {spec.name!r} "
                         f"has {n} records (expected {want})")
    if spec.is_video and array.shape[1] != cfg.clip_frames:
      raise TeacherError(f"{path}: F={array.shape[1]} frame embeddings per clip, but "
                         f"extract.clip_frames={cfg.clip_frames} (expected {want})")
    files[spec.name] = FeatureFile(path, array, ranges[spec.name])
  widths = {f.path: f.array.shape[-1] for f in files.values()}
  if len(set(widths.values())) != 1:
    raise TeacherError(f"extract.teacher={FEATURES}{folder}: the files differ in width D: "
                       f"{widths}")
  digest = hashlib.sha1()
  for f in files.values():
    digest.update(f"{f.path}{f.array.shape}{f.array.dtype}".encode())
    if len(f.array):
      digest.update(np.asarray(f.array[0]).tobytes() + np.asarray(f.array[-1]).tobytes())
  return PrecomputedFeatures(
    name=f"{FEATURES}{paths.absolute(folder)}:{digest.hexdigest()[:12]}",
    dim=int(next(iter(widths.values()))), files=files)


# ---------------------------------------------------------------------------------------------
# The stage.


def fit_pixels_teacher(cfg: stage_config.ExtractConfig, data_cfg: data_config.DataConfig,
                       seed: int) -> Teacher:
  """Fits the pixels teacher on frames of the first `pixels_fit_examples` training records."""
  names = [s.name for s in data_cfg.sources]
  ds = pipeline.build_eval_dataset(data_cfg, 1, jax.process_count(), source_names=names,
                                   process_index=0, process_count=1)
  frames = []
  for batch in ds:
    frames.append(batch["frames"][:, 0][batch["example_mask"]])
    if sum(len(f) for f in frames) >= cfg.pixels_fit_examples:
      break
  sample = np.concatenate(frames)[:cfg.pixels_fit_examples]
  return pixels_teacher(sample, cfg.pixels_dim, seed)


def make_teacher(cfg: stage_config.ExtractConfig, data_cfg: data_config.DataConfig,
                 mesh: jax.sharding.Mesh, rules: Sequence[tuple], seed: int) -> Teacher:
  """The frame teacher `extract.teacher` names (`features:` reads no frames: see run_extract);
  a SigLIP tower's weights are placed on `mesh` by `rules`, the pixels teacher fitted with
  `seed`."""
  if cfg.teacher == "pixels":
    return fit_pixels_teacher(cfg, data_cfg, seed)
  if cfg.teacher.startswith(SIGLIP):
    return siglip_teacher(cfg.teacher[len(SIGLIP):], cfg.siglip_variant, data_cfg, mesh, rules)
  return encoder_teacher(cfg.teacher, mesh)


def feature_inputs(cfg: stage_config.ExtractConfig, data_cfg: data_config.DataConfig) -> dict:
  """What a feature store is made from, recorded in each bank's meta.json: the data sources
  (`pipeline.sources_fingerprint`: what its example ids name), the frame settings they are read
  with (`data.image_size`, `max_boxes`, `mean`, `std`) and the `extract` section (the teacher,
  and `batch_size`: chunk i of a bank is batch i)."""
  sources = pipeline.sources_fingerprint(data_cfg, pipeline.open_sources(data_cfg))
  return provenance.jsonable(dict(
    data=dict(sources=sources, image_size=data_cfg.image_size, max_boxes=data_cfg.max_boxes,
              mean=data_cfg.transform.mean, std=data_cfg.transform.std),
    extract=dataclasses.asdict(cfg)))


def checked_inputs(run: run_config.RunConfig, workdir: str) -> dict:
  """`feature_inputs` of the run, after refusing every bank already in `workdir` that was made
  from other ones: a complete bank is never silently kept, nor an unfinished one resumed, for
  other data or settings (docs/clustering.md, "Reruns").

  Raises:
    store.FeatureStoreError: naming the bank's folder and what changed.
  """
  inputs = feature_inputs(run.extract, run.data)
  for bank in run.parts.banks:
    store.check_inputs(workdir, bank, inputs)
  return inputs


# A batch's work: () -> (the gathered host batch, the teacher's outputs as NumPy).
Work = Callable[[], tuple[dict, object]]


def run_extract(run: run_config.RunConfig, workdir: str,
                teacher: Teacher | None = None) -> dict[str, str]:
  """Writes every bank's features into `<workdir>/features/`; skips complete banks and chunks.

  Args:
    run: the run's config (`extract`, `data`, `parts`, `mesh`, `seed`).
    workdir: the run folder.
    teacher: overrides `extract.teacher` (tests pass fake teachers).

  Returns:
    The teacher name recorded for each bank.

  Only process 0 writes the store; every process runs the teacher over its share of each batch.
  What to skip is read by every process before the "extract start" barrier, after which process
  0 writes, so all processes skip the same batches (and meet in the same collectives); the
  "extract done" barrier keeps every process here until the store is complete.

  Raises:
    store.FeatureStoreError: `workdir` holds features made from other inputs (`checked_inputs`).
  """
  inputs = checked_inputs(run, workdir)
  cfg, data_cfg = run.extract, run.data
  mesh = sharding.make_mesh(run.mesh)
  image_sources = [s.name for s in data_cfg.sources if not s.is_video]
  video_sources = [s.name for s in data_cfg.sources if s.is_video]
  banks = run.parts.banks
  written = {b: _written(workdir, b) for b in banks}
  if jax.process_index() == 0:  # the same for the same inputs; whole before the barrier
    store.write_keys(workdir, pipeline.example_keys(data_cfg, pipeline.open_sources(data_cfg)))
  collectives.barrier("extract start")
  if all(complete for complete, _ in written.values()):
    logging.info("extract: banks %s are complete; nothing to do", banks)
    return {b: store.BankReader(workdir, b).meta["teacher"] for b in banks}
  precomputed = None
  if teacher is None and cfg.teacher.startswith(FEATURES):
    precomputed = precomputed_features(cfg.teacher[len(FEATURES):], cfg, data_cfg)
    name, dim = precomputed.name, precomputed.dim
  else:
    teacher = teacher or make_teacher(cfg, data_cfg, mesh, run.mesh.rules, run.seed)
    name, dim = teacher.name, teacher.dim
  batch_sharding = sharding.batch_sharding(mesh, run.mesh.rules)
  proposals = grid_proposals(cfg.proposal_grids)

  @jax.jit
  def events_of(embeddings):
    # Per-frame embeddings [B, T, D] -> {g: event features [B, g, segment_frames * D]}.
    return {g: event_features(embeddings, g, cfg.segment_frames) for g in cfg.granularities}

  @jax.jit
  def object_step(frames, boxes):
    # The whole-image row is the full-frame box, taken in the same pass as the regions.
    whole = jnp.broadcast_to(FULL_FRAME, (frames.shape[0], 1, 4))
    features = teacher.regions(frames[:, 0], jnp.concatenate([whole, boxes], axis=1))
    return features[:, 0], features[:, 1:]

  @jax.jit
  def event_step(frames):
    return events_of(teacher.embed(frames))

  def object_rows(batch, outputs):
    global_rows, regions = outputs
    ids, keep = batch["id"], batch["example_mask"]
    feats, row_ids = [global_rows[keep]], [np.stack([ids[keep], np.full(keep.sum(), -1)], 1)]
    valid = batch["_region_valid"] & keep[:, None]
    b_idx, r_idx = np.nonzero(valid)
    feats.append(regions[b_idx, r_idx])
    row_ids.append(np.stack([ids[b_idx], r_idx], 1))
    return {specs.OBJECT_BANK: (np.concatenate(feats), np.concatenate(row_ids))}

  def event_rows(batch, outputs):
    ids, keep = batch["id"][batch["example_mask"]], batch["example_mask"]
    rows = {}
    for g, feats in outputs.items():
      segs = np.arange(g)
      rows[specs.event_bank_name(g)] = (feats[keep].reshape(-1, feats.shape[-1]),
                             np.stack([np.repeat(ids, g), np.tile(segs, len(ids))], 1))
    return rows

  def frame_batches(names: Sequence[str], num_frames: int) -> tuple[int, Iterator[Work]]:
    """The teacher over the frames of the records of `names`, batch by batch."""
    total, batches = pipeline.eval_batches(data_cfg, names, num_frames, cfg.batch_size)

    def work(batch):
      batch = dict(batch)
      if num_frames == 1:
        boxes, batch["_region_valid"] = object_boxes(batch, proposals)
        inputs = pipeline.to_global_batch(dict(frames=batch["frames"], boxes=boxes),
                                          batch_sharding)
        outputs = jax.tree.map(collectives.gather, object_step(inputs["frames"], inputs["boxes"]))
      else:
        frames = pipeline.to_global_batch(dict(frames=batch["frames"]), batch_sharding)["frames"]
        outputs = jax.tree.map(collectives.gather, event_step(frames))
      return {k: collectives.gather_local(v) for k, v in batch.items()}, outputs

    return total, (lambda batch=batch: work(batch) for batch in batches)

  def precomputed_batches(names: Sequence[str], num_frames: int) -> tuple[int, Iterator[Work]]:
    """The rows of the records of `names` read from the precomputed files, on process 0 only:
    images get their whole-image row alone (no regions), clips their event features."""
    if jax.process_index() != 0:
      return 0, iter(())
    ids = np.concatenate([np.asarray(precomputed.files[n].ids, np.int64) for n in names])
    starts = range(0, len(ids), cfg.batch_size)

    def work(chunk):
      rows = precomputed.rows(chunk)
      batch = dict(id=chunk, example_mask=np.ones(len(chunk), bool),
                   _region_valid=np.zeros((len(chunk), 0), bool))
      if num_frames == 1:
        return batch, (np.asarray(losses.l2_normalize(rows)),
                       np.zeros((len(chunk), 0, precomputed.dim), np.float32))
      return batch, jax.tree.map(np.asarray, events_of(rows))

    return len(starts), (lambda chunk=ids[i:i + cfg.batch_size]: work(chunk) for i in starts)

  def run_group(names, num_frames, bank_names, bank_dim, to_rows):
    if all(written[b][0] for b in bank_names):
      return
    primary = jax.process_index() == 0
    writers = ({b: store.BankWriter(workdir, b, bank_dim, name, inputs) for b in bank_names}
               if primary else {})
    total, works = (precomputed_batches if precomputed else frame_batches)(names, num_frames)
    for index, work in enumerate(tqdm.tqdm(
        works, total=total, desc=f"extract {'+'.join(bank_names)}", unit="batch",
        disable=not primary)):
      if all(store.chunk_name(index) in written[b][1] for b in bank_names):
        continue
      batch, outputs = work()
      if primary:
        for bank, (features, ids) in to_rows(batch, outputs).items():
          writers[bank].write_chunk(index, features, ids)
    for w in writers.values():
      w.finish()

  if image_sources:
    run_group(image_sources, 1, [specs.OBJECT_BANK], dim, object_rows)
  if video_sources:
    event_banks = [specs.event_bank_name(g) for g in cfg.granularities]
    run_group(video_sources, cfg.clip_frames, event_banks, cfg.segment_frames * dim, event_rows)
  collectives.barrier("extract done")
  return {b: name for b in banks}


def _written(workdir: str, bank: str) -> tuple[bool, set[str]]:
  """Whether a bank of the store is complete, and the names of its committed chunks (False and
  none for a bank not begun, or one whose meta.json cannot be read: its writer reports that)."""
  try:
    reader = store.BankReader(workdir, bank, require_complete=False)
  except store.FeatureStoreError:
    return False, set()
  return bool(reader.meta.get("complete")), set(reader.chunk_names)
