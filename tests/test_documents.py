"""Documents: the held-out split, DocumentToTokens, the flag table and the bounded problem log
(the readers: tests/test_data_sources.py, tests/test_streaming.py)."""

import numpy as np
import pytest

from bltjax.data import documents, flag_table
from bltjax.data.documents import Document
from bltjax.model import tokenizer


class KeySource:
  def __init__(self, n):
    self.name = f"keys({n})"
    self.n = n

  def __len__(self):
    return self.n

  def key(self, i):
    return f"doc-{i}"


def test_split_indices():
  src = KeySource(2000)
  train, evals = documents.split_indices(src, 0.1)
  assert not set(train) & set(evals)
  assert np.array_equal(np.sort(np.concatenate([train, evals])), np.arange(2000))
  assert 120 < len(evals) < 280
  again = documents.split_indices(KeySource(2000), 0.1)
  assert np.array_equal(again[0], train) and np.array_equal(again[1], evals)
  # The split of a document depends on its key only.
  assert set(documents.split_indices(KeySource(1000), 0.1)[1]) == set(evals[evals < 1000])

  train, evals = documents.split_indices(src, 0.0)
  assert len(evals) == 0 and len(train) == 2000
  for bad in (-0.1, 1.0, float("nan")):
    with pytest.raises(ValueError, match="eval_fraction"):
      documents.split_indices(src, bad)


def test_split_indices_tiny_sources():
  train, evals = documents.split_indices(KeySource(3), 1e-9)
  assert len(evals) == 1 and len(train) == 2
  hashes = [documents.key_hash(f"doc-{i}") for i in range(3)]
  assert evals[0] == int(np.argmin(hashes))
  train, evals = documents.split_indices(KeySource(2), 0.999999)
  assert len(evals) == 1 and len(train) == 1
  train, evals = documents.split_indices(KeySource(1), 0.5)
  assert len(train) + len(evals) == 1


def test_document_to_tokens():
  to_tokens = documents.DocumentToTokens()
  out = to_tokens.map(Document(b"hi", None))
  assert out["tokens"].dtype == np.int32 and out["doc_flags"].dtype == np.int8
  np.testing.assert_array_equal(
      out["tokens"], [tokenizer.BOS_ID, ord("h") + 4, ord("i") + 4, tokenizer.EOS_ID])
  np.testing.assert_array_equal(out["doc_flags"], [0, 0, 0, 0])

  bit = flag_table.BIT
  cases = {
      Document(b"\xff\xfe", None): bit["invalid_utf8"],
      Document(b"a\x00b", None): bit["nul"],
      Document(b"\xff\x00", None): bit["invalid_utf8"] | bit["nul"],
      Document(b"", "empty"): bit["empty"],
      Document(b"", "unreadable"): bit["unreadable"],
      Document(b"", "malformed"): bit["malformed"],
      Document(b"\xc3\xa9\xc3", "oversized"): bit["oversized"],  # cut inside a character
      Document(b"\xff\xc3", "oversized"): bit["oversized"] | bit["invalid_utf8"],
  }
  for doc, flag in cases.items():
    out = to_tokens.map(doc)
    np.testing.assert_array_equal(out["tokens"], tokenizer.encode(doc.data))
    assert out["doc_flags"][0] == flag and not out["doc_flags"][1:].any(), doc
  with pytest.raises(ValueError, match="problem"):
    to_tokens.map(Document(b"", "lost"))

  batch = np.stack([np.pad(to_tokens.map(doc)["doc_flags"], (0, 4))[:4] for doc in cases])
  per_flag = dict(invalid_utf8=3, nul=2, empty=1, unreadable=1, malformed=1, oversized=2)
  counts = flag_table.counts(batch)
  assert counts.dtype == np.int32 and counts.tolist() == [per_flag[f] for f in flag_table.FLAGS]
  assert flag_table.counts(np.zeros((2, 3, 5), np.int8)).tolist() == [0] * len(flag_table.FLAGS)


def test_flag_table():
  """One table: bits, metric names, batch columns and stored counts agree."""
  from bltjax.train import batch as batch_lib
  from bltjax.data import preprocessed
  assert flag_table.NAMES == tuple(f"{f}_docs" for f in flag_table.FLAGS)
  assert flag_table.NAMES[:4] == ("invalid_utf8_docs", "nul_docs", "empty_docs", "unreadable_docs")
  assert [flag_table.BIT[f] for f in flag_table.FLAGS] == [1 << i for i in range(len(flag_table.FLAGS))]
  assert set(flag_table.PROBLEMS) <= set(flag_table.FLAGS)
  counts = np.arange(2 * len(flag_table.FLAGS), dtype=np.int32).reshape(2, -1)
  stats = batch_lib.host_stats({"doc_flag_counts": counts})  # the metrics: column i is NAMES[i]
  assert list(stats) == list(flag_table.NAMES) and list(stats.values()) == counts.sum(0).tolist()
  rows = preprocessed.encode_rows(np.ones((2, 8), np.int32), np.ones((2, 8), np.int32),
                                  np.ones((2, 8)), counts, np.zeros((2, 8)), "float16")
  assert rows.shape == (2, preprocessed.record_bytes(8, "float16"))
  np.testing.assert_array_equal(preprocessed.decode_rows(rows, 8, "float16")["doc_flag_counts"],
                                counts)
  with pytest.raises(ValueError, match="doc_flag_counts"):
    preprocessed.encode_rows(np.ones((2, 8), np.int32), np.ones((2, 8), np.int32),
                             np.ones((2, 8)), counts[:, :4], np.zeros((2, 8)), "float16")


def test_old_preprocessed_rows_are_refused(tmp_path):
  """Version 1 rows hold 4 counts (malformed folded into unreadable, long documents uncut)."""
  import json
  from bltjax.data import preprocessed
  (tmp_path / preprocessed.MANIFEST).write_text(json.dumps(
      dict(format=preprocessed.FORMAT, version=1)))
  with pytest.raises(ValueError, match=r"version 1 rows hold 4 document counts.*re-run"):
    preprocessed.read_manifest(tmp_path)


def test_problems_are_logged_boundedly(caplog):
  log = documents.ProblemLog("src")
  with caplog.at_level("WARNING"):
    for i in range(3 * documents.MAX_READ_WARNINGS):
      log("malformed", f"k{i}", "bad")
    log("unreadable", "u", "gone")
  assert caplog.text.count("malformed document k") == documents.MAX_READ_WARNINGS
  assert "only counted" in caplog.text and "unreadable document u" in caplog.text
  assert log.counts == {"malformed": 3 * documents.MAX_READ_WARNINGS, "unreadable": 1}
