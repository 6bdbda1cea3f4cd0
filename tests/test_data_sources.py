"""Random-access document sources and path globbing (streamed JSONL/Parquet:
tests/test_streaming.py; the held-out split and DocumentToTokens: tests/test_documents.py)."""

import glob
import os
import pickle

from array_record.python import array_record_module
import grain
import numpy as np
import pytest

from bltjax.data import documents, paths, sources
from bltjax.data.documents import Document
from bltjax.model import tokenizer


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
  a = tmp_path / "a"
  # Nothing is stat'ed while listing: empty and unreadable files are flagged when read.
  assert [src.key(i) for i in range(len(src))] == [
      str(a / "b" / "empty.txt"), str(a / "b" / "two.txt"), str(a / "broken.txt"),
      str(a / "one.txt")]
  assert [src[i] for i in range(len(src))] == [
      Document(b"", "empty"), Document(b"two\x00\xff", None), Document(b"", "unreadable"),
      Document(b"one", None)]
  (a / "one.txt").unlink()  # Unreadable after listing.
  assert src[3] == Document(b"", "unreadable")

  pattern = str(tmp_path / "nothing" / "*.txt")
  with pytest.raises(ValueError, match="nothing"):
    sources.TextFilesSource([str(a / "*.txt"), pattern])


def test_expand_follows_glob(tmp_path):
  for rel in ("x.txt", "d/y.txt", "d/e/z.txt", "d/.hidden.txt", ".h/w.txt", "d/e/n.md"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(rel)
  (tmp_path / "dir.txt").mkdir()  # A directory whose name matches: not a file, not listed.
  for pattern in ("**/*.txt", "*.txt", "d/*.txt", "d/**", "*/e/*", "**", "d/e/z.txt", "?.txt",
                  "d/[xyz]*"):
    expected = sorted(p for p in glob.glob(str(tmp_path / pattern), recursive=True)
                      if not os.path.isdir(p))
    assert paths.expand(str(tmp_path / pattern)) == expected, pattern
  with pytest.raises(ValueError, match="matched no files"):
    paths.expand([str(tmp_path / "x.txt"), str(tmp_path / "none" / "*.txt")])
  with pytest.raises(ValueError, match="matched no files"):
    paths.expand(str(tmp_path / "d"))  # A literal directory is no file.


def write_arrayrecord(path, records):
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()


def test_arrayrecord_source(tmp_path):
  write_arrayrecord(tmp_path / "0.arrayrecord", [b"first", b"", b"\xff\x00"])
  write_arrayrecord(tmp_path / "1.arrayrecord", [b"fourth"])
  src = sources.build_source("arrayrecord", str(tmp_path / "*.arrayrecord"))
  assert [src[i] for i in range(len(src))] == [
      Document(b"first", None), Document(b"", "empty"), Document(b"\xff\x00", None),
      Document(b"fourth", None)]
  assert src.key(3) == f"{tmp_path / '1.arrayrecord'}:0"
  one = sources.ArrayRecordSource([str(tmp_path / "1.arrayrecord")])  # a shard's files only
  assert len(one) == 1 and one[0] == Document(b"fourth", None)
  (tmp_path / "junk.arrayrecord").write_bytes(b"junk")
  with pytest.raises(ValueError, match="junk.arrayrecord"):
    sources.ArrayRecordSource([str(tmp_path / "junk.arrayrecord")])


def test_sources_pickle(tmp_path, stdlib):
  (tmp_path / "t.txt").write_bytes(b"text")
  write_arrayrecord(tmp_path / "r.arrayrecord", [b"record"])
  built = [
      stdlib,
      sources.build_source("text", [str(tmp_path / "*.txt")]),
      sources.build_source("arrayrecord", [str(tmp_path / "*.arrayrecord")]),
  ]
  for src in built:
    first = src[0]  # Fills readers, which must not be pickled.
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
  with pytest.raises(ValueError, match="streamed"):
    sources.build_source("jsonl", ["x"])


def test_file_documents_are_cut_at_max_document_bytes(tmp_path, caplog):
  (tmp_path / "big.txt").write_bytes(b"0123456789" * 300)
  (tmp_path / "fits.txt").write_bytes(b"x" * 100)
  src = sources.TextFilesSource([str(tmp_path / "*.txt")], max_document_bytes=100)
  with caplog.at_level("WARNING"):
    assert src[0] == Document(b"0123456789" * 10, "oversized")
  assert "oversized" in caplog.text and "big.txt" in caplog.text
  assert src[1] == Document(b"x" * 100, None)
  assert pickle.loads(pickle.dumps(src))[0] == src[0]
  write_arrayrecord(tmp_path / "r.arrayrecord", [b"y" * 101, b"z"])
  records = sources.ArrayRecordSource([str(tmp_path / "r.arrayrecord")], max_document_bytes=100)
  assert [records[0], records[1]] == [Document(b"y" * 100, "oversized"), Document(b"z", None)]


def test_read_prefix_reads_at_most_one_byte_more():
  import io

  class Counting(io.BytesIO):
    read_bytes = 0

    def read(self, n=-1):
      assert n is not None and n >= 0, "never read to the end"
      out = super().read(n)
      self.read_bytes += len(out)
      return out

  f = Counting(b"a" * (5 << 20))
  assert sources.read_prefix(f, 3 << 20) == b"a" * ((3 << 20) + 1)
  assert f.read_bytes == (3 << 20) + 1
  assert sources.read_prefix(Counting(b"short"), 3 << 20) == b"short"


def test_grain_pipeline(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"ab")
  (tmp_path / "b.txt").write_bytes(b"c")
  src = sources.build_source("text", [str(tmp_path / "*.txt")])
  ds = grain.MapDataset.source(src).map(documents.DocumentToTokens())
  assert len(ds) == 2
  np.testing.assert_array_equal(ds[0]["tokens"], tokenizer.encode(b"ab"))
  elements = list(ds.to_iter_dataset())
  np.testing.assert_array_equal(elements[1]["tokens"], tokenizer.encode(b"c"))
  assert not elements[1]["doc_flags"].any()
