"""Errors in the user's config, data or files: one line on stderr and exit code 2, or the traceback
with --verbosity=1."""

import pytest

import helpers


@pytest.fixture
def bad_manifest_run(tmp_path):
  """Arguments of an extraction over a manifest that names two missing files."""
  manifest = tmp_path / "images.csv"
  manifest.write_text("path,label\na.png,0\nb.png,1\n")
  config = helpers.write_tiny_config(
    tmp_path, dict(imgs=dict(type="image_folder", path=str(manifest))))
  return f"--config={config}", f"--workdir={tmp_path / 'run'}", "--mode=extract"


def test_a_rejected_manifest_is_one_line_and_exit_code_2(bad_manifest_run, tmp_path):
  result = helpers.run_main(*bad_manifest_run)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip() == (
    f"Data error: manifest {tmp_path / 'images.csv'} rejected (2 bad rows); "
    "line 2: missing file 'a.png'; line 3: missing file 'b.png'")


def test_verbosity_1_shows_the_traceback_instead(bad_manifest_run):
  result = helpers.run_main(*bad_manifest_run, "--verbosity=1")
  assert result.returncode not in (0, 2)
  assert "Traceback" in result.stderr and "SourceError: manifest" in result.stderr
  assert "Data error:" not in result.stderr
