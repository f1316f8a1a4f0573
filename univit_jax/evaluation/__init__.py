"""Evaluation of frozen encoders: probes on held-out tasks, order sensitivity, the report.

  python -m univit_jax.main --config=configs/demo.py --workdir=DIR --mode=eval

`run.py` is the stage (`run_eval`, the `EVALUATORS` mapping); `tasks.py` the records, targets and
cached features; `features.py` the extractors (exports, checkpoints, random init, raw pixels);
`linear.py`, `knn.py`, `attentive.py`, `dense.py`, `qa.py` the probes; `report.py` the outputs.
"""
