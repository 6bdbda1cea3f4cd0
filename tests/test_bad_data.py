"""Every kind of bad input is counted in the training metrics, exactly once, and nothing is lost
silently: a corpus with one document of each kind goes through `pipeline.make_dataset` (the
train split, in-process) and the summed `batch.host_stats` must be what was planted."""

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bltjax.data import flag_table, formats, pipeline
from bltjax.model import tokenizer
from bltjax.train import batch as batch_lib, experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, "experiments", "debug.py")
MAX = 101  # data.max_document_bytes here


def text_corpus(root):
  """One file per document."""
  (root / "ok.txt").write_bytes(b"plain text")
  (root / "utf8.txt").write_bytes(b"bad \xff\xfe utf8")
  (root / "nul.txt").write_bytes(b"nul\x00byte")
  (root / "empty.txt").write_bytes(b"")
  (root / "dir.txt").mkdir()  # Globs list files only: a directory is no document.
  (root / "swapped.txt").write_bytes(b"a directory by the time it is read")
  os.symlink(root / "missing", root / "broken.txt")
  big = ("0123456789" * 9 + "é" * 50).encode()  # 190 bytes, cut at 101: inside an 'é'
  (root / "big.txt").write_bytes(big)
  expected = dict(invalid_utf8=1, nul=1, empty=1, unreadable=2, malformed=0, oversized=1)
  return "*.txt", expected, 7, [big[:MAX]]


def jsonl_corpus(root):
  lines = [
      json.dumps({"text": "fine"}),
      "{not json",
      json.dumps(["not", "an", "object"]),
      json.dumps({"text": 5}),  # wrong type
      json.dumps({"body": "no text field"}),  # missing field
      json.dumps({"text": ""}),
      "",  # a blank line: no document (logged)
      json.dumps({"text": "\udcff"}),  # a lone surrogate: the byte 0xff, invalid UTF-8
      json.dumps({"text": "nul \x00"}),
      json.dumps({"text": "J" * 300}),  # oversized, parsed whole then cut
      json.dumps({"id": 1, "text": "L" * 70_000}),  # longer than a line is read: cut unparsed
  ]
  assert len(lines[-1]) > formats.line_limit(MAX)
  (root / "a.jsonl").write_text("\n".join(lines) + "\n")
  os.symlink(root / "missing", root / "broken.jsonl")  # one unreadable document
  expected = dict(invalid_utf8=1, nul=1, empty=1, unreadable=1, malformed=4, oversized=2)
  return "*.jsonl", expected, 11, [b"J" * MAX, b"L" * MAX]


def parquet_corpus(root):
  values = [b"fine", None, b"", b"P" * 300, b"\xff bad", b"nul\x00"]
  pq.write_table(pa.table({"text": pa.array(values, pa.binary())}), root / "p.parquet",
                 row_group_size=2)
  (root / "junk.parquet").write_bytes(b"junk")  # not Parquet: one unreadable document
  expected = dict(invalid_utf8=1, nul=1, empty=1, unreadable=1, malformed=1, oversized=1)
  return "*.parquet", expected, 7, [b"P" * MAX]


def epoch(cfg):
  """One epoch of the train split: summed flag counts and the packed id stream."""
  totals, stream = dict.fromkeys(flag_table.NAMES, 0), []
  ds = pipeline.make_dataset(cfg, "train", local_batch_size=2, num_workers=0, num_epochs=1)
  return ds, totals, stream


def consume(ds, totals, stream):
  for batch in ds:
    for name, count in batch_lib.host_stats(batch).items():
      totals[name] += count
    for tokens, targets, mask in zip(batch["tokens"], batch["targets"], batch["mask"]):
      window = np.concatenate([tokens, targets[-1:]])
      stream.append(window[np.concatenate([[True], mask > 0])])
  return totals, np.concatenate(stream)


@pytest.mark.parametrize("corpus,source", [(text_corpus, "text"), (jsonl_corpus, "jsonl"),
                                           (parquet_corpus, "parquet")])
def test_every_bad_document_is_counted_once(tmp_path, monkeypatch, caplog, corpus, source):
  monkeypatch.chdir(tmp_path)  # Relative keys: the same (all-train) split on every run.
  pattern, expected, documents, prefixes = corpus(tmp_path)
  cfg = experiment.tiny(experiment.load(DEBUG))
  cfg.data.update(source=source, paths=(pattern,), eval_fraction=0.0, seq_len=32,
                  max_document_bytes=MAX, shuffle_window=4)
  cfg.train.eval_batches = 0
  cfg.patching.update(mode="space", max_patches=16)  # no entropy stage to configure
  experiment.validate(cfg, None)
  with caplog.at_level(logging.WARNING):
    parts = epoch(cfg)
    if source == "text":  # Listed as a file, a directory when read: unreadable.
      (tmp_path / "swapped.txt").unlink()
      (tmp_path / "swapped.txt").mkdir()
    totals, ids = consume(*parts)
  assert totals == {f"{name}_docs": expected[name] for name in flag_table.FLAGS}
  # Every document, flagged or not, is one BOS ... EOS in the stream: none dropped.
  assert np.count_nonzero(ids == tokenizer.BOS_ID) == documents
  text = "".join(map(chr, ids))
  for prefix in prefixes:  # An oversized document keeps exactly its first MAX bytes.
    assert "".join(map(chr, tokenizer.encode(prefix))) in text
  # Each problem a reader met is logged (a bounded number of lines per kind).
  for problem in flag_table.PROBLEMS:
    if expected[problem]:
      assert f"{problem} document" in caplog.text, problem
  if expected["invalid_utf8"]:
    assert "flagged invalid_utf8" in caplog.text
