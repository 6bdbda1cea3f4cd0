"""Streamed JSONL/Parquet documents: file shards, on-the-fly split, checkpointable positions."""

import json
import logging
import pickle
import tracemalloc

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bltjax.data import documents, formats, pipeline, streams
from bltjax.data import shards as shards_lib
from bltjax.data.documents import Document


def data_cfg(pattern, source="jsonl", **kw):
  return ml_collections.ConfigDict(dict(
      source=source, paths=(pattern,), text_field="text", seq_len=32, eval_fraction=0.2,
      shards=0, num_workers=0, worker_buffer=2, prefetch=2, read_threads=1, read_buffer=4,
      host_hash_ids=False, preprocessed_dir=None, mixture=(), shuffle_window=4,
      max_document_bytes=documents.MAX_DOCUMENT_BYTES) | kw)


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
  """Relative paths: document keys, and so the held-out split, do not depend on tmp_path."""
  monkeypatch.chdir(tmp_path)


def write_corpus(tmp_path, kind, files=7, docs=(3, 9)):
  """Files of distinct documents 'f<file>d<doc>...' (docs per file in range `docs`); returns
  the relative glob pattern and the texts."""
  rng = np.random.default_rng(0)
  texts = []
  for f in range(files):
    rows = [f"f{f}d{d}" + "x" * int(rng.integers(0, 20)) for d in range(rng.integers(*docs))]
    texts += rows
    path = tmp_path / f"{f:02d}.{kind}"
    if kind == "jsonl":
      path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    else:
      pq.write_table(pa.table({"text": rows}), path, row_group_size=3)
  return f"*.{kind}", texts


def texts_of(docs):
  return [bytes((np.asarray(d["tokens"][1:-1]) - 4).astype(np.uint8)).decode() for d in docs]


def stream(files, kind="jsonl", **kw):
  args = dict(text_field="text", split="train", eval_fraction=0.0, seed=0, shard=0,
              shuffle=False, window=1, num_epochs=1, name="test")
  return streams.DocumentStream(kind, files, **(args | kw))


def test_jsonl_documents(tmp_path, caplog):
  lines = [json.dumps({"text": "héllo", "id": 1}), "", "{not json",
           json.dumps({"body": "no text field"}), json.dumps({"text": 5}), json.dumps({"text": ""}),
           json.dumps(["a", "list"]), "   ", json.dumps({"text": "\udcff"})]
  (tmp_path / "a.jsonl").write_text("".join(line + "\n" for line in lines))
  (tmp_path / "b.jsonl").write_text(json.dumps({"text": "second file"}))  # no final newline
  (tmp_path / "c.jsonl").write_bytes(b"")
  files = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl")]
  with caplog.at_level(logging.INFO):
    docs = list(stream(files))
  assert docs == [
      Document("héllo".encode(), None), Document(b"", "malformed"), Document(b"", "malformed"),
      Document(b"", "malformed"), Document(b"", "empty"), Document(b"", "malformed"),
      Document(b"\xff", None), Document(b"second file", None)]
  assert "2 blank lines and 1 empty files" in caplog.text
  keys = [key for key, raw, _ in formats.make("jsonl", "text", None).read(files[0], formats.START)
          if raw is not formats.BLANK]
  assert keys[:2] == [f"{files[0]}:1", f"{files[0]}:3"]  # 1-based, blank lines counted
  assert list(stream(files[:1], text_field="body"))[2] == Document(b"no text field", None)


def test_parquet_documents(tmp_path):
  pq.write_table(pa.table({"text": ["a", None, "ccc", "", "e"], "n": list(range(5))}),
                 tmp_path / "0.parquet", row_group_size=2)
  pq.write_table(pa.table({"text": ["f", "gg", "h"]}), tmp_path / "1.parquet", row_group_size=1)
  pq.write_table(pa.table({"body": pa.array([b"\xff\x00", b"ok"], pa.binary())}),
                 tmp_path / "b.parquet")
  files = [str(tmp_path / f"{i}.parquet") for i in (0, 1)]
  assert list(stream(files, "parquet")) == [  # null: as a JSON null, malformed
      Document(b"a", None), Document(b"", "malformed"), Document(b"ccc", None),
      Document(b"", "empty"), Document(b"e", None), Document(b"f", None),
      Document(b"gg", None), Document(b"h", None)]
  keys = [key for key, _, _ in formats.make("parquet", "text", None).read(files[0], [1, 1])]
  assert keys == [f"{files[0]}:3", f"{files[0]}:4"]  # row group 1, row 1 = row 3 of the file
  binary = str(tmp_path / "b.parquet")
  assert list(stream([binary], "parquet", text_field="body")) == [
      Document(b"\xff\x00", None), Document(b"ok", None)]
  with pytest.raises(ValueError, match=r"b\.parquet.*'text'.*\['body'\]"):
    list(stream([binary], "parquet"))
  pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
  with pytest.raises(ValueError, match="ints.parquet.*int64"):
    list(stream([str(tmp_path / "ints.parquet")], "parquet"))
  (tmp_path / "junk.parquet").write_bytes(b"junk")  # unreadable: one counted document
  assert list(stream([str(tmp_path / "junk.parquet")], "parquet")) == [
      Document(b"", "unreadable")]


def test_long_lines_are_read_boundedly(tmp_path):
  """A JSONL line longer than line_limit is never held whole: its head is kept, the rest skipped
  (and the offsets still restart at the next line)."""
  long_text = "é" * 50_000 + "tail"
  lines = [json.dumps({"text": "a"}), json.dumps({"id": 7, "text": long_text}),
           json.dumps({"text": "b" * 300}), json.dumps({"meta": "m" * (20 << 20), "text": "lost"}),
           json.dumps({"text": "\\" * 40_000}), json.dumps({"text": "last"})]
  path = tmp_path / "long.jsonl"
  path.write_text("\n".join(lines))  # no final newline
  fmt = formats.make("jsonl", "text", documents.ProblemLog("t"), max_bytes=101)
  assert formats.line_limit(101) < 70_000 < len(lines[1])
  tracemalloc.start()
  items = list(fmt.read(str(path), formats.START))
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 4 << 20  # the 20 MiB line is never held: a chunk and a cut head
  assert [pos for _, _, pos in items][-1] == [path.stat().st_size, 6]
  docs = [fmt.decode(raw, key) for key, raw, _ in items]
  assert docs == [
      Document(b"a", None),
      # Cut inside 'é' (2 bytes) at byte 101: the prefix ends mid-character, as cut.
      Document(long_text.encode()[:101], "oversized"),
      Document(b"b" * 101, "oversized"),  # parsed whole, then cut
      Document(b"", "oversized"),  # the text field comes after the cut
      Document(b"\\" * 101, "oversized"), Document(b"last", None)]
  # Restarting after the long line reads the next one.
  key, raw, _ = next(fmt.read(str(path), items[1][2]))
  assert key == f"{path}:3" and fmt.decode(raw, key) == Document(b"b" * 101, "oversized")


def test_lines_reader_on_chunk_boundaries(monkeypatch):
  import io
  monkeypatch.setattr(formats, "_CHUNK", 3)
  data = b"ab\n\ncdefgh\nij\nklmnopqrstu\nvw"
  lines = formats._Lines(io.BytesIO(data), 6)
  got = []
  while (line := lines.next()) is not None:
    got.append((bytes(line), getattr(line, "size", len(line))))
  assert got == [(b"ab\n", 3), (b"\n", 1), (b"cdefgh\n", 7), (b"ij\n", 3),
                 (b"klmnop", 12), (b"vw", 2)]
  assert sum(size for _, size in got) == len(data)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_shards_read_their_files_and_every_document_once_per_epoch(tmp_path, kind):
  pattern, texts = write_corpus(tmp_path, kind, docs=(6, 12))
  d = data_cfg(pattern, kind, eval_fraction=0.3)
  seen, per_split = [], {}
  for split in ("train", "eval"):
    for s in range(3):
      docs = texts_of(shards_lib.tokenized_documents(
          d, split, seed=1, process_index=s, process_count=3, shuffle=True, num_epochs=2))
      half = len(docs) // 2
      first, second = docs[:half], docs[half:]
      assert sorted(first) == sorted(second)
      assert split == "eval" or first != second  # a new order per epoch
      # Shard s reads files s, s + 3, ...: documents are named 'f<file>d...'.
      assert all(int(t[1:t.index("d")]) % 3 == s for t in first)
      seen += first
      per_split.setdefault(split, []).extend(first)
  assert sorted(seen) == sorted(texts)
  assert 0 < len(per_split["eval"]) < len(per_split["train"])
  # The split is the key hash, the same as for the random-access sources.
  want_eval = sorted(t for t in texts if documents.held_out(_key_of(tmp_path, kind, t), 0.3))
  assert sorted(per_split["eval"]) == want_eval


def _key_of(tmp_path, kind, text):
  f, d = text[1:].split("x")[0].split("d")
  line_or_row = int(d) + 1 if kind == "jsonl" else int(d)
  return f"{int(f):02d}.{kind}:{line_or_row}"


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_restored_iterator_continues_with_the_next_document(tmp_path, kind):
  pattern, _ = write_corpus(tmp_path, kind, files=3, docs=(5, 9))
  d = data_cfg(pattern, kind, eval_fraction=0.1, shuffle_window=4)
  docs = shards_lib.tokenized_documents(d, "train", seed=2, process_index=0, process_count=1,
                                      shuffle=True, num_epochs=3)
  full = texts_of(docs)
  states, it = [], iter(docs)
  for _ in range(len(full)):
    states.append(json.loads(json.dumps(it.get_state())))  # as the checkpoint stores it
    next(it)
  inner = [s["parent"] if "parent" in s else s for s in states]  # below DocumentToTokens' map
  assert any(s["epoch"] == 1 and s["file"] == 0 and s["block"] == 0 for s in inner)
  assert any(s["pos"] != [0, 0] and s["index"] > 0 for s in inner)  # mid-file, mid-window
  if kind == "parquet":
    assert any(s["pos"][1] > 0 for s in inner)  # mid-row-group
  for k in range(0, len(full), 3):
    it = iter(docs)
    it.set_state(states[k])
    assert texts_of(it) == full[k:], k


def test_iterator_memory_does_not_grow_with_documents(tmp_path):
  sizes = {}
  for n in (40, 8000):
    root = tmp_path / str(n)
    root.mkdir()
    for f in range(2):
      (root / f"{f}.jsonl").write_text(
          "".join(json.dumps({"text": f"{i}" + "y" * 500}) + "\n" for i in range(n // 2)))
    ds = stream([str(root / "0.jsonl"), str(root / "1.jsonl")], window=16, shuffle=True)
    tracemalloc.start()
    it = iter(ds)
    count = sum(1 for _ in it)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == n
    sizes[n] = (len(pickle.dumps(ds)), len(json.dumps(it.get_state())), peak)
  (ds_small, state_small, _), (ds_big, state_big, peak_big) = sizes[40], sizes[8000]
  assert ds_big - ds_small < 16 and state_big - state_small < 16  # digits of the paths/offsets
  assert peak_big < 1_000_000  # a 4 MB corpus read through a window of 16 documents


def test_empty_split_raises_after_a_full_pass(tmp_path):
  pattern, _ = write_corpus(tmp_path, "jsonl", files=2, docs=(2, 3))
  d = data_cfg(pattern, eval_fraction=1e-12)
  docs = shards_lib.tokenized_documents(d, "eval", seed=0, process_index=0, process_count=1,
                                      shuffle=False)
  with pytest.raises(ValueError, match=r"eval split is empty after a full pass.*2 files"):
    next(iter(docs))


def test_a_shard_without_files_is_an_error(tmp_path):
  pattern, _ = write_corpus(tmp_path, "parquet", files=2)
  d = data_cfg(pattern, "parquet", shards=3)
  with pytest.raises(ValueError, match=r"shard 2 of 3 gets no file.*2 file\(s\).*data.shards=3"):
    pipeline.packed_rows(d, "train", seed=0, process_index=2, process_count=3, shuffle=True)
