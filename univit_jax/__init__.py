"""UniViT in JAX: a cluster-driven self-supervised encoder for images and videos.

`univit_jax.load_encoder(path)` loads an exported encoder as a frozen feature extractor
(`univit_jax/encoder.py`); the stages run from `python -m univit_jax.main`.
"""


def __getattr__(name: str):
  # Lazy, so that importing a submodule (e.g. in a grain worker) does not load Orbax and Flax.
  if name in ("load_encoder", "Encoder"):
    from univit_jax import encoder  # pylint: disable=import-outside-toplevel
    return getattr(encoder, name)
  raise AttributeError(f"module 'univit_jax' has no attribute {name!r}")
