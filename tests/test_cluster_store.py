"""Feature store: round trip, resume after SIGKILL, and named errors for bad banks."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import cluster_worker
from univit_jax.clustering import store

WORKER = os.path.join(os.path.dirname(__file__), "cluster_worker.py")


def _write_all(workdir, bank="b", dim=4, chunks=((3,), (2,))):
  writer = store.BankWriter(str(workdir), bank, dim, teacher="t0")
  rng = np.random.default_rng(0)
  data = []
  for index, (rows,) in enumerate(chunks):
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    assert writer.write_chunk(index, x, np.arange(rows) + 10 * index)
    data.append(x)
  writer.finish()
  return np.concatenate(data)


def test_round_trip_and_streaming(tmp_path):
  x = _write_all(tmp_path)
  reader = store.BankReader(str(tmp_path), "b")
  assert (reader.num_rows, reader.dim, reader.teacher) == (5, 4, "t0")
  features, ids = reader.chunk(0)
  assert isinstance(features, np.memmap)
  np.testing.assert_array_equal(np.concatenate([f for f, _ in reader.chunks()]), x)
  np.testing.assert_array_equal(reader.ids(), [[0, 0], [1, 0], [2, 0], [10, 0], [11, 0]])
  np.testing.assert_array_equal(np.concatenate(list(reader.rows(2, 4))), x[2:4])
  np.testing.assert_array_equal(reader.gather(np.array([4, 0])), x[[4, 0]])
  reader.check()
  assert not [n for n in os.listdir(reader.directory) if n.endswith(".tmp")]


def test_rewriting_a_committed_chunk_is_skipped(tmp_path):
  _write_all(tmp_path)
  writer = store.BankWriter(str(tmp_path), "b", 4, teacher="t0")
  assert writer.has_chunk(1) and not writer.has_chunk(2)
  with pytest.raises(store.FeatureStoreError, match="already complete"):
    writer.write_chunk(2, np.ones((1, 4)), [0])
  assert not writer.write_chunk(0, np.ones((1, 4)), [0])


def test_writer_resumes_after_sigkill(tmp_path):
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  subprocess.run([sys.executable, WORKER, "write", str(reference)], check=True)
  proc = subprocess.Popen([sys.executable, WORKER, "write", str(killed), "--sleep", "0.5"],
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "chunk 0"
  assert proc.stdout.readline().strip() == "chunk 1"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  with pytest.raises(store.FeatureStoreError, match="not marked complete"):
    store.BankReader(str(killed), cluster_worker.BANK)
  partial = store.BankReader(str(killed), cluster_worker.BANK, require_complete=False)
  assert 2 <= len(partial.chunk_names) < len(cluster_worker.CHUNK_ROWS)
  out = subprocess.run([sys.executable, WORKER, "write", str(killed)], check=True,
                       capture_output=True, text=True).stdout.split("\n")
  assert "chunk 0" not in out and "chunk 4" in out
  a = store.BankReader(str(reference), cluster_worker.BANK)
  b = store.BankReader(str(killed), cluster_worker.BANK)
  assert a.meta == b.meta
  for (fa, ia), (fb, ib) in zip(a.chunks(), b.chunks()):
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_array_equal(ia, ib)


def test_missing_bank_names_bank_and_path(tmp_path):
  with pytest.raises(store.FeatureStoreError, match=r"bank 'nope'.*features/nope/meta.json"):
    store.BankReader(str(tmp_path), "nope")


@pytest.mark.parametrize("bad, message", [
  (np.array([[1.0, np.nan, 0, 0]]), "row 0 has NaN or Inf"),
  (np.array([[1.0, 0, 0, 0], [np.inf, 0, 0, 0]]), "row 1 has NaN or Inf"),
  (np.zeros((1, 4)), "row 0 has zero norm"),
  (np.ones((2, 3)), r"shape \(2, 3\), expected \[n, 4\]"),
])
def test_writer_rejects_bad_features(tmp_path, bad, message):
  writer = store.BankWriter(str(tmp_path), "b", 4, teacher="t0")
  with pytest.raises(store.FeatureStoreError, match=rf"bank 'b'.*chunk_00000\.npy.*{message}"):
    writer.write_chunk(0, bad, np.arange(len(bad)))
  assert not writer.has_chunk(0)


def test_reader_rejects_bad_chunk_files(tmp_path):
  _write_all(tmp_path)
  directory = store.bank_dir(str(tmp_path), "b")
  np.save(os.path.join(directory, "chunk_00001.npy"), np.ones((2, 5), np.float32))
  with pytest.raises(store.FeatureStoreError, match=r"bank 'b'.*chunk_00001\.npy.*mismatched dims"):
    list(store.BankReader(str(tmp_path), "b").chunks())
  np.save(os.path.join(directory, "chunk_00001.npy"), np.array([[0, 0, 0, 0], [1, 2, 3, 4]],
                                                               np.float32))
  with pytest.raises(store.FeatureStoreError, match=r"chunk_00001\.npy: row 0 has zero norm"):
    store.BankReader(str(tmp_path), "b").check()


def test_writer_refuses_other_dim_or_teacher(tmp_path):
  _write_all(tmp_path)
  with pytest.raises(store.FeatureStoreError, match=r"bank 'b'.*dim=4 teacher='t0'"):
    store.BankWriter(str(tmp_path), "b", 8, teacher="t0")
  with pytest.raises(store.FeatureStoreError, match="missing chunks"):
    writer = store.BankWriter(str(tmp_path), "c", 4, teacher="t0")
    writer.write_chunk(1, np.ones((1, 4)), [0])
    writer.finish()


def test_incomplete_bank_is_refused(tmp_path):
  writer = store.BankWriter(str(tmp_path), "b", 4, teacher="t0")
  writer.write_chunk(0, np.ones((2, 4)), [0, 1])
  with pytest.raises(store.FeatureStoreError, match=r"bank 'b'.*meta.json is not marked complete"):
    store.BankReader(str(tmp_path), "b")
  with open(os.path.join(store.bank_dir(str(tmp_path), "b"), "meta.json")) as f:
    assert json.load(f)["chunks"] == [dict(name="chunk_00000", rows=2)]
