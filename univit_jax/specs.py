"""The encoder's vocabulary, shared by the config and the code: sizes, bank names, U-RoPE's layout.

`config_lib` checks a config against these before any compute, and the models, losses,
clustering and training build from them; this module imports nothing from univit_jax, so every
layer may import it (tests/test_imports.py).

Sizes: the width / depth / heads of S, B, L and H follow the ViT family used by MLCD and
OneVision-Encoder (head dim 64 everywhere). "mu" is a micro size for CPU demos and tests.

Banks: one object bank ("object": image regions) and one event bank per temporal granularity g
("event_<g>": clips cut into g ordered segments); `models/heads.py` holds their class centres.

U-RoPE (`models/rope.py`): a head of dimension D has D / 2 rotary pairs, shared out over the axes
(t, h, w) in the ratio `split`; `ROPE_ALLOCATIONS` are the ways of laying them out.
"""

import dataclasses
from collections.abc import Sequence


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


OBJECT_BANK = "object"


def event_bank_name(granularity: int) -> str:
  """Name of the event bank of clips cut into `granularity` ordered segments, e.g. "event_4"."""
  return f"event_{granularity}"


def event_granularity(name: str) -> int | None:
  """The granularity g of an event bank name "event_<g>", None for any other bank."""
  prefix, _, suffix = name.partition("_")
  return int(suffix) if prefix == "event" and suffix.isdigit() else None


def bank_names(granularities: Sequence[int]) -> tuple[str, ...]:
  """The object bank and one event bank per granularity: ("object", "event_1", ...)."""
  return (OBJECT_BANK,) + tuple(event_bank_name(g) for g in granularities)


# U-RoPE's allocations of rotary pairs and frequencies to (t, h, w): see models/rope.py.
ROPE_ALLOCATIONS = ("temporal_low", "per_axis", "chunked", "interleaved")


def rope_axis_pairs(head_dim: int, split: tuple[int, int, int] = (4, 6, 6)
                    ) -> tuple[int, int, int]:
  """Number of rotary pairs given to (t, h, w).

  Raises:
    ValueError: if head_dim is odd or its pair count is not divisible by sum(split).
  """
  if head_dim % 2:
    raise ValueError(f"head_dim={head_dim} must be even for rotary pairs")
  pairs, units = head_dim // 2, sum(split)
  if pairs % units:
    raise ValueError(
      f"head_dim={head_dim} gives {pairs} rotary pairs, not divisible by "
      f"{units} = sum(split={tuple(split)}); head_dim must be a multiple of {2 * units}")
  unit = pairs // units
  return tuple(s * unit for s in split)
