"""Random-access document sources, the held-out split and DocumentToTokens."""

import json
import os
import pickle

from array_record.python import array_record_module
import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bltjax import tokenizer
from bltjax.data import sources
from bltjax.data.sources import Document


@pytest.fixture(scope="module")
def stdlib():
  return sources.StdlibSource()


def test_stdlib_source(stdlib):
  assert len(stdlib) > 300
  keys = [stdlib.key(i) for i in range(len(stdlib))]
  other = sources.StdlibSource()
  assert keys == sorted(keys) == [other.key(i) for i in range(len(other))]
  for key in keys:
    parts = key.split("/")
    assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), key
    assert parts[-1].endswith(".py") and not parts[-1].startswith("test_"), key
  i = keys.index("os.py")
  with open(os.__file__, "rb") as f:
    assert stdlib[i] == Document(f.read(), None)
  assert stdlib[-1] == stdlib[len(stdlib) - 1]
  with pytest.raises(IndexError):
    stdlib[len(stdlib)]
  assert "stdlib" in repr(stdlib) and stdlib.name.startswith("stdlib")


def test_text_files_source(tmp_path):
  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "a" / "one.txt").write_bytes(b"one")
  (tmp_path / "a" / "b" / "two.txt").write_bytes(b"two\x00\xff")
  (tmp_path / "a" / "b" / "empty.txt").write_bytes(b"")
  os.symlink(tmp_path / "missing", tmp_path / "a" / "broken.txt")
  (tmp_path / "other.md").write_bytes(b"not matched")
  src = sources.TextFilesSource([str(tmp_path / "a" / "**" / "*.txt")])
  assert [src.key(i) for i in range(len(src))] == [
      str(tmp_path / "a" / "b" / "two.txt"), str(tmp_path / "a" / "one.txt")]
  assert src[0] == Document(b"two\x00\xff", None) and src[1] == Document(b"one", None)
  assert src.index_stats == {"unreadable_files": 1, "empty_files": 1, "blank_lines": 0}

  (tmp_path / "a" / "one.txt").unlink()  # Unreadable after indexing.
  assert src[1] == Document(b"", "unreadable")

  pattern = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(ValueError, match="nothing"):
    sources.TextFilesSource([str(tmp_path / "a" / "*.txt"), pattern])


def write_jsonl(path, lines):
  path.write_text("".join(line + "\n" for line in lines))


def test_jsonl_source(tmp_path):
  write_jsonl(tmp_path / "a.jsonl", [
      json.dumps({"text": "héllo", "id": 1}),
      "",
      "{not json",
      json.dumps({"body": "no text field"}),
      json.dumps({"text": 5}),
      json.dumps({"text": ""}),
      json.dumps(["a", "list"]),
      "   ",
      json.dumps({"text": "\udcff"}),  # Lone surrogate: the tokenizer maps it to byte 0xff.
  ])
  write_jsonl(tmp_path / "b.jsonl", [json.dumps({"text": "second file"})])
  src = sources.JsonlSource(str(tmp_path / "*.jsonl"))
  assert len(src) == 8
  assert src.index_stats == {"unreadable_files": 0, "empty_files": 0, "blank_lines": 2}
  assert [src[i] for i in range(len(src))] == [
      Document("héllo".encode(), None),
      Document(b"", "malformed"),
      Document(b"", "malformed"),
      Document(b"", "malformed"),
      Document(b"", "empty"),
      Document(b"", "malformed"),
      Document(b"\xff", None),
      Document(b"second file", None),
  ]
  assert src.key(0) == f"{tmp_path / 'a.jsonl'}:1"
  assert src.key(1) == f"{tmp_path / 'a.jsonl'}:3"
  assert src.key(7) == f"{tmp_path / 'b.jsonl'}:1"

  custom = sources.JsonlSource([str(tmp_path / "a.jsonl")], text_field="body")
  assert custom[2] == Document(b"no text field", None)
  assert custom[0] == Document(b"", "malformed")


def test_jsonl_empty_file_counted(tmp_path):
  (tmp_path / "empty.jsonl").write_bytes(b"")
  write_jsonl(tmp_path / "full.jsonl", [json.dumps({"text": "x"})])
  src = sources.JsonlSource(str(tmp_path / "*.jsonl"))
  assert len(src) == 1 and src.index_stats["empty_files"] == 1


def write_parquet(tmp_path):
  pq.write_table(pa.table({"text": ["a", None, "ccc", "", "e"], "n": list(range(5))}),
                 tmp_path / "0.parquet", row_group_size=2)
  pq.write_table(pa.table({"text": ["f", "gg", "h"]}), tmp_path / "1.parquet", row_group_size=1)


def test_parquet_source(tmp_path):
  write_parquet(tmp_path)
  src = sources.ParquetSource(str(tmp_path / "*.parquet"))
  assert len(src) == 8
  assert [src[i] for i in range(len(src))] == [
      Document(b"a", None), Document(b"", "empty"), Document(b"ccc", None),
      Document(b"", "empty"), Document(b"e", None), Document(b"f", None),
      Document(b"gg", None), Document(b"h", None)]
  assert src.key(4) == f"{tmp_path / '0.parquet'}:4"
  assert src.key(6) == f"{tmp_path / '1.parquet'}:1"
  assert src[3] == Document(b"", "empty")  # Random access after sequential reads.
  assert src[0] == Document(b"a", None)


def test_parquet_bytes_column_and_errors(tmp_path):
  pq.write_table(pa.table({"body": pa.array([b"\xff\x00", b"ok"], pa.binary())}),
                 tmp_path / "b.parquet")
  src = sources.ParquetSource(str(tmp_path / "b.parquet"), text_column="body")
  assert src[0] == Document(b"\xff\x00", None) and src[1] == Document(b"ok", None)
  with pytest.raises(ValueError, match=r"b\.parquet.*'text'.*\['body'\]"):
    sources.ParquetSource(str(tmp_path / "b.parquet"))
  pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
  with pytest.raises(ValueError, match="ints.parquet.*int64"):
    sources.ParquetSource(str(tmp_path / "ints.parquet"))


def write_arrayrecord(path, records):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def test_arrayrecord_source(tmp_path):
  write_arrayrecord(tmp_path / "0.arrayrecord", [b"first", b"", b"\xff\x00"])
  write_arrayrecord(tmp_path / "1.arrayrecord", [b"fourth"])
  src = sources.ArrayRecordSource(str(tmp_path / "*.arrayrecord"))
  assert [src[i] for i in range(len(src))] == [
      Document(b"first", None), Document(b"", "empty"), Document(b"\xff\x00", None),
      Document(b"fourth", None)]
  assert src.key(3) == f"{tmp_path / '1.arrayrecord'}:0"
  (tmp_path / "junk.arrayrecord").write_bytes(b"junk")
  with pytest.raises(ValueError, match="junk.arrayrecord"):
    sources.ArrayRecordSource(str(tmp_path / "junk.arrayrecord"))


def test_sources_pickle(tmp_path, stdlib):
  (tmp_path / "t.txt").write_bytes(b"text")
  write_jsonl(tmp_path / "j.jsonl", [json.dumps({"text": "json"})])
  write_parquet(tmp_path)
  write_arrayrecord(tmp_path / "r.arrayrecord", [b"record"])
  built = [
      stdlib,
      sources.build_source("text", [str(tmp_path / "*.txt")]),
      sources.build_source("jsonl", [str(tmp_path / "*.jsonl")]),
      sources.build_source("parquet", [str(tmp_path / "*.parquet")]),
      sources.build_source("arrayrecord", [str(tmp_path / "*.arrayrecord")]),
  ]
  for src in built:
    first = src[0]  # Fills caches/readers, which must not be pickled.
    copy = pickle.loads(pickle.dumps(src))
    assert len(copy) == len(src) and copy.key(0) == src.key(0)
    assert copy[0] == first and copy.index_stats == src.index_stats
    assert repr(copy) == repr(src)


def test_build_source_errors():
  with pytest.raises(ValueError, match="stdlib, text, jsonl, parquet, arrayrecord"):
    sources.build_source("csv")
  with pytest.raises(ValueError, match="data.paths is required"):
    sources.build_source("jsonl")
  with pytest.raises(ValueError, match="no data.paths"):
    sources.build_source("stdlib", ["x"])
  with pytest.raises(ValueError, match="text_field"):
    sources.build_source("text", ["x"], text_field="body")


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
  train, evals = sources.split_indices(src, 0.1)
  assert not set(train) & set(evals)
  assert np.array_equal(np.sort(np.concatenate([train, evals])), np.arange(2000))
  assert 120 < len(evals) < 280
  again = sources.split_indices(KeySource(2000), 0.1)
  assert np.array_equal(again[0], train) and np.array_equal(again[1], evals)
  # The split of a document depends on its key only.
  assert set(sources.split_indices(KeySource(1000), 0.1)[1]) == set(evals[evals < 1000])

  train, evals = sources.split_indices(src, 0.0)
  assert len(evals) == 0 and len(train) == 2000
  for bad in (-0.1, 1.0, float("nan")):
    with pytest.raises(ValueError, match="eval_fraction"):
      sources.split_indices(src, bad)


def test_split_indices_tiny_sources():
  train, evals = sources.split_indices(KeySource(3), 1e-9)
  assert len(evals) == 1 and len(train) == 2
  hashes = [sources._key_hash(f"doc-{i}") for i in range(3)]
  assert evals[0] == int(np.argmin(hashes))
  train, evals = sources.split_indices(KeySource(2), 0.999999)
  assert len(evals) == 1 and len(train) == 1
  train, evals = sources.split_indices(KeySource(1), 0.5)
  assert len(train) + len(evals) == 1


def test_document_to_tokens():
  to_tokens = sources.DocumentToTokens()
  out = to_tokens.map(Document(b"hi", None))
  assert out["tokens"].dtype == np.int32 and out["doc_flags"].dtype == np.int8
  np.testing.assert_array_equal(
      out["tokens"], [tokenizer.BOS_ID, ord("h") + 4, ord("i") + 4, tokenizer.EOS_ID])
  np.testing.assert_array_equal(out["doc_flags"], [0, 0, 0, 0])

  cases = {
      Document(b"\xff\xfe", None): sources.FLAG_INVALID_UTF8,
      Document(b"a\x00b", None): sources.FLAG_NUL,
      Document(b"\xff\x00", None): sources.FLAG_INVALID_UTF8 | sources.FLAG_NUL,
      Document(b"", "empty"): sources.FLAG_EMPTY,
      Document(b"", "unreadable"): sources.FLAG_UNREADABLE,
      Document(b"", "malformed"): sources.FLAG_UNREADABLE,
  }
  for doc, flags in cases.items():
    out = to_tokens.map(doc)
    np.testing.assert_array_equal(out["tokens"], tokenizer.encode(doc.data))
    assert out["doc_flags"][0] == flags and not out["doc_flags"][1:].any(), doc
  with pytest.raises(ValueError, match="problem"):
    to_tokens.map(Document(b"", "lost"))

  batch = np.stack([np.pad(to_tokens.map(doc)["doc_flags"], (0, 4))[:4] for doc in cases])
  assert sources.count_flags(batch) == {
      "invalid_utf8_docs": 2, "nul_docs": 2, "empty_docs": 1, "unreadable_docs": 2}
  assert sources.count_flags(np.zeros((2, 3, 5), np.int8)) == {
      "invalid_utf8_docs": 0, "nul_docs": 0, "empty_docs": 0, "unreadable_docs": 0}


def test_grain_pipeline(tmp_path):
  write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": "ab"}), json.dumps({"text": "c"})])
  src = sources.build_source("jsonl", [str(tmp_path / "d.jsonl")])
  ds = grain.MapDataset.source(src).map(sources.DocumentToTokens())
  assert len(ds) == 2
  np.testing.assert_array_equal(ds[0]["tokens"], tokenizer.encode(b"ab"))
  elements = list(ds.to_iter_dataset())
  np.testing.assert_array_equal(elements[1]["tokens"], tokenizer.encode(b"c"))
  assert not elements[1]["doc_flags"].any()
