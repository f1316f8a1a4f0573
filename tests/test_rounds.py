"""`--mode=pipeline`: how round r is configured from round r - 1. The two-round pipeline itself
runs end to end in tests/test_storage.py (in a `gs://` workdir on the fake object store)."""

from helpers import demo_config, typed
from univit_jax import rounds


def test_later_rounds_learn_from_and_start_at_the_previous_export(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  config = demo_config()
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
