"""launch/: shellcheck on every script, each script's --dry-run (no gcloud, srun or cluster
needed), and the exit code of a preempted run that the scripts act on."""

import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
from helpers import ROOT, xla_flags

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))
TPU = os.path.join(ROOT, "launch", "tpu.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sh")
FLAGS = ["--config=configs/vit_l.py", "--workdir=gs://bucket/run", "--config.note=a b", "it's"]
WHERE = ["--zone=us-east5-a", "--project=my-project"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  return dict(env, **extra)


def _dry_run(script: str, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
  """The commands `script --dry-run ARGS` prints, each split as a shell would."""
  result = subprocess.run([script, "--dry-run", *args], capture_output=True, text=True,
                          env=env or _env(), cwd=ROOT, timeout=60)
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def _option(command: list[str], name: str) -> str:
  (value,) = [w.split("=", 1)[1] for w in command if w.startswith(f"--{name}=")]
  return value


def _jax_pin() -> str:
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    (pin,) = re.findall(r"^jax==(\S+)$", f.read(), re.M)
  return pin


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_scripts_pass_shellcheck(script):
  found = [p for p in (os.path.join(os.path.dirname(sys.executable), "shellcheck"),
                       shutil.which("shellcheck")) if p and os.path.exists(p)]
  if not found:
    pytest.skip("no shellcheck binary (pip install -r requirements.txt provides one)")
  # -x follows `source launch/common.sh` (paths relative to the repository root).
  result = subprocess.run([found[0], "-x", script], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("tier", ["", "--spot", "--reserved"])
def test_create_queues_one_slice_in_the_requested_tier(tier):
  args = ["create", "my-tpu", *WHERE, "--accelerator=v5p-32", "--runtime=v2-alpha-tpuv5"]
  (command,) = _dry_run(TPU, *args, *([tier] if tier else []))
  assert command[:6] == QR + ["create", "my-tpu"]
  assert _option(command, "zone") == "us-east5-a" and _option(command, "project") == "my-project"
  assert _option(command, "accelerator-type") == "v5p-32"
  assert _option(command, "runtime-version") == "v2-alpha-tpuv5"
  assert _option(command, "node-id") == "my-tpu"
  assert [w for w in command if w in ("--spot", "--reserved")] == ([tier] if tier else [])


def test_create_multislice_queues_nodes_with_a_prefix():
  (command,) = _dry_run(TPU, "create", "my-tpu", *WHERE, "--accelerator=v5p-32",
                        "--runtime=v2-alpha-tpuv5", "--nodes=2", "--spot")
  assert _option(command, "node-count") == "2" and _option(command, "node-prefix") == "my-tpu"
  assert not any(w.startswith("--node-id") for w in command)


def test_install_copies_the_checkout_and_pins_jax_tpu_to_the_requirements():
  tar, scp, ssh = _dry_run(TPU, "install", "my-tpu", *WHERE)
  assert tar[:3] == ["tar", "-C", ROOT] and "--exclude=.venv" in tar
  assert tar[-3:-1] == ["-czf", scp[5]] and scp[:5] == QR + ["scp"]
  assert scp[6] == "my-tpu:/tmp/univit_jax.tgz"
  assert ssh[:6] == QR + ["ssh", "my-tpu"]
  for command in (scp, ssh):
    assert _option(command, "node") == "all" and _option(command, "worker") == "all"
  remote = _option(ssh, "command")
  assert "python3.11 -m venv .venv" in remote
  assert shlex.split(remote)[-5:] == ["-r", "requirements.txt", "-r", "requirements-gcs.txt",
                                      f"jax[tpu]=={_jax_pin()}"]


def test_run_starts_every_worker_at_once_with_the_flags_intact(tmp_path):
  (command,) = _dry_run(TPU, "run", "my-tpu", *WHERE, "--", *FLAGS)
  assert command[:6] == QR + ["ssh", "my-tpu"]
  assert _option(command, "node") == _option(command, "worker") == "all"
  assert _option(command, "batch-size") == "all"
  # The remote command, run by a shell in a home holding a stand-in for the worker's checkout.
  fake = tmp_path / "univit_jax" / "launch" / "tpu.sh"
  fake.parent.mkdir(parents=True)
  fake.write_text("#!/usr/bin/env bash\nprintf '%s\\0' \"$@\"\n")
  fake.chmod(0o755)
  result = subprocess.run(["bash", "-c", _option(command, "command")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.split("\0")[:-1] == ["worker", "--", *FLAGS]


def test_worker_runs_the_entry_point_distributed_with_a_compilation_cache(tmp_path):
  (command,) = _dry_run(TPU, "worker", "--", *FLAGS, env=_env(HOME=str(tmp_path)))
  python = os.path.join(ROOT, ".venv", "bin", "python")
  cache = f"JAX_COMPILATION_CACHE_DIR={tmp_path}/jax_cache"
  assert command == ["env", "UNIVIT_DISTRIBUTED=1", cache, python, "-m", "univit_jax.main", *FLAGS]


def test_worker_logs_to_run_log_and_passes_the_exit_code_on(tmp_path):
  """A real (not dry) worker run, in a copy of the checkout whose python only reports."""
  checkout = tmp_path / "univit_jax"
  (checkout / "launch").mkdir(parents=True)
  for script in SCRIPTS:
    shutil.copy(script, checkout / "launch")
  python = checkout / ".venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text("#!/usr/bin/env bash\necho \"pid $$ distributed $UNIVIT_DISTRIBUTED\"\n"
                    "printf 'arg %s\\n' \"$@\"\nexit 75\n")
  python.chmod(0o755)
  result = subprocess.run([checkout / "launch" / "tpu.sh", "worker", "--", *FLAGS],
                          capture_output=True, text=True, env=_env(HOME=str(tmp_path)),
                          timeout=60)
  assert result.returncode == 75, result.stderr
  pid = (checkout / "run.pid").read_text().strip()
  expected = [f"pid {pid} distributed 1", "arg -m", "arg univit_jax.main",
              *[f"arg {flag}" for flag in FLAGS]]
  assert result.stdout.splitlines()[1:] == expected
  assert (checkout / "run.log").read_text().splitlines()[1:] == expected


def test_logs_stop_and_delete():
  (logs,) = _dry_run(TPU, "logs", "my-tpu", *WHERE, "--worker=3")
  assert logs[:6] == QR + ["ssh", "my-tpu"]
  assert (_option(logs, "node"), _option(logs, "worker")) == ("0", "3")
  assert shlex.split(_option(logs, "command"))[-1] == "univit_jax/run.log"
  (stop,) = _dry_run(TPU, "stop", "my-tpu", *WHERE)
  assert _option(stop, "node") == _option(stop, "worker") == "all"
  assert shlex.split(_option(stop, "command")) == [
    "pkill", "-TERM", "-F", "univit_jax/run.pid", "-f", "univit_jax.main"]
  (delete,) = _dry_run(TPU, "delete", "my-tpu", *WHERE)
  assert delete == QR + ["delete", "my-tpu", *WHERE, "--force"]


@pytest.mark.parametrize("args", [
  [], ["launch", "my-tpu", "--zone=z"], ["run", "my-tpu", "--zone=z"], ["install", "my-tpu"],
  ["create", "my-tpu", "--zone=z"], ["stop", "my-tpu", "--zone=z", "--", "--config=x"],
  ["create", "my-tpu", "--zone=z", "--accelerator=v5p-8", "--runtime=r", "--spot", "--reserved"],
  ["create", "my-tpu", "--zone=z", "--accelerator=v5p-8", "--runtime=r", "--nodes=0"],
  ["logs", "my-tpu", "--zone=z", "--tail"],
], ids=" ".join)
def test_tpu_bad_arguments_print_the_usage_and_exit_2(args):
  result = subprocess.run([TPU, "--dry-run", *args], capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "launch/tpu.sh [--dry-run] COMMAND NAME" in result.stderr
  assert not result.stdout


def _in_allocation(tmp_path, **extra: str) -> dict[str, str]:
  """The environment of a two-node allocation, with a stand-in for `scontrol`."""
  scontrol = tmp_path / "bin" / "scontrol"
  scontrol.parent.mkdir(exist_ok=True)
  scontrol.write_text("#!/bin/sh\nprintf 'gpu01\\ngpu02\\n'\n")
  scontrol.chmod(0o755)
  return _env(PATH=f"{scontrol.parent}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
              SLURM_JOB_NODELIST="gpu[01-02]", SLURM_SUBMIT_DIR=ROOT, **extra)


def test_slurm_starts_one_job_step_with_the_coordinator_on_the_first_host(tmp_path, monkeypatch):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")  # the script's default (conftest.py sets one)
  (command,) = _dry_run(SLURM, *FLAGS, env=_in_allocation(tmp_path))
  python = os.path.join(ROOT, ".venv", "bin", "python")
  assert command[0] == "srun" and command[-len(FLAGS) - 3:] == [python, "-m", "univit_jax.main",
                                                                  *FLAGS]
  exported = _option(command, "export").split(",")
  assert exported[0] == "ALL" and "UNIVIT_DISTRIBUTED=1" in exported
  assert "JAX_COORDINATOR_ADDRESS=gpu01:12355" in exported
  assert f"JAX_COMPILATION_CACHE_DIR={ROOT}/jax_cache" in exported
  assert _option(command, "chdir") == ROOT and _option(command, "gpu-bind") == "none"
  (command,) = _dry_run(SLURM, *FLAGS, env=_in_allocation(tmp_path, UNIVIT_PORT="2222"))
  assert "JAX_COORDINATOR_ADDRESS=gpu01:2222" in _option(command, "export").split(",")


def test_slurm_bad_arguments_or_no_allocation_exit_2(tmp_path):
  for args, env in (([], _in_allocation(tmp_path)), (["--help"], _env()), (FLAGS, _env())):
    result = subprocess.run([SLURM, "--dry-run", *args], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2 and not result.stdout, args


@pytest.mark.slow
def test_sigterm_stops_train_mode_with_the_preempted_exit_code(tmp_path):
  """The train mode of the entry point (`main._train`) on the tiny training fixture, stopped by
  a real SIGTERM once it is stepping."""
  script = ("import sys\nsys.path[:0] = sys.argv[2:]\n"
            "import helpers\nimport train_fixtures\nfrom univit_jax import main\n"
            "config = train_fixtures.tiny_config()\n"
            "config.total_steps = 100\n"
            "train_fixtures.write_clusters(sys.argv[1])\n"
            "with train_fixtures.slow_steps(1.0):\n"
            "  main._train(helpers.typed(config), sys.argv[1])\n")
  env = _env(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  proc = subprocess.Popen(
    [sys.executable, "-c", script, str(tmp_path), os.path.join(ROOT, "tests"), ROOT],
    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 300
  while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
    assert time.monotonic() < deadline, "no training step within 300 s"
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 75, err[-3000:]
  assert "Training stopped by SIGTERM (checkpoint saved)" in out


def test_preempted_runs_exit_with_the_code_the_slurm_script_requeues_on(monkeypatch):
  from univit_jax import main, rounds, train
  from univit_jax.evaluation import run as eval_run
  with open(SLURM) as f:
    script = f.read()
  assert "#SBATCH --requeue" in script
  assert re.findall(r"status == (\d+)", script) == [str(main.PREEMPTED_EXIT_CODE)]
  monkeypatch.setattr(eval_run, "training_evaluator", lambda config: None)
  monkeypatch.setattr(train, "run_train", lambda *args: types.SimpleNamespace(
    preempted=True, step=3, label_versions={}))
  with pytest.raises(SystemExit) as stopped:
    main._train(None, "/unused")  # pylint: disable=protected-access
  assert stopped.value.code == main.PREEMPTED_EXIT_CODE == 75
  monkeypatch.setattr(rounds, "run_pipeline", lambda config, workdir: {"preempted": True})
  with pytest.raises(SystemExit) as stopped:
    main._pipeline(None, "/unused")  # pylint: disable=protected-access
  assert stopped.value.code == 75
