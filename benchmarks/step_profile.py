"""Where the classifier train step of `step_vs_torch.py` spends its time, by model part.

  python benchmarks/step_profile.py                    # Ti/16, f32, 32 images of 224 px
  python benchmarks/step_profile.py --dtype=bfloat16 --frames=8 --batch=4
  python benchmarks/step_profile.py --demo --frames=1        # the demo's own train step

Compiles the same step as `step_vs_torch.py`'s "ours" rows (our encoder, a linear classifier,
softmax cross-entropy, AdamW), runs `--warmup` steps, then traces `--steps` steps with
`jax.profiler`, XLA:CPU timing every thunk (`--xla_cpu_enable_xprof_traceme`). Each thunk is an
instruction of the compiled program; its source stack (the stack frames XLA keeps with the HLO)
names the innermost function of the model, the loss or the optimiser it came from, and its op
name says forward or backward (`transpose(` = the backward pass). Prints milliseconds per step
by (kind, pass, function), those of 0.5% or more, and writes all to
benchmarks/results/step_profile_<platform>.json.
Thunks run on several threads, so their times add up to more than the step's wall time; the
shares are what to compare. The profiler slows the step a little; time it with
`step_vs_torch.py`.

With `--demo`, the step profiled is configs/demo.py's own gradients program (`train/step.py`:
the encoder, every bank term of the bucket, the contrastive term and its shuffled pass) for its
`--frames` bucket at the demo's batch size, on random frames and labels; `--variant`, `--dtype`,
`--batch` and `--image_size` then come from the config. It also prints the median wall time of
the program and of the shared update, and XLA's FLOP count.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=wrong-import-position
from univit_jax import atomic  # pylint: disable=wrong-import-position
import step_vs_torch  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
# --image_size, --batch, --classes, --steps (profiled steps), --warmup and --out are
# step_vs_torch's flags; --out defaults to benchmarks/results/step_profile_<platform>.json here.
flags.DEFINE_string("variant", "Ti/16", "model size (univit_jax/specs.py)")
flags.DEFINE_string("dtype", "float32", "compute dtype (parameters stay float32)")
flags.DEFINE_integer("frames", 1, "frames per sample (1: images)")
flags.DEFINE_bool("demo", False, "profile configs/demo.py's train step for the --frames bucket")
FLAGS.set_default("steps", 2)
FLAGS.set_default("warmup", 2)

# Innermost functions a thunk is attributed to, from the model out to the optimiser.
PARTS = ("rotate", "rotation", "rope_angles", "time_features", "gelu_exact", "Mlp.__call__",
         "dot_product_attention", "Attention.__call__", "LayerNorm.__call__", "MapHead.__call__",
         "rearrange", "softmax_cross_entropy_with_integer_labels", "discrimination_loss",
         "structured_contrastive_loss", "center_statistics", "scale_by_adam",
         "add_decayed_weights", "apply_updates")


def _table(hlo: str, name: str) -> list[str]:
  """The lines of one of the tables (FileNames, StackFrames, ...) printed with the HLO."""
  match = re.search(rf"^{name}\n(.*?)(?:\n\n|\Z)", hlo, re.S | re.M)
  return match.group(1).splitlines() if match else []


def source_stacks(hlo: str) -> dict[str, tuple[str, list[str]]]:
  """Instruction name -> (op name, source function names, innermost first)."""
  quoted = lambda line: line.split(maxsplit=1)[1].strip('"')
  functions = {int(line.split()[0]): quoted(line) for line in _table(hlo, "FunctionNames")}
  locations = {}
  for line in _table(hlo, "FileLocations"):
    location, function = re.match(r"(\d+) \{file_name_id=\d+ function_name_id=(\d+)", line).groups()
    locations[int(location)] = functions[int(function)]
  frames = {}  # frame id -> (function, parent frame id); the text prints parents 1-based.
  for line in _table(hlo, "StackFrames"):
    frame, location, parent = map(int, re.match(
      r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", line).groups())
    frames[frame] = (locations[location], parent - 1)
  stacks = {}
  for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\""
                           r"(?: stack_frame_id=(\d+))?", hlo, re.M):
    name, op_name, frame = match.group(1), match.group(2), int(match.group(3) or 0)
    stack = []
    while frame in frames and len(stack) < 64:
      function, frame = frames[frame]
      stack.append(function)
    stacks[name] = (op_name, stack)
  return stacks


def category(name: str, op_name: str, stack: list[str]) -> str:
  """"<dot|other> <fwd|bwd|-> <function>" of one thunk: a library call (XLA's dot fusions, named
  after the library) or XLA's own kernel; the backward pass or not; the innermost `PARTS`
  function on its stack (attention split into its softmax core and the rest), prefixed by
  "MapHead " inside the pooling head."""
  kind = "dot" if re.match(r"(ynn|xnn|onednn)_fusion|dot|custom", name) else "other"
  direction = "bwd" if "transpose(" in op_name else "fwd" if "jvp(" in op_name else "-"
  part = next((f for f in stack if f.startswith(PARTS)), "other")
  if part == "Attention.__call__":  # jax.nn.dot_product_attention vmaps its core over heads
    part += " core" if "vmap(" in op_name else " projections"
  elif part == "dot_product_attention":  # ours (`model.attention="xla"`): QK, softmax, PV
    part = "Attention.__call__ core"
  head = "MapHead " if "MapHead.__call__" in stack and part != "MapHead.__call__" else ""
  return f"{kind} {direction} {head}{part}"


def thunk_seconds(trace_dir: str) -> dict[str, float]:
  """Seconds per thunk name summed over a `jax.profiler` trace's complete events."""
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*",
                                       "perfetto_trace.json.gz")))[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  seconds = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X":
      seconds[e["name"]] += e.get("dur", 0) / 1e6
  return seconds


def compile_demo(num_frames: int) -> tuple[jax.stages.Compiled, Callable[[], None], dict]:
  """configs/demo.py's gradients program for its `num_frames` bucket, on one device: (the
  compiled program, a function running it once on a random batch and blocking, facts to report:
  the batch size, XLA's FLOPs, median seconds of the program and of the update)."""
  # Imported here: the train package pulls in the data pipeline; the batch comes from the tests'
  # fixtures.
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                  "tests"))
  # pylint: disable=import-outside-toplevel,import-error
  import helpers
  import train_fixtures
  from univit_jax import optim, sharding
  from univit_jax.train import step as step_lib
  # pylint: enable=import-outside-toplevel,import-error

  config = helpers.load_config("demo")
  (run, mesh, setup, spec, shapes, batch_sharding, batch, weights,
   state) = train_fixtures.bucket_step_inputs(
     config, min(config.cluster.num_clusters.values()), num_frames)
  learning_rate = optim.learning_rate(run.optim, run.train.total_steps)
  train_step = step_lib.make_train_step(setup.graphdef, setup.tx, learning_rate, run.loss, spec)
  replicated = sharding.replicated(mesh)
  compiled = step_lib.compile_gradients(train_step, setup.abstract, setup.shardings, shapes,
                                        dict.fromkeys(shapes, batch_sharding), weights, replicated)
  update = step_lib.compile_update(train_step.update, setup.abstract, setup.shardings, replicated)
  inputs = (state.params, state.rng, state.step, batch, weights)

  def run_once():
    jax.block_until_ready(compiled(*inputs))

  grads, metrics, statistics = compiled(*inputs)
  _, gradients_s = step_vs_torch.median_time(run_once, FLAGS.steps + 3, FLAGS.warmup)
  holder = [jax.tree.map(lambda x: x.copy(), state)]  # the update donates its state

  def update_once():
    holder[0], _ = update(holder[0], grads, metrics["loss"], statistics)
    jax.block_until_ready(holder[0])

  _, update_s = step_vs_torch.median_time(update_once, 10, 2)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, run_once, dict(
    batch=shapes["frames"].shape[0], xla_flops=float((cost or {}).get("flops", 0)),
    gradients_s=gradients_s, update_s=update_s)


def main(argv):
  del argv
  out = FLAGS.out or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results",
    f"step_profile_{'demo_' if FLAGS.demo else ''}{jax.default_backend()}.json")
  facts = {}
  if FLAGS.demo:
    compiled, run, facts = compile_demo(FLAGS.frames)
    print(f"demo {FLAGS.frames}-frame bucket, batch {facts['batch']}: gradients "
          f"{facts['gradients_s'] * 1e3:.0f} ms, update {facts['update_s'] * 1e3:.1f} ms "
          f"(medians), {facts['xla_flops'] / 1e9:.2f} GFLOP")
  else:
    rng = np.random.default_rng(0)
    frames = rng.standard_normal(
      (FLAGS.batch, FLAGS.frames, FLAGS.image_size, FLAGS.image_size, 3), np.float32)
    labels = rng.integers(0, FLAGS.classes, FLAGS.batch).astype(np.int32)
    cfg = step_vs_torch.model_config(FLAGS.variant, FLAGS.dtype)
    compiled, run, _ = step_vs_torch.compile_ours(cfg, frames, labels, FLAGS.classes)
  for _ in range(FLAGS.warmup):
    run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(FLAGS.steps):
        run()
    seconds = thunk_seconds(trace_dir)
  stacks = source_stacks(compiled.as_text())
  parts = collections.defaultdict(float)
  for name, total in seconds.items():
    if name in stacks:
      parts[category(name, *stacks[name])] += total / FLAGS.steps
  total = sum(parts.values())
  rows = [dict(part=k, ms_per_step=round(v * 1e3, 1), share=round(v / total, 4))
          for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]
  name = "configs/demo.py" if FLAGS.demo else f"{FLAGS.variant} {FLAGS.dtype}"
  print(f"{name} T={FLAGS.frames} batch {facts.get('batch', FLAGS.batch)}: thunks "
        f"{total * 1e3:.0f} ms per step; 1-minute load {os.getloadavg()[0]:.1f}")
  for row in rows:
    if row["share"] < 0.005:
      break
    print(f"{row['ms_per_step']:9.1f} ms {row['share']:7.1%}  {row['part']}")
  atomic.write_json(out, dict(
    flags={k: FLAGS[k].value for k in ("demo", "variant", "dtype", "image_size", "frames",
                                       "batch", "classes", "steps", "warmup")},
    machine=machine.describe(), thunk_ms_per_step=round(total * 1e3, 1), **facts,
    rows=rows))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
