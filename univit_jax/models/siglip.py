"""SigLIP / SigLIP 2 image towers from big_vision `.npz` checkpoints, run by our own encoder.

A big_vision SigLIP checkpoint (`gs://big_vision/siglip/*.npz`, `gs://big_vision/siglip2/*.npz`)
is one flat `.npz` of both towers, keys joined by "/" (`img/...`, `txt/...`, `t`, `b`; sometimes
under `params/`). The image tower is big_vision's ViT with MAP pooling and no classifier head:

  img/embedding/kernel [p, p, C, D], img/embedding/bias [D]     conv patch embedding
  img/pos_embedding [1, gh * gw, D]                            learned, added to the patches
  img/Transformer/encoderblock_<i>/...                         block i (unscanned layout), or
  img/Transformer/encoderblock/...                             all blocks stacked [depth, ...]
      LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out}, LayerNorm_1,
      MlpBlock_0/{Dense_0,Dense_1}
  img/Transformer/encoder_norm/{scale,bias}
  img/MAPHead_0/{probe [1, 1, D], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}

Attention kernels are `query|key|value: [D, H, K]` (bias `[H, K]`) and `out: [H, K, D]`, the
layout of our `vit.Attention`; the MAP head has the structure of our `vit.MapHead`. The tower
differs from a UniViT encoder only by switches of `ModelConfig` (`siglip_model_config`): a
patch bias, the position table, no pre-norm, no RoPE, tanh GELU, no time embedding. So
`load_big_vision_npz` maps the keys onto `vit.UniViT` and the forward pass is ours.

The tower expects pixels in [-1, 1] (big_vision's `value_range(-1, 1)`) at the resolution of
its position table (e.g. 224 px for "SigLIP B/16 224": a 14 x 14 grid of 16 px patches).
"""

import dataclasses
import math
import os
import re

import jax
import numpy as np
from flax import nnx

from univit_jax import config_lib, paths, specs
from univit_jax.models import vit


class CheckpointError(config_lib.ConfigError):
  """A checkpoint that does not match the requested tower; the message names the key."""


# big_vision's ViT sizes of the SigLIP / SigLIP 2 image towers (its `vit.decode_variant`).
SIZES: dict[str, specs.Size] = {
  "B": specs.Size(width=768, depth=12, num_heads=12, mlp_dim=3072),
  "L": specs.Size(width=1024, depth=24, num_heads=16, mlp_dim=4096),
  "So400m": specs.Size(width=1152, depth=27, num_heads=16, mlp_dim=4304),
  "g-opt": specs.Size(width=1536, depth=40, num_heads=16, mlp_dim=6144),
}


def decode_variant(variant: str) -> tuple[specs.Size, int]:
  """The size and patch of a variant such as "B/16" or "So400m/14".

  Raises:
    config_lib.ConfigError: naming the variant when it is malformed or unknown.
  """
  name, sep, patch = variant.partition("/")
  if name not in SIZES or not sep or not patch.isdigit() or int(patch) <= 0:
    raise config_lib.ConfigError(
      f"extract.siglip_variant={variant!r}: expected '<size>/<patch>' with size in "
      f"{sorted(SIZES)}, e.g. 'B/16'")
  return SIZES[name], int(patch)


def siglip_model_config(variant: str, grid: tuple[int, int], scan: bool = False
                        ) -> config_lib.ModelConfig:
  """The `ModelConfig` that makes `vit.UniViT` a big_vision SigLIP image tower.

  Args:
    variant: e.g. "B/16".
    grid: (gh, gw) patch grid of the checkpoint's position table.
    scan: stack the blocks and scan over them (as `ModelConfig.scan`).
  """
  size, patch = decode_variant(variant)
  return config_lib.ModelConfig(
    **dataclasses.asdict(size), patch_size=patch, channels=3, scan=scan,
    rope=config_lib.RopeConfig(mode="none"), time_embedding="none", patch_bias=True,
    pos_grid=tuple(grid), norm_pre=False, gelu_approximate=True)


def read_image_tower(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The image tower's arrays of a big_vision `.npz`, keyed without the `[params/]img/` prefix.

  bfloat16 arrays (which NumPy stores as 2-byte void) are read back as bfloat16.

  Raises:
    CheckpointError: when the file is missing or holds no `img/` tower.
  """
  if not paths.path(path).exists():
    raise CheckpointError(f"SigLIP checkpoint {os.fspath(path)} does not exist")
  with paths.path(path).open("rb") as f, np.load(f, allow_pickle=False) as npz:
    keys = list(npz.keys())
    prefix = next((p for p in ("params/img/", "img/") if any(k.startswith(p) for k in keys)), None)
    if prefix is None:
      raise CheckpointError(
        f"{os.fspath(path)}: no image tower (keys under 'img/' or 'params/img/'); found "
        f"{sorted(keys)[:8]}...")
    tower = {k[len(prefix):]: npz[k] for k in keys if k.startswith(prefix)}
  return {k: v.view(jax.numpy.bfloat16) if v.dtype.kind == "V" and v.itemsize == 2 else v
          for k, v in tower.items()}


def _attention(prefix: str, size: specs.Size) -> dict[str, tuple[str, tuple[int, ...]]]:
  d, h = size.width, size.num_heads
  k = d // h
  out = {f"{prefix}/{name}/kernel": (f"{name}/kernel", (d, h, k))
         for name in ("query", "key", "value")}
  out.update({f"{prefix}/{name}/bias": (f"{name}/bias", (h, k))
              for name in ("query", "key", "value")})
  out[f"{prefix}/out/kernel"] = ("out/kernel", (h, k, d))
  out[f"{prefix}/out/bias"] = ("out/bias", (d,))
  return out


def _norm(prefix: str, ours: str, width: int) -> dict[str, tuple[str, tuple[int, ...]]]:
  return {f"{prefix}/{p}": (f"{ours}/{p}", (width,)) for p in ("scale", "bias")}


def _mlp(prefix: str, size: specs.Size) -> dict[str, tuple[str, tuple[int, ...]]]:
  d, m = size.width, size.mlp_dim
  return {f"{prefix}/Dense_0/kernel": ("fc1/kernel", (d, m)),
          f"{prefix}/Dense_0/bias": ("fc1/bias", (m,)),
          f"{prefix}/Dense_1/kernel": ("fc2/kernel", (m, d)),
          f"{prefix}/Dense_1/bias": ("fc2/bias", (d,))}


def _module(attn: str, norm1: str, norm2: str | None, mlp: str, size: specs.Size
            ) -> dict[str, tuple[str, tuple[int, ...]]]:
  """big_vision key -> (our path, shape) for an attention + norm(s) + MLP module; our names are
  those of `vit.Block` (norm1, attn, norm2, mlp) or, without norm1, of `vit.MapHead`."""
  table = {key: (f"attn/{ours}", shape) for key, (ours, shape) in _attention(attn, size).items()}
  table.update(_norm(norm1, "norm1" if norm2 else "norm", size.width))
  if norm2:
    table.update(_norm(norm2, "norm2", size.width))
  table.update({key: (f"mlp/{ours}", shape) for key, (ours, shape) in _mlp(mlp, size).items()})
  return table


def _block_table(size: specs.Size) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Keys inside one `encoderblock` -> (our path inside `vit.Block`, shape)."""
  return _module("MultiHeadDotProductAttention_0", "LayerNorm_0", "LayerNorm_1", "MlpBlock_0",
                 size)


def _blocks(tower: dict[str, np.ndarray], size: specs.Size, path: str
            ) -> list[dict[str, np.ndarray]]:
  """Per block, its arrays keyed as in `_block_table`; from either the unscanned
  (`encoderblock_<i>`) or the scanned (`encoderblock`, stacked on axis 0) layout. Consumes them
  from `tower`."""
  table, depth = _block_table(size), size.depth
  scanned = [k for k in tower if k.startswith("Transformer/encoderblock/")]
  unscanned = [k for k in tower if re.match(r"Transformer/encoderblock_\d+/", k)]
  if scanned and unscanned:
    raise CheckpointError(f"{path}: both scanned (img/Transformer/encoderblock/) and unscanned "
                          "(img/Transformer/encoderblock_<i>/) blocks")
  blocks = [{} for _ in range(depth)]
  for key, (_, shape) in table.items():
    if scanned:
      stacked = _take(tower, f"Transformer/encoderblock/{key}", (depth, *shape), path)
      for i in range(depth):
        blocks[i][key] = stacked[i]
    else:
      for i in range(depth):
        blocks[i][key] = _take(tower, f"Transformer/encoderblock_{i}/{key}", shape, path)
  return blocks


def _take(tower: dict[str, np.ndarray], key: str, shape: tuple[int, ...], path: str
          ) -> np.ndarray:
  """Removes `key` from `tower` and checks its shape."""
  if key not in tower:
    raise CheckpointError(f"{path}: missing key img/{key} (expected shape {shape})")
  value = tower.pop(key)
  if tuple(value.shape) != tuple(shape):
    raise CheckpointError(
      f"{path}: img/{key} has shape {tuple(value.shape)}, expected {tuple(shape)} for this "
      "variant")
  return value


def _set(tree: dict, dotted: str, value: np.ndarray) -> None:
  """Puts `value` at the "/"-joined path of a pure-dict state (digits: `nnx.List` indices)."""
  *parents, leaf = dotted.split("/")
  for p in parents:
    tree = tree.setdefault(int(p) if p.isdigit() else p, {})
  tree[leaf] = value


def load_big_vision_npz(path: str | os.PathLike, variant: str, scan: bool = False
                        ) -> tuple[config_lib.ModelConfig, nnx.State]:
  """Loads a big_vision SigLIP / SigLIP 2 image tower into `vit.UniViT`'s parameters.

  Every image-tower key is checked against the shape the variant implies and mapped onto a
  parameter; a missing, misshapen or unexpected key is an error naming it. The patch grid (so
  the input resolution) is read from `img/pos_embedding` `[1, gh * gw, D]` (a square grid).

  Args:
    path: the `.npz` (both towers, or the image tower alone under `img/`).
    variant: big_vision's name of the tower, e.g. "B/16", "L/16", "So400m/14".
    scan: as `ModelConfig.scan` (blocks stacked for `jax.lax.scan`).

  Returns:
    The `ModelConfig` (`siglip_model_config`) and the float32 parameter state of
    `vit.UniViT(cfg)`.

  Raises:
    CheckpointError: naming the key, for a missing, misshapen or unexpected array.
  """
  where = os.fspath(path)
  size, patch = decode_variant(variant)
  tower = read_image_tower(path)
  d = size.width
  pos = tower.get("pos_embedding")
  if pos is None or pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d or (
      math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]):
    raise CheckpointError(
      f"{where}: img/pos_embedding has shape {None if pos is None else pos.shape}, expected "
      f"[1, g * g, {d}] (a learned table over a square patch grid)")
  grid = (math.isqrt(pos.shape[1]),) * 2
  cfg = siglip_model_config(variant, grid, scan)

  ours = {}
  _set(ours, "patch_embed/kernel",
       _take(tower, "embedding/kernel", (patch, patch, 3, d), where).reshape(patch * patch * 3, d))
  _set(ours, "patch_embed/bias", _take(tower, "embedding/bias", (d,), where))
  _set(ours, "pos_embed", _take(tower, "pos_embedding", pos.shape, where))
  for key, (name, shape) in _norm("Transformer/encoder_norm", "norm_post", d).items():
    _set(ours, name, _take(tower, key, shape, where))
  _set(ours, "head/probe", _take(tower, "MAPHead_0/probe", (1, 1, d), where).reshape(1, d))
  head = _module("MAPHead_0/MultiHeadDotProductAttention_0", "MAPHead_0/LayerNorm_0", None,
                 "MAPHead_0/MlpBlock_0", size)
  for key, (name, shape) in head.items():
    _set(ours, f"head/{name}", _take(tower, key, shape, where))
  blocks = _blocks(tower, size, where)
  table = _block_table(size)
  for key, (name, _) in table.items():
    if scan:
      _set(ours, f"blocks/{name}", np.stack([b[key] for b in blocks]))
    else:
      for i, b in enumerate(blocks):
        _set(ours, f"blocks/{i}/{name}", b[key])
  if tower:
    raise CheckpointError(
      f"{where}: unexpected image-tower keys {sorted('img/' + k for k in tower)} (not part of a "
      f"SigLIP {variant} MAP tower)")

  _, state = vit.abstract_encoder(cfg)
  expected = nnx.to_pure_dict(state)
  if jax.tree.structure(expected) != jax.tree.structure(ours):
    raise CheckpointError(f"{where}: the mapped parameters do not cover vit.UniViT's for {cfg}")
  nnx.replace_by_pure_dict(state, jax.tree.map(
    lambda want, have: jax.numpy.asarray(have, want.dtype), expected, ours))
  return cfg, state
