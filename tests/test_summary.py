"""`--mode=summary` for every config: parameter counts, FLOPs, shardings, memory, compilation;
the train step it compiles (the training loop's), and ViT-L/14 at scale on 64 simulated devices."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures
from helpers import demo_config, load_config, run_main, typed
from univit_jax import config_lib, sharding, summary
from univit_jax.models import vit
from univit_jax.train import step as step_lib


@pytest.mark.slow
def test_demo_summary_from_the_command_line(tmp_path):
  result = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", "--mode=summary",
                    "--config.summary.step=forward")
  assert result.returncode == 0, result.stderr
  assert "UniViT mu/4: 155,264 parameters" in result.stdout
  assert "compiled 16-frame forward" in result.stdout
  written = json.loads((tmp_path / "summary.json").read_text())
  assert written["params_total"] == 155_264
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
  config.summary.step = "forward"
  result = summary.run(typed(config), str(tmp_path))
  assert result["params_backbone"] == backbone
  assert result["mesh"]["fsdp" if name == "vit_l" else "data"] == 8
  if name == "vit_l":
    assert abs(result["params_backbone"] / 1e6 - 304) < 2  # ViT-L/14: ~304M
    # FSDP (configs/vit_l.py): each of the 8 devices holds about an eighth of the f32
    # parameters (the few whose dimensions 8 does not divide are replicated).
    params = result["params_total"] * 4
    assert params / 8 < result["device_bytes"]["params"] < params / 7
    assert result["buckets"][1]["gflops_per_sample"] == pytest.approx(162.5, rel=0.01)
  else:
    assert all(b["compile_seconds"] >= 0 for b in result["buckets"].values())
  assert all(r["spec"].startswith("P(") for r in result["parameters"])


def test_analytic_flops_match_xla():
  """The FLOPs formula agrees with XLA's cost analysis of an unscanned single-device forward.

  XLA also counts element-wise work (norms, GELU, softmax, RoPE), a visible share at width 64, so
  its count is somewhat higher; a missing matmul term (a layer, attention) would be far off.
  """
  config = demo_config()
  config.mesh.shape = (1, 1, 1)
  run = typed(config, 1)
  cfg = run.model
  graphdef, abstract = vit.abstract_encoder(cfg)
  mesh = sharding.make_mesh(run.mesh, jax.devices()[:1])
  shardings = sharding.tree_shardings(abstract, mesh, run.mesh.rules)
  for t in (1, 16):
    got = summary.compile_bucket(graphdef, shardings, abstract, mesh, run, t)
    per_sample = got["xla_flops_per_device"] / got["global_batch"]
    analytic = summary.forward_flops(cfg, t, 32)
    assert analytic <= per_sample <= 1.25 * analytic


@pytest.mark.parametrize("field,value,message", [
  ("step", "backward", "summary.step='backward'"),
  ("devices", -1, "summary.devices=-1"),
])
def test_bad_summary_options_are_refused_naming_the_field(field, value, message):
  config = demo_config()
  config.summary[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    typed(config)


def test_a_trained_bank_without_a_class_count_is_refused():
  config = demo_config()
  config.cluster.num_clusters = dict(object=64)
  with pytest.raises(config_lib.ConfigError,
                     match="cluster.num_clusters gives no class count .*'event_1'"):
    summary.run(typed(config), None)


def test_bank_lines_say_when_the_class_shards_leave_a_bank_replicated(capsys):
  """A class count the mesh's class shards (fsdp x model = 8 here) do not divide leaves the bank
  whole on every device: its row and its printed line say so, with the nearest split counts."""
  config = demo_config()
  config.mesh.shape = (1, 8, 1)
  config.summary.compile = False
  config.cluster.num_clusters = dict(object=64, event_1=36, event_2=32, event_4=32, event_8=32)
  banks = {b["name"]: b for b in summary.run(typed(config), None)["banks"]}
  assert banks["object"]["spec"] == "P(('fsdp', 'model'), None)"
  assert banks["object"]["replicated"] is None
  assert banks["event_1"]["spec"] == "P(None, None)"
  assert banks["event_1"]["replicated"] == (
    "bank 'event_1': 36 classes are not a multiple of the mesh's 8 class shards, so every "
    "device holds the whole bank, its gradient and Adam moments; 32 or 40 classes would be "
    "split 8 ways")
  assert f"  replicated: {banks['event_1']['replicated']}" in capsys.readouterr().out


def _sharded_step_inputs():
  """configs/demo.py at one block and 16 px on a 2x2x2 mesh of the 8 test devices:
  `train_fixtures.bucket_step_inputs` of its 1-frame bucket."""
  config = demo_config()
  config.mesh.shape = (2, 2, 2)
  config.model.depth = 1
  config.data.frames, config.data.bucket_weights = (1,), (1,)
  config.data.image_size, config.data.tokens_per_batch = 16, 8 * 4
  config.cluster.num_clusters = dict(object=16, event_1=12)
  config.loss.bank_weights = dict(object=1.0, event_1=1.0)
  config.loss.event_schedule = ((0.0, (1,)),)
  return train_fixtures.bucket_step_inputs(config, num_classes=12)


@pytest.mark.slow
def test_logits_sharding_leaves_the_train_step_unchanged():
  """The train step with the partial-FC logits pinned to ("batch", "classes") on a 2x2x2 mesh
  (rows over data x fsdp, sampled classes over model) gives the loss, every term, the gradient
  norm and the updated parameters that it gives without (GSPMD's own layout), from another
  partitioned program."""
  run, mesh, setup, spec, shapes, batch_sharding, batch, weights, state = _sharded_step_inputs()
  pinned = sharding.logits_sharding(mesh, run.mesh.rules)
  assert pinned.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "model")
  results, programs = [], []
  for logits in (None, pinned):
    train_step = step_lib.make_train_step(
      setup.graphdef, setup.tx, lambda step: 1e-3, run.loss, spec, logits)
    compiled = step_lib.compile_step(train_step, setup.abstract, setup.shardings, shapes,
                                     dict.fromkeys(shapes, batch_sharding), weights,
                                     sharding.replicated(mesh))
    programs.append(compiled.as_text())
    # The step donates the state: each run gets its own copy.
    results.append(jax.device_get(compiled(jax.tree.map(jnp.copy, state), batch, weights)))
  assert programs[0] != programs[1]
  (plain, plain_metrics), (pinned_state, pinned_metrics) = results
  terms = sorted(k for k in plain_metrics if k.endswith("/loss"))
  assert terms == ["contrastive/loss", "event_1/loss", "object/loss", "object_region/loss"]
  for key in ["loss", "grad_norm", *terms]:
    np.testing.assert_allclose(pinned_metrics[key], plain_metrics[key], rtol=1e-5, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               pinned_state.params, plain.params)


def test_the_halves_of_the_train_step_compiled_apart_give_the_whole_step():
  """The training loop compiles a bucket's gradients and the shared update as two programs
  (`step_lib.compile_gradients`, `compile_update`); over two steps they give the state and the
  metrics of the step compiled whole (`compile_step`, what `--mode=summary` measures)."""
  run, mesh, setup, spec, shapes, batch_sharding, batch, weights, state = _sharded_step_inputs()
  replicated = sharding.replicated(mesh)
  args = (setup.abstract, setup.shardings, shapes, dict.fromkeys(shapes, batch_sharding),
          weights, replicated)
  train_step = step_lib.make_train_step(setup.graphdef, setup.tx, lambda step: 1e-3, run.loss,
                                        spec)
  whole = step_lib.compile_step(train_step, *args)
  halves = step_lib.TrainStep(
    gradients=step_lib.compile_gradients(train_step, *args),
    update=step_lib.compile_update(train_step.update, setup.abstract, setup.shardings,
                                   replicated))
  results = []
  for step in (whole, halves):
    current = jax.tree.map(jnp.copy, state)  # the steps donate the state
    for _ in range(2):
      current, metrics = step(current, batch, weights)
    results.append(jax.device_get((current, metrics)))
  (whole_state, whole_metrics), (split_state, split_metrics) = results
  assert sorted(split_metrics) == sorted(whole_metrics)
  for key, value in whole_metrics.items():  # `finite` is a bool: compared as a number
    np.testing.assert_allclose(np.float64(split_metrics[key]), np.float64(value), rtol=1e-5,
                               err_msg=key)
  assert int(split_state.step) == int(whole_state.step) == 2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               (split_state.params, split_state.opt_state),
               (whole_state.params, whole_state.opt_state))


@pytest.mark.slow
def test_vit_l_train_step_with_million_class_banks_fits_a_v5p_on_64_devices(tmp_path):
  """configs/vit_l.py's full train step, compiled in a child process for the 64 fake devices of
  a v5p-128 slice with 1M-class object and event banks at the documented batch: XLA's
  per-device total fits a v5p's HBM in the image bucket (16,384 images, the largest partial-FC
  logits) and the 16-frame bucket (1,024 clips, the largest activations; docs/scaling.md)."""
  config = load_config("vit_l")
  config.data.frames, config.data.bucket_weights = (1, 16), (1, 1)
  config.cluster.num_clusters = dict.fromkeys(config.cluster.num_clusters, 1_000_000)
  result = summary.run(typed(config, 64), str(tmp_path))
  assert result["devices"] == "64 x cpu"
  assert result["mesh"] == dict(data=1, fsdp=64, model=1)
  assert all(b["spec"] == "P(('fsdp', 'model'), None)" for b in result["banks"])
  assert [b["global_batch"] for b in result["buckets"].values()] == [16_384, 1_024]
  for bucket in result["buckets"].values():
    assert bucket["targets"]["TPU v5p"]["fits"], bucket["total_bytes"]
  assert json.loads((tmp_path / "summary.json").read_text())["buckets"]["16"]["targets"]


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_0_writes_the_summary_and_all_meet_after(process, tmp_path, monkeypatch):
  """In a job of several processes each computes the summary; process 0 alone writes
  summary.json, then every process meets the others at the `summary done` barrier."""
  barriers = []
  monkeypatch.setattr(summary.jax, "process_index", lambda: process)
  monkeypatch.setattr(summary.collectives, "barrier", barriers.append)
  config = demo_config()
  config.summary.compile, config.summary.step = False, "forward"
  result = summary.run(typed(config), str(tmp_path))
  assert result["params_total"] > 0 and barriers == ["summary done"]
  assert (tmp_path / "summary.json").exists() == (process == 0)
