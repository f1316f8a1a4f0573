"""`--mode=pipeline`: two rounds of extract -> cluster -> train -> export, in a subprocess."""

import json

import numpy as np
import pytest

from helpers import TINY_DEMO_PIPELINE, load_config, run_main, typed
from univit_jax import rounds
from univit_jax.clustering import store

SMALL = TINY_DEMO_PIPELINE


@pytest.mark.slow
def test_two_round_pipeline(tmp_path):
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", *SMALL, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "UniViT pipeline: 2 round(s)" in result.stdout
  summary = json.loads((tmp_path / "pipeline.json").read_text())
  assert summary["export"] == str(tmp_path / "round_2" / "export")
  # Round 2 extracted with round 1's exported encoder: its object features have the encoder's
  # width (64), round 1's the pixels teacher's (16).
  r1 = store.BankReader(str(tmp_path / "round_1"), "object")
  r2 = store.BankReader(str(tmp_path / "round_2"), "object")
  assert r1.dim == 16 and r2.dim == 64
  assert r2.teacher.startswith("univit:") and "round_1/export" in r2.teacher
  for r in (1, 2):
    folder = tmp_path / f"round_{r}"
    assert (folder / "export" / "config.json").exists()
    assert np.load(folder / "clusters" / "event_2" / "labels.npy").shape == (32, 2)
    assert (folder / "training.png").exists()
  # Both rounds compiled into the run's shared cache ($JAX_COMPILATION_CACHE_DIR, conftest.py),
  # not the workdir's (test_later_rounds_learn_from_and_start_at_the_previous_export).
  assert not any((folder / "jax_cache").exists()
                 for folder in (tmp_path, tmp_path / "round_1", tmp_path / "round_2"))
  # Rerunning finds every round complete and does no work.
  again = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", *SMALL, timeout=300)
  assert again.returncode == 0 and "round 2: complete" in again.stdout
  # Rerunning with another data source is refused, finished rounds included, naming the change
  # (issue 13: the ids would shift, and the old labels land on other records).
  shifted = [a.replace("events.num_examples=16", "events.num_examples=17") for a in SMALL]
  refused = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", *shifted, timeout=300)
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert ("Feature store error: the features in " f"{tmp_path}/round_1/features/"
          in refused.stderr)
  assert "data.sources.events.records was 16, now 17" in refused.stderr
  assert len(refused.stderr.strip().splitlines()) == 1


def test_later_rounds_learn_from_and_start_at_the_previous_export(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  config = load_config("demo")
  first, second = (rounds.round_config(typed(config), str(tmp_path), r) for r in (1, 2))
  previous = str(tmp_path / "round_1" / "export")
  assert first.extract.teacher == "pixels" and first.train.init_encoder == ""
  assert second.extract.teacher == previous and second.train.init_encoder == previous
  assert first.train.compilation_cache_dir == second.train.compilation_cache_dir == str(
    tmp_path / "jax_cache")
  # The round's export records the round's config (config.json), as given plus these changes.
  assert second.record["extract"]["teacher"] == second.record["train"]["init_encoder"] == previous
  assert second.record["train"]["compilation_cache_dir"] == str(tmp_path / "jax_cache")
  with config.unlocked():
    config.train.warm_start = False
  assert rounds.round_config(typed(config), str(tmp_path), 2).train.init_encoder == ""
  # The launch scripts' shared cache ($JAX_COMPILATION_CACHE_DIR) wins over the workdir's; the
  # config's own setting wins over both.
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/shared/jax_cache")
  assert rounds.round_config(typed(config), str(tmp_path), 1).train.compilation_cache_dir == (
    "/shared/jax_cache")
  with config.unlocked():
    config.train.compilation_cache_dir = "/mine"
  assert rounds.round_config(typed(config), str(tmp_path), 2).train.compilation_cache_dir == "/mine"
