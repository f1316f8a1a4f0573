"""`--mode=pipeline`: two rounds of extract -> cluster -> train -> export, in a subprocess."""

import json

import numpy as np

from helpers import run_main
from univit_jax.clustering import store

SMALL = [
  "--config.data.frames=(1,2)", "--config.data.bucket_weights=(1,1)",
  "--config.data.sources.digits.num_examples=32", "--config.data.sources.objects.num_examples=32",
  "--config.data.sources.events.num_examples=16", "--config.extract.batch_size=16",
  "--config.extract.clip_frames=4", "--config.extract.granularities=(1,2)",
  "--config.extract.pixels_fit_examples=32", "--config.extract.pixels_dim=16",
  "--config.cluster.num_clusters={'object': 8, 'event_1': 4, 'event_2': 4}",
  "--config.cluster.top_k=2", "--config.cluster.iterations=3",
  "--config.loss.bank_weights={'object': 1.0, 'event_1': 1.0, 'event_2': 1.0}",
  "--config.loss.event_schedule=((0.0, (1, 2)),)",
  "--config.total_steps=2", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
  "--config.train.progress_bar=False", "--config.optim.warmup_steps=1",
]


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
  # Rerunning finds every round complete and does no work.
  again = run_main("--config=configs/demo.py", f"--workdir={tmp_path}", *SMALL, timeout=300)
  assert again.returncode == 0 and "round 2: complete" in again.stdout
