"""`--mode=summary` for every config: parameter counts, FLOPs, shardings, memory, compilation."""

import json

import jax
import pytest

from helpers import load_config, run_main
from univit_jax import config_lib, summary
from univit_jax.models import vit


@pytest.mark.slow
def test_demo_summary_from_the_command_line(tmp_path):
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--mode=summary")
  assert result.returncode == 0, result.stderr
  assert "UniViT mu/8: 164,480 parameters" in result.stdout
  assert "compiled 16-frame forward" in result.stdout
  written = json.loads((tmp_path / "summary.json").read_text())
  assert written["params_total"] == 164_480
  assert set(written["buckets"]) == {"1", "2", "4", "8", "16"}
  assert all("temp_bytes" in b for b in written["buckets"].values())


@pytest.mark.parametrize("name,arg,backbone", [
  # Patch embedding + time embedding (32 x width) + depth x (attention + MLP + 2 norms) + 2
  # norms; no CLS, no spatial position table.
  ("vit_s", "runlocal", 21_602_304),
  ("vit_b", "runlocal", 85_671_936),
  ("vit_l", None, 302_948_352),
])
@pytest.mark.slow
def test_summary_of_each_size(name, arg, backbone, tmp_path):
  config = load_config(name, arg)
  config.summary.compile = name != "vit_l"  # vit_l: abstract only, as on a laptop.
  result = summary.run(config, str(tmp_path))
  assert result["params_backbone"] == backbone
  assert result["mesh"]["fsdp" if name == "vit_l" else "data"] == 8
  if name == "vit_l":
    assert abs(result["params_backbone"] / 1e6 - 304) < 2  # ViT-L/14: ~304M
    # FSDP over 8 devices: per-device parameter bytes are an eighth of the f32 total.
    assert result["device_bytes"]["params"] < result["params_total"] * 4 / 8 * 1.01
    assert result["buckets"][1]["gflops_per_sample"] == pytest.approx(162.5, rel=0.01)
  else:
    assert all(b["compile_seconds"] >= 0 for b in result["buckets"].values())
  assert all(r["spec"].startswith("P(") for r in result["parameters"])


def test_analytic_flops_match_xla():
  """The FLOPs formula agrees with XLA's cost analysis of an unscanned single-device forward.

  XLA also counts element-wise work (norms, GELU, softmax, RoPE), a visible share at width 64, so
  its count is somewhat higher; a missing matmul term (a layer, attention) would be far off.
  """
  config = load_config("demo")
  config.mesh.shape = (1, 1, 1)
  cfg = config_lib.model_config(config)
  graphdef, abstract = vit.abstract_encoder(cfg)
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "model"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  from univit_jax import sharding
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding_rules)
  for t in (1, 16):
    got = summary.compile_bucket(graphdef, shardings, abstract, mesh, config, cfg, t)
    per_sample = got["xla_flops_per_device"] / got["global_batch"]
    analytic = summary.forward_flops(cfg, t, 32)
    assert analytic <= per_sample <= 1.25 * analytic
