"""The evaluation report: PCA colour maps, the markdown table, the HTML page in a real browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from univit_jax.evaluation import report
from univit_jax.evaluation.common import ProbeResult


def _fake_results() -> dict:
  classes = ["zero", "one", "two", "three"]
  confusion = [[8, 1, 1, 0], [0, 9, 0, 1], [2, 0, 7, 1], [0, 1, 0, 9]]
  digit = ProbeResult(
    metric="accuracy", value=0.825, selected={"l2": 1e-3}, val_value=0.81,
    curves={"val_accuracy_vs_l2": [[1e-5, 0.70], [1e-4, 0.78], [1e-3, 0.81], [1e-2, 0.76]],
            "train_loss": [1.4, 0.9, 0.7, 0.6, 0.55]},
    details={"confusion": confusion, "class_names": classes}).to_json()
  attributes = ProbeResult(metric="mean_auc", value=0.512, val_value=0.5).to_json()
  attributes.update(spread=0.01, n=3)
  segmentation = ProbeResult(metric="miou", value=0.301,
                             curves={"train_loss": [0.9, 0.8, 0.75]}).to_json()
  return {
    "encoders": [{"name": "round_2 export", "kind": "export", "path": "/tmp/exports/round_2"},
                 {"name": "random init", "kind": "random", "path": None}],
    "tasks": {"digit_class/linear": {"metric": "accuracy", "chance": 0.25, "majority": 0.3,
                                     "description": "Digit class, linear probe on pooled tokens."},
              "attributes/linear": {"metric": "mean_auc", "chance": 0.5,
                                    "description": "Multi-label attributes <a&b>."},
              "segmentation/dense": {"metric": "miou", "chance": None,
                                     "description": "Per-pixel classes from patch tokens."}},
    "values": {"round_2 export": {"digit_class/linear": digit, "attributes/linear": attributes,
                                  "segmentation/dense": segmentation},
               "random init": {"digit_class/linear": dict(digit, value=0.3)}},
    "meta": {"command": "python -m univit_jax.main --mode=eval <script>alert(1)</script>",
             "date": "2025-01-01", "config": {"model": "mu/8", "seeds": [0, 1, 2]}},
  }


def _fake_visuals() -> dict:
  rng = np.random.default_rng(0)
  visuals = {}
  for name in ("round_2 export", "random init"):
    tokens = rng.normal(size=(4 * 4 * 4, 16)).astype(np.float32)
    visuals[name] = [
      {"title": f"{name}: clip 0", "pca": report.pca_rgb(tokens, (4, 4, 4)),
       "frames": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)},
      {"title": f"{name}: image 0", "pca": report.pca_rgb(tokens[:16], (1, 4, 4)),
       "frames": rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)}]
  return visuals


def test_pca_rgb_shape_range_and_order():
  rng = np.random.default_rng(0)
  grid = (2, 3, 5)
  signal = rng.normal(size=30)
  direction = rng.uniform(0.5, 1.0, size=8)
  tokens = signal[:, None] * direction[None, :] + 1e-4 * rng.normal(size=(30, 8))
  rgb = report.pca_rgb(tokens, grid)
  assert rgb.shape == (*grid, 3) and rgb.dtype == np.float32
  assert rgb.min() >= 0.0 and rgb.max() <= 1.0
  first = rgb[..., 0].ravel()
  # Non-decreasing along the signal (the 1st/99th percentile clip ties the extremes).
  assert np.all(np.diff(first[np.argsort(signal)]) >= 0)
  assert first.min() == 0.0 and first.max() == 1.0
  # A basis fitted on more tokens colours this clip the same way along the signal.
  more = rng.normal(size=(200, 1)) * direction[None, :] + 1e-4 * rng.normal(size=(200, 8))
  shared = report.pca_rgb(tokens, grid, basis=report.pca_basis(more))
  assert np.all(np.diff(shared[..., 0].ravel()[np.argsort(signal)]) >= 0)
  with pytest.raises(ValueError, match="grid"):
    report.pca_rgb(tokens, (2, 3, 4))


def test_markdown_table():
  lines = report.markdown_table(_fake_results()).splitlines()
  assert lines[0] == ("| task / probe | metric | chance | majority | round_2 export "
                      "| random init |")
  assert lines[2] == "| digit_class/linear | accuracy | 0.250 | 0.300 | 0.825 | 0.300 |"
  assert lines[3] == "| attributes/linear | mean_auc | 0.500 | - | 0.512 ± 0.010 | - |"
  assert lines[4] == "| segmentation/dense | miou | - | - | 0.301 | - |"


def test_write_report(tmp_path):
  results = _fake_results()
  paths = report.write_report(str(tmp_path / "eval"), results, _fake_visuals())
  assert set(paths) == {"json", "markdown", "html"}
  loaded = json.loads(open(paths["json"]).read())
  assert loaded == results
  assert list(loaded["tasks"]) == list(results["tasks"])
  assert open(paths["markdown"]).read() == report.markdown_table(results)
  page = open(paths["html"]).read()
  assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
  assert "http://" not in page and "https://" not in page
  assert "<script>" not in page and "&lt;script&gt;" in page
  assert '<table id="results">' in page
  # Per encoder: curves of 2 cells + 1 confusion (round_2), 1 curve + 1 confusion (random), and
  # 2 feature-map figures each.
  assert page.count('src="data:image/png;base64,') == 3 + 2 + 4
  assert "Feature maps" in page


def _chromium() -> str:
  binary = shutil.which("chromium") or shutil.which("chromium-browser")
  if binary is None:
    pytest.skip("Debian package chromium not installed: apt-get install chromium")
  return binary


def _run_chromium(binary: str, profile: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
     f"--user-data-dir={profile}", *args],
    capture_output=True, text=True, timeout=60, check=True)


@pytest.mark.slow
def test_report_renders_in_chromium(tmp_path):
  binary = _chromium()
  paths = report.write_report(str(tmp_path / "eval"), _fake_results(), _fake_visuals())
  url = f"file://{paths['html']}"
  profile = str(tmp_path / "profile")
  dom = _run_chromium(binary, profile, "--dump-dom", url).stdout
  assert re.search(r'<table id="results">.*round_2 export.*random init.*</table>', dom, re.S)
  assert "Feature maps" in dom

  screenshot = tmp_path / "report.png"
  _run_chromium(binary, profile, f"--screenshot={screenshot}", "--window-size=1200,2000", url)
  pixels = np.asarray(Image.open(screenshot).convert("RGB"))
  assert pixels.shape[:2] == (2000, 1200)
  assert pixels.std() > 10
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
