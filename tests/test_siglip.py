"""SigLIP image towers from big_vision `.npz` files: key mapping, forward pass, errors.

No real checkpoint is reachable here, so the tests write a random one in big_vision's layout: the
"/"-joined flax module paths of `big_vision/models/vit.py` (`embedding` conv, `pos_embedding`,
`Transformer/encoderblock_<i>` or the scanned `Transformer/encoderblock`, `encoder_norm`,
`MAPHead_0`) under `img/` of a two-tower file that also holds a text tower and `t`, `b`.
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from univit_jax import specs
from univit_jax.models import siglip, vit

WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE = 32, 2, 2, 64, 8, 32
GRID = IMAGE // PATCH
VARIANT = f"tiny/{PATCH}"


@pytest.fixture(autouse=True)
def tiny_size(monkeypatch):
  monkeypatch.setitem(siglip.SIZES, "tiny", specs.Size(WIDTH, DEPTH, HEADS, MLP))


def _flat(prefix: str, tree: dict) -> dict:
  return {f"{prefix}/{k}": v for k, v in tree.items()}


def big_vision_checkpoint(seed: int = 0, scanned: bool = False, prefix: str = "") -> dict:
  """A random two-tower checkpoint as big_vision flattens it, and its unscanned image arrays."""
  rng = np.random.default_rng(seed)
  k = WIDTH // HEADS

  def w(*shape, scale=0.3):
    return (rng.normal(size=shape) * scale).astype(np.float32)

  def attention():
    out = {f"{n}/kernel": w(WIDTH, HEADS, k) for n in ("query", "key", "value")}
    out.update({f"{n}/bias": w(HEADS, k, scale=0.1) for n in ("query", "key", "value")})
    return {**out, "out/kernel": w(HEADS, k, WIDTH), "out/bias": w(WIDTH, scale=0.1)}

  def layer_norm():
    return {"scale": 1.0 + w(WIDTH, scale=0.1), "bias": w(WIDTH, scale=0.1)}

  def mlp():
    return {"Dense_0/kernel": w(WIDTH, MLP), "Dense_0/bias": w(MLP, scale=0.1),
            "Dense_1/kernel": w(MLP, WIDTH), "Dense_1/bias": w(WIDTH, scale=0.1)}

  blocks = [{**_flat("LayerNorm_0", layer_norm()),
             **_flat("MultiHeadDotProductAttention_0", attention()),
             **_flat("LayerNorm_1", layer_norm()), **_flat("MlpBlock_0", mlp())}
            for _ in range(DEPTH)]
  img = {"embedding/kernel": w(PATCH, PATCH, 3, WIDTH, scale=0.05),
         "embedding/bias": w(WIDTH, scale=0.1), "pos_embedding": w(1, GRID * GRID, WIDTH),
         **_flat("Transformer/encoder_norm", layer_norm()),
         "MAPHead_0/probe": w(1, 1, WIDTH),
         **_flat("MAPHead_0/MultiHeadDotProductAttention_0", attention()),
         **_flat("MAPHead_0/LayerNorm_0", layer_norm()), **_flat("MAPHead_0/MlpBlock_0", mlp())}
  unscanned = dict(img)
  for i, block in enumerate(blocks):
    unscanned.update(_flat(f"Transformer/encoderblock_{i}", block))
  if scanned:
    img.update(_flat("Transformer/encoderblock",
                     {key: np.stack([b[key] for b in blocks]) for key in blocks[0]}))
  else:
    img = unscanned
  ckpt = _flat(f"{prefix}img", img)
  ckpt.update({f"{prefix}txt/Embed_0/embedding": w(100, WIDTH), f"{prefix}txt/head/kernel":
               w(WIDTH, WIDTH), f"{prefix}t": np.array([2.3], np.float32),
               f"{prefix}b": np.array([-10.0], np.float32)})
  return ckpt, unscanned


def write(path, ckpt: dict) -> str:
  np.savez(path, **ckpt)
  return str(path)


# An independent reference: big_vision's image tower in plain jax.numpy.


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _attention(queries, tokens, p):
  q = jnp.einsum("bqd,dhk->bqhk", queries, p["query/kernel"]) + p["query/bias"]
  k = jnp.einsum("bnd,dhk->bnhk", tokens, p["key/kernel"]) + p["key/bias"]
  v = jnp.einsum("bnd,dhk->bnhk", tokens, p["value/kernel"]) + p["value/bias"]
  weights = jax.nn.softmax(jnp.einsum("bqhk,bnhk->bhqn", q, k) / math.sqrt(q.shape[-1]), -1)
  out = jnp.einsum("bhqn,bnhk->bqhk", weights, v)
  return jnp.einsum("bqhk,hkd->bqd", out, p["out/kernel"]) + p["out/bias"]


def _mlp(x, p):
  h = x @ p["Dense_0/kernel"] + p["Dense_0/bias"]
  h = 0.5 * h * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
  return h @ p["Dense_1/kernel"] + p["Dense_1/bias"]


def _sub(params: dict, prefix: str) -> dict:
  return {k[len(prefix) + 1:]: v for k, v in params.items() if k.startswith(prefix + "/")}


def reference_tower(params: dict, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(MAP embedding [B, D], encoder_norm tokens [B, N, D]) of images [B, H, W, 3] in [-1, 1]."""
  x = jax.lax.conv_general_dilated(
    images, params["embedding/kernel"], (PATCH, PATCH), "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["embedding/bias"]
  x = x.reshape(x.shape[0], -1, WIDTH) + params["pos_embedding"]
  for i in range(DEPTH):
    block = _sub(params, f"Transformer/encoderblock_{i}")
    y = _layer_norm(x, _sub(block, "LayerNorm_0"))
    x = x + _attention(y, y, _sub(block, "MultiHeadDotProductAttention_0"))
    x = x + _mlp(_layer_norm(x, _sub(block, "LayerNorm_1")), _sub(block, "MlpBlock_0"))
  tokens = _layer_norm(x, _sub(params, "Transformer/encoder_norm"))
  head = _sub(params, "MAPHead_0")
  probe = jnp.broadcast_to(head["probe"], (x.shape[0], 1, WIDTH))
  pooled = _attention(probe, tokens, _sub(head, "MultiHeadDotProductAttention_0"))
  pooled = pooled + _mlp(_layer_norm(pooled, _sub(head, "LayerNorm_0")), _sub(head, "MlpBlock_0"))
  return np.asarray(pooled[:, 0]), np.asarray(tokens)


def images(b=3, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (b, IMAGE, IMAGE, 3)).astype(np.float32)


@pytest.mark.parametrize("scanned_file,scan_model,prefix", [
  (False, False, ""), (True, False, "params/"), (False, True, ""), (True, True, "")])
@pytest.mark.slow
def test_tower_maps_every_key_and_matches_a_plain_reference(tmp_path, scanned_file, scan_model,
                                                            prefix):
  ckpt, reference_params = big_vision_checkpoint(scanned=scanned_file, prefix=prefix)
  cfg, state = siglip.load_big_vision_npz(write(tmp_path / "ckpt.npz", ckpt), VARIANT,
                                          scan=scan_model)
  assert cfg.pos_grid == (GRID, GRID) and cfg.width == WIDTH and cfg.scan == scan_model
  # Complete: every parameter is a concrete array, and the image tower's values are used
  # exactly once (the loader also refuses leftover keys, see below).
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  img = {k: v for k, v in ckpt.items() if k.startswith(f"{prefix}img/")}
  assert sum(x.size for x in leaves) == sum(v.size for v in img.values())
  assert sorted(np.concatenate([np.ravel(x) for x in leaves]).tolist()) == sorted(
    np.concatenate([v.ravel() for v in img.values()]).tolist())
  graphdef, _ = vit.abstract_encoder(cfg)
  x = images()
  with jax.default_matmul_precision("highest"):  # float32 products on any backend
    embedding, aux = nnx.merge(graphdef, state)(x)
    expected, tokens = reference_tower(reference_params, x)
  np.testing.assert_allclose(aux["tokens"], tokens, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(embedding, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_checkpoint_loads_as_its_values(tmp_path):
  ckpt, _ = big_vision_checkpoint()
  as_bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in ckpt.items()}
  path = write(tmp_path / "bf16.npz", as_bf16)
  assert np.load(path)["img/pos_embedding"].dtype.kind == "V"  # how NumPy stores bfloat16
  _, state = siglip.load_big_vision_npz(path, VARIANT)
  _, reference = siglip.load_big_vision_npz(write(tmp_path / "f32.npz", {
    k: v.astype(np.float32) for k, v in as_bf16.items()}), VARIANT)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("edit,message", [
  (lambda c: c.update({"img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel":
                       np.zeros((WIDTH, MLP + 1), np.float32)}),
   r"img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel has shape \(32, 65\), "
   r"expected \(32, 64\)"),
  (lambda c: c.pop("img/MAPHead_0/LayerNorm_0/scale"),
   "missing key img/MAPHead_0/LayerNorm_0/scale"),
  (lambda c: c.update({"img/head/kernel": np.zeros((WIDTH, 8), np.float32)}),
   r"unexpected image-tower keys \['img/head/kernel'\]"),
  (lambda c: c.update({"img/pos_embedding": np.zeros((1, 15, WIDTH), np.float32)}),
   r"img/pos_embedding has shape \(1, 15, 32\)")])
def test_a_checkpoint_that_does_not_fit_names_the_key(tmp_path, edit, message):
  ckpt, _ = big_vision_checkpoint()
  edit(ckpt)
  with pytest.raises(siglip.CheckpointError, match=message):
    siglip.load_big_vision_npz(write(tmp_path / "ckpt.npz", ckpt), VARIANT)


def test_variant_and_file_errors(tmp_path):
  with pytest.raises(siglip.CheckpointError, match="does not exist"):
    siglip.load_big_vision_npz(tmp_path / "none.npz", "B/16")
  ckpt, _ = big_vision_checkpoint()
  path = write(tmp_path / "ckpt.npz", ckpt)
  with pytest.raises(siglip.config_lib.ConfigError, match="extract.siglip_variant='X/16'"):
    siglip.load_big_vision_npz(path, "X/16")
  with pytest.raises(siglip.CheckpointError, match=r"embedding/kernel has shape \(8, 8, 3, 32\)"):
    siglip.load_big_vision_npz(path, f"tiny/{PATCH * 2}")  # the wrong patch size


def test_frames_must_have_the_position_tables_grid(tmp_path):
  ckpt, _ = big_vision_checkpoint()
  cfg, state = siglip.load_big_vision_npz(write(tmp_path / "ckpt.npz", ckpt), VARIANT)
  graphdef, _ = vit.abstract_encoder(cfg)
  with pytest.raises(ValueError, match="2x2 patch grid; the position table is for 4x4 "
                                       r"\(32x32 pixels\)"):
    nnx.merge(graphdef, state)(np.zeros((1, 16, 16, 3), np.float32))
