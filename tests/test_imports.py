"""Imports run one way: a module imports only modules of lower layers (read with `ast`, unrun).

`LAYERS` is the order, lowest first; each layer lists modules or subpackages (a subpackage
stands for every module in it, its `__init__` included; `univit_jax` stands for its own
`__init__` only). Every `import` and `from ... import` counts, whether at the top of a file or
inside a function. The rule: a module may import a module of a lower layer, and one of its own
layer only when both lie in the same subpackage of univit_jax (`univit_jax.data.*` importing
`univit_jax.data.*`, at any depth); top-level modules of one layer do not import each other. A
module missing from `LAYERS` fails too, so that a new one is placed on purpose.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "univit_jax")
PACKAGE = "univit_jax"

LAYERS = (
  # Where files live (`epath`): every module that touches a file names it through here.
  ("paths", ("univit_jax.paths",)),
  # Leaf modules: they import nothing from univit_jax but `paths`.
  ("leaf", ("univit_jax.atomic", "univit_jax.provenance", "univit_jax.specs",
            "univit_jax.positions", "univit_jax.collectives")),
  ("config", ("univit_jax.config_lib",)),
  # The run's typed sections (`run_config.build`): every module above takes them, not the config.
  ("run_config", ("univit_jax.run_config",)),
  ("runtime", ("univit_jax.sharding", "univit_jax.checkpointing")),
  ("models", ("univit_jax.models",)),
  ("data", ("univit_jax.data",)),
  ("losses", ("univit_jax.losses", "univit_jax.optim")),
  ("encoder", ("univit_jax.encoder",)),
  # Spherical k-means, a subpackage below the clustering stage that drives it.
  ("kmeans", ("univit_jax.clustering.kmeans",)),
  ("clustering", ("univit_jax.clustering",)),
  ("train", ("univit_jax.train",)),
  ("evaluation", ("univit_jax.evaluation",)),
  ("stages", ("univit_jax.embed", "univit_jax.summary")),
  ("preflight", ("univit_jax.preflight",)),
  ("rounds", ("univit_jax.rounds",)),
  # The entry point and the package's lazy public API (`univit_jax.load_encoder`).
  ("main", ("univit_jax.main", "univit_jax")),
)


def _modules() -> dict[str, str]:
  """Module name -> file of every module of the package."""
  found = {}
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, os.path.dirname(ROOT))[:-len(".py")].split(os.sep)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return found


def _layer(module: str) -> int | None:
  """Index in LAYERS of the longest entry that is `module` or a subpackage it lies in."""
  matches = [(len(entry), index) for index, (_, entries) in enumerate(LAYERS) for entry in entries
             if module == entry or (entry != PACKAGE and module.startswith(entry + "."))]
  return max(matches)[1] if matches else None


def _package(module: str, modules: dict[str, str]) -> str:
  """The package a module lies in (a package's `__init__` lies in the package itself)."""
  is_package = modules.get(module, "").endswith("__init__.py")
  return module if is_package else module.rpartition(".")[0]


def _subpackage(module: str, modules: dict[str, str]) -> str | None:
  """`univit_jax.<pkg>` for a module in (or of) a subpackage; None for a top-level module."""
  top = ".".join(module.split(".")[:2])
  return top if modules.get(top, "").endswith("__init__.py") else None


def imports(source: str, module: str, modules: dict[str, str]) -> set[str]:
  """The univit_jax modules that `source` (the text of `module`) imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = _package(module, modules).split(".")
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
  return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def violations(modules: dict[str, str]) -> list[str]:
  """`importer (layer) -> imported (layer)` for every import against the rule."""
  bad = []
  for module, path in sorted(modules.items()):
    with open(path) as f:
      targets = imports(f.read(), module, modules)
    here, subpackage = _layer(module), _subpackage(module, modules)
    for target in sorted(targets - {module}):
      there = _layer(target)
      if here is None or there is None:
        continue  # reported by test_every_module_has_a_layer
      same_subpackage = subpackage is not None and subpackage == _subpackage(target, modules)
      if there > here or (there == here and not same_subpackage):
        bad.append(f"{module} ({LAYERS[here][0]}) -> {target} ({LAYERS[there][0]})")
  return bad


def test_every_module_has_a_layer():
  missing = sorted(m for m in _modules() if _layer(m) is None)
  assert not missing, f"modules not in tests/test_imports.py LAYERS: {missing}"


def test_imports_run_from_higher_layers_to_lower_ones():
  bad = violations(_modules())
  assert not bad, "imports against the layer order (tests/test_imports.py):\n" + "\n".join(bad)


@pytest.mark.parametrize("source,expected", [
  ("def f():\n  from univit_jax.data import streams\n", {"univit_jax.data.streams"}),
  ("import univit_jax.models.rope as r\n", {"univit_jax.models.rope"}),
  ("from univit_jax.train.loop import run_train\n", {"univit_jax.train.loop"}),
  ("from . import heads\nfrom ..data import pipeline\n",
   {"univit_jax.models.heads", "univit_jax.data.pipeline"}),
  ("import numpy\nfrom jax import numpy as jnp\n", set()),
])
def test_imports_are_found_at_any_depth_and_resolved_to_modules(source, expected):
  assert imports(source, "univit_jax.models.vit", _modules()) == expected


def test_a_lower_layer_importing_a_higher_one_is_named(tmp_path):
  (tmp_path / "config_lib.py").write_text(
    "def f():\n  from univit_jax.data import sources\n")
  (tmp_path / "sources.py").write_text("from univit_jax import config_lib\n")
  modules = {"univit_jax.config_lib": str(tmp_path / "config_lib.py"),
             "univit_jax.data.sources": str(tmp_path / "sources.py")}
  assert violations(modules) == [
    "univit_jax.config_lib (config) -> univit_jax.data.sources (data)"]
  assert _layer("univit_jax.new_module") is None  # unplaced: test_every_module_has_a_layer


def test_one_layer_imports_itself_only_within_a_subpackage(tmp_path):
  files = {
    "univit_jax.evaluation": ("__init__.py", ""),
    "univit_jax.evaluation.common": ("common.py", ""),
    "univit_jax.evaluation.probes.linear": ("linear.py",
                                            "from univit_jax.evaluation import common\n"),
    "univit_jax.embed": ("embed.py", ""),
    "univit_jax.summary": ("summary.py", "from univit_jax import embed\n"),
  }
  for file, text in files.values():
    (tmp_path / file).write_text(text)
  modules = {name: str(tmp_path / file) for name, (file, _) in files.items()}
  assert violations(modules) == ["univit_jax.summary (stages) -> univit_jax.embed (stages)"]
