"""Configs load, parse their arguments, and bad values fail naming the field."""

import jax
import pytest

from helpers import demo_config, load_config, run_main
from univit_jax import config_lib, run_config, summary

CONFIGS = ("demo", "vit_s", "vit_b", "vit_l")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_configs_validate(name, arg):
  config = load_config(name, arg)
  # The demo is sized for one CPU device: its long-clip buckets hold 2-4 clips.
  model = run_config.build(config, num_devices=1 if name == "demo" else 8).model
  assert model.width % model.num_heads == 0


def test_demo_gives_images_four_times_the_clips_token_budget():
  run = run_config.build(load_config("demo"), num_devices=1)
  assert run.model.patch_size == 4
  assert run.data.batch_sizes() == {1: 128, 2: 16, 4: 8, 8: 4, 16: 2}


def test_vit_l_is_the_paper_recipe():
  c = load_config("vit_l")
  assert (c.model.patch_size, c.model.width, c.model.depth, c.model.num_heads) == (14, 1024, 24, 16)
  assert tuple(c.data.frames) == (1, 2, 4, 8, 16)
  assert (c.optim.lr, c.optim.weight_decay) == (1e-3, 0.2)
  assert run_config.build(c, num_devices=64).data.batch_sizes()[1] == 16384


def test_auto_compute_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
  assert [config_lib.resolve_compute_dtype("auto", platform) for platform in ("cpu", "gpu", "tpu")
          ] == ["float32", "bfloat16", "bfloat16"]
  assert config_lib.resolve_compute_dtype("float16", "tpu") == "float16"
  assert config_lib.resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"


@pytest.mark.parametrize("name", ("vit_s", "vit_b", "vit_l"))
def test_pretraining_configs_compute_in_this_platforms_dtype(name):
  """The pretraining recipe's `model.dtype="auto"` reaches the model resolved (never "auto"), and
  the summary, which sizes the step for accelerators, resolves it as on one."""
  config = load_config(name)
  assert config.model.dtype == "auto"
  run = run_config.build(config, num_devices=8)
  assert run.model.dtype == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  assert summary.for_accelerators(run).model.dtype == "bfloat16"
  demo = run_config.build(demo_config(), num_devices=1)
  assert summary.for_accelerators(demo).model.dtype == demo.model.dtype == "float32"


def test_parse_arg():
  arg = config_lib.parse_arg("variant=B/16,runlocal,steps=7", variant="L/14", runlocal=False,
                             steps=1)
  assert (arg.variant, arg.runlocal, arg.steps) == ("B/16", True, 7)
  with pytest.raises(config_lib.ConfigError, match="'colour' is unknown"):
    config_lib.parse_arg("colour=red", variant="L/14")
  with pytest.raises(config_lib.ConfigError, match="steps='many': expected a int"):
    config_lib.parse_arg("steps=many", steps=1)
  with pytest.raises(config_lib.ConfigError, match="model.variant='X/14'"):
    load_config("vit_l", "variant=X/14")


@pytest.mark.parametrize("field,value,message", [
  ("model.num_heads", 3, "model.width=64 is not divisible by model.num_heads=3"),
  ("model.num_heads", 4, "head_dim=16 gives 8 rotary pairs, not divisible by 16"),
  ("model.rope.mode", "spiral", "model.rope.mode='spiral'"),
  ("model.remat", "sometimes", "model.remat='sometimes'"),
  ("model.attention", "flash", "model.attention='flash'"),
  ("model.attention", "cudnn", "model.attention='cudnn' needs model.dtype bfloat16"),
  ("model.dtype", "int8", "model.dtype='int8'"),
  ("model.depth", 0, "model.depth=0 must be positive"),
  ("mesh.shape", (3, 1, 1), r"mesh.shape=\(3, 1, 1\) .* cannot be laid over 8 devices"),
  ("mesh.shape", (-1, -1, 1), "at most one -1"),
  ("data.image_size", 30, "data.image_size=30 is not divisible by model.patch_size=8"),
  ("data.bucket_weights", (1, 1), "needs one weight per bucket"),
  ("data.tokens_per_batch", 16 * 16 * 2, "must be a positive multiple of the 8 batch shards"),
  ("data.bucket_tokens", (2048, 2048), r"needs one positive token budget per bucket"),
  ("data.bucket_tokens", (2048, 0, 2048, 2048, 2048), r"needs one positive token budget"),
  ("data.bucket_tokens", (2048, 2048, 2048, 2048, 16 * 16 * 2),
   r"data.bucket_tokens\[4\]=512 gives a global batch of 2 for the 16-frame bucket"),
])
def test_bad_values_name_the_field(field, value, message):
  config = demo_config()
  section, key = field.rsplit(".", 1)
  target = config
  for part in section.split("."):
    target = target[part]
  target[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    run_config.build(config, num_devices=8)


@pytest.mark.parametrize("args,message", [
  (["--config.model.widht=3"], "widht"),
  (["--config.model.width=abc"], "--config.model.width=abc"),
  (["--config.model.num_heads=3"], "model.num_heads=3"),
  (["--config.mesh.shape=(3,1,1)"], "mesh.shape=(3, 1, 1)"),
])
@pytest.mark.slow
def test_command_line_rejects_bad_configs_before_compute(args, message, tmp_path):
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", *args)
  assert result.returncode == 2, result.stderr
  assert "Config error" in result.stderr and message in result.stderr
  assert not (tmp_path / "summary.json").exists()
