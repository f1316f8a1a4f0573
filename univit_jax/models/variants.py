"""One table of encoder sizes, decoded from names such as "L/14".

The width / depth / heads of S, B, L and H follow the ViT family used by MLCD and
OneVision-Encoder (head dim 64 everywhere). "mu" is a micro size for CPU demos and tests.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Size:
  width: int
  depth: int
  num_heads: int
  mlp_dim: int


SIZES: dict[str, Size] = {
  "mu": Size(width=64, depth=2, num_heads=2, mlp_dim=256),
  "Ti": Size(width=192, depth=12, num_heads=3, mlp_dim=768),
  "S": Size(width=384, depth=12, num_heads=6, mlp_dim=1536),
  "B": Size(width=768, depth=12, num_heads=12, mlp_dim=3072),
  "L": Size(width=1024, depth=24, num_heads=16, mlp_dim=4096),
  "H": Size(width=1280, depth=32, num_heads=20, mlp_dim=5120),
}


def decode_variant(variant: str) -> dict[str, int]:
  """Returns the size fields and patch size of a variant such as "B/16".

  Raises:
    ValueError: naming the variant when the size or patch is unknown or malformed.
  """
  name, sep, patch = variant.partition("/")
  if name not in SIZES or not sep or not patch.isdigit() or int(patch) <= 0:
    raise ValueError(
      f"model.variant={variant!r}: expected '<size>/<patch>' with size in "
      f"{sorted(SIZES)} and a positive integer patch, e.g. 'L/14'")
  return dict(dataclasses.asdict(SIZES[name]), patch_size=int(patch))
