"""The grain pipeline: packing keeps every byte exactly once, worker processes lose nothing, data
shards make the same global batches on any number of processes, weighted mixtures."""

import json

import os
import pathlib
import tempfile

import ml_collections
import numpy as np
import pytest

from bltjax.data import documents, mixture, pipeline, sources
from bltjax.data import shards as shards_lib
from bltjax.train import batch as batch_lib, experiment


@pytest.fixture
def corpus():
  """23 small documents at a fixed path. Documents are held out by a hash of their path, so a
  corpus under pytest's numbered tmp_path would split differently on every run (and now and then
  leave a data shard without held-out documents)."""
  root = pathlib.Path(tempfile.gettempdir()) / f"bltjax-test-corpus-{os.getuid()}"
  root.mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(23):
    n = int(rng.integers(0, 300))
    data = bytes(rng.integers(0, 256, n, dtype=np.uint8)) if i % 3 else b"x" * n
    path = root / f"doc{i:02d}.txt"
    if not path.exists() or path.read_bytes() != data:
      tmp = root / f".doc{i:02d}.{os.getpid()}.tmp"
      tmp.write_bytes(data)
      os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
  return root


def data_cfg(corpus, seq_len=64, **kw):
  return ml_collections.ConfigDict(dict(
      source="text", paths=(str(corpus / "*.txt"),), text_field="text", seq_len=seq_len,
      eval_fraction=0.0, shards=0, num_workers=0, worker_buffer=2, prefetch=2, read_threads=1,
      read_buffer=4, host_hash_ids=False, preprocessed_dir=None, mixture=(),
      shuffle_window=8, max_document_bytes=documents.MAX_DOCUMENT_BYTES) | kw)


def window_tokens(example):
  """The packed window w (x plus the last target), and which of its positions are real."""
  w = np.concatenate([example["tokens"], example["targets"][-1:]])
  real = np.concatenate([[True], example["mask"] > 0])
  return w, real


def test_packing_keeps_every_byte_exactly_once_in_order(corpus):
  d = data_cfg(corpus)
  docs = shards_lib.tokenized_documents(d, "train", seed=3, process_index=0, process_count=1,
                                      shuffle=True, num_epochs=1)
  stream = np.concatenate([doc["tokens"] for doc in docs])
  windows = list(pipeline.packed_rows(d, "train", seed=3, process_index=0, process_count=1,
                                         shuffle=True, num_epochs=1))
  assert all(len(w["tokens"]) == d.seq_len for w in windows)
  packed = np.concatenate([w[real] for w, real in map(window_tokens, windows)])
  np.testing.assert_array_equal(packed, stream)
  # Inputs and targets are the same window shifted by one.
  for w in windows:
    np.testing.assert_array_equal(w["tokens"][1:], w["targets"][:-1])
  # One epoch then the next: a different (seeded) document order, same bytes.
  two = shards_lib.tokenized_documents(d, "train", seed=3, process_index=0, process_count=1,
                                     shuffle=True, num_epochs=2)
  second = np.concatenate([two[i]["tokens"] for i in range(len(docs), 2 * len(docs))])
  assert sorted(second.tolist()) == sorted(stream.tolist())
  assert not np.array_equal(second, stream)


def jsonl_corpus(root, files=6, docs=12, char="j"):
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(len(str(root)))
  for f in range(files):
    lines = [json.dumps({"text": char * int(rng.integers(1, 120))}) for _ in range(docs)]
    (root / f"{f}.jsonl").write_text("\n".join(lines) + "\n")
  return str(root / "*.jsonl")


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_worker_processes_yield_every_element_once(corpus, kind):
  d = data_cfg(corpus, seq_len=32)
  if kind == "jsonl":
    d.update(source="jsonl", paths=(jsonl_corpus(corpus / "j"),))
  cfg = ml_collections.ConfigDict(dict(data=d, seed=0, model_type="entropy_model"))
  all_docs = np.concatenate([doc["tokens"] for doc in shards_lib.tokenized_documents(
      d, "train", seed=0, process_index=0, process_count=1, shuffle=False, num_epochs=1)])
  ds = pipeline.make_dataset(cfg, "train", local_batch_size=4, patch=None, num_workers=2,
                             num_epochs=1)
  rows = [{k: v[r] for k, v in batch.items()} for batch in ds for r in range(len(batch["mask"]))]
  got = np.concatenate([w[real] for w, real in map(window_tokens, rows) if real.any()])
  # Each worker packs its own documents, so order differs; the multiset of bytes must not.
  assert np.array_equal(np.sort(got[got > 0]), np.sort(all_docs[all_docs > 0]))
  assert len(got[got == 0]) == len(all_docs[all_docs == 0])


def test_processes_read_disjoint_documents(corpus):
  d = data_cfg(corpus)
  keys = []
  for p in range(3):
    docs = shards_lib.tokenized_documents(d, "train", seed=0, process_index=p, process_count=3,
                                        shuffle=False, num_epochs=1)
    keys.append({doc["tokens"].tobytes() for doc in docs})
  assert not (keys[0] & keys[1]) and not (keys[1] & keys[2]) and not (keys[0] & keys[2])


def test_document_flags_are_counted(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"ok text")
  (tmp_path / "b.txt").write_bytes(b"bad \xff\xfe utf8")
  (tmp_path / "c.txt").write_bytes(b"nul\x00byte")
  d = data_cfg(tmp_path, seq_len=16)
  cfg = ml_collections.ConfigDict(dict(data=d, seed=0, model_type="entropy_model"))
  ds = pipeline.make_dataset(cfg, "train", local_batch_size=2, patch=None, num_epochs=1)
  totals = {}
  for batch in ds:
    for k, v in batch_lib.host_stats(batch).items():
      totals[k] = totals.get(k, 0) + v
  assert totals["invalid_utf8_docs"] == 1 and totals["nul_docs"] == 1


def test_sources_report_invalid_kind():
  with pytest.raises(ValueError, match="arrayrecord"):
    sources.build_source("csv", ("x",))


def test_same_global_batches_on_one_or_two_processes(tmp_path):
  d = data_cfg(tmp_path, source="jsonl", paths=(jsonl_corpus(tmp_path / "j", files=5),),
               shards=2, eval_fraction=0.1)
  cfg = ml_collections.ConfigDict(dict(data=d, seed=4, model_type="entropy_model"))
  one = iter(pipeline.make_dataset(cfg, "train", local_batch_size=4, process_index=0,
                                   process_count=1))
  two = [iter(pipeline.make_dataset(cfg, "train", local_batch_size=2, process_index=p,
                                    process_count=2)) for p in range(2)]
  for _ in range(12):  # past the end of the first epoch
    a, parts = next(one), [next(it) for it in two]
    for k in a:
      np.testing.assert_array_equal(a[k], np.concatenate([p[k] for p in parts]))


def mixture_cfg(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # relative paths: the held-out split does not depend on tmp_path
  d = data_cfg(tmp_path, seq_len=32, eval_fraction=0.2, mixture=(
      dict(name="aa", source="jsonl", paths=("a/*.jsonl",), weight=3.0, text_field="text"),
      dict(name="bb", source="text", paths=("b/*.txt",), weight=1.0)),
      source="stdlib", paths=())
  jsonl_corpus(tmp_path / "a", char="a")
  (tmp_path / "b").mkdir()
  for i in range(20):
    (tmp_path / "b" / f"{i}.txt").write_text("b" * (10 + 7 * i))
  return ml_collections.ConfigDict(dict(data=d, seed=0, model_type="entropy_model"))


def row_source(tokens):
  """Which component a row's bytes came from ('a' or 'b' documents)."""
  letters = set(tokens[tokens >= 4].tolist()) - {ord("\n") + 4}
  assert len(letters) == 1, letters
  return chr(letters.pop() - 4)


def test_mixture_mixes_rows_by_weight_and_restores(tmp_path, monkeypatch):
  cfg = mixture_cfg(tmp_path, monkeypatch)
  ds = pipeline.make_dataset(cfg, "train", local_batch_size=4)
  it = iter(ds)
  batches = [next(it) for _ in range(100)]
  sources_ = [row_source(row) for b in batches for row in b["tokens"]]
  assert abs(sources_.count("a") / len(sources_) - 0.75) < 0.02
  # Resuming from a saved state gives the same batches.
  it = iter(ds)
  for _ in range(37):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  resumed = iter(ds)
  resumed.set_state(state)
  for b in batches[37:60]:
    got = next(resumed)
    for k in b:
      np.testing.assert_array_equal(b[k], got[k])


def test_per_source_evaluation(tmp_path, monkeypatch):
  cfg = mixture_cfg(tmp_path, monkeypatch)
  assert pipeline.source_names(cfg.data) == ["aa", "bb"]
  assert pipeline.source_names(data_cfg(tmp_path)) == ["text"]  # a single source: its kind
  for name, char in (("aa", "a"), ("bb", "b")):
    it = iter(pipeline.make_dataset(cfg, "eval", local_batch_size=2, source=name))
    assert {row_source(row) for _ in range(5) for row in next(it)["tokens"]} == {char}
  both = iter(pipeline.make_dataset(cfg, "eval", local_batch_size=2))
  assert {row_source(row) for _ in range(10) for row in next(both)["tokens"]} == {"a", "b"}
  with pytest.raises(ValueError, match="'cc' is not a data.mixture component"):
    pipeline.make_dataset(cfg, "eval", local_batch_size=2, source="cc")


@pytest.mark.parametrize("change, message", [
    (dict(weight=0.0), r"data.mixture\[1\].weight=0.0 must be a finite number > 0"),
    (dict(weight=-1), r"data.mixture\[1\].weight=-1"),
    (dict(source="csv"), r"data.mixture\[1\].source='csv' is unknown"),
    (dict(paths=()), r"data.mixture\[1\].paths is required"),
    (dict(name="aa"), r"data.mixture\[1\].name='aa' is a duplicate"),
    (dict(name="a/b"), r"data.mixture\[1\].name='a/b'"),
    (dict(colour="red"), r"data.mixture\[1\] has unknown field"),
])
def test_mixture_errors_name_the_field(tmp_path, monkeypatch, change, message):
  cfg = mixture_cfg(tmp_path, monkeypatch)
  entries = [dict(e) for e in cfg.data.mixture]
  entries[1].update(change)
  cfg.data.mixture = tuple(entries)
  with pytest.raises(ValueError, match=message):
    mixture.components(cfg.data)
  with pytest.raises(ValueError, match=message):
    pipeline.make_dataset(cfg, "train", local_batch_size=2)


def test_config_validation_checks_the_mixture():
  cfg = experiment.load("experiments/debug.py")
  cfg.data.mixture = (dict(name="web", source="jsonl", paths=("x.jsonl",), weight=1.0),)
  with pytest.raises(ValueError, match=r"invalid config: data.mixture\[0\].text_field is missing"):
    experiment.validate(cfg, None)
  cfg.data.mixture = ()
  cfg.data.shuffle_window = 0
  with pytest.raises(ValueError, match="data.shuffle_window=0"):
    experiment.validate(cfg, None)
  stage = experiment.entropy_stage_config(experiment.load("experiments/debug.py"))
  assert stage.data.mixture == () and stage.data.shuffle_window >= 1


def test_arrayrecord_shards_read_their_files(tmp_path, monkeypatch):
  from array_record.python import array_record_module
  monkeypatch.chdir(tmp_path)  # relative keys: the split does not depend on tmp_path
  for f in range(5):
    writer = array_record_module.ArrayRecordWriter(f"{f}.arrayrecord", "group_size:1")
    for i in range(8):
      writer.write(f"{f}:{i}".encode())
    writer.close()
  d = data_cfg(tmp_path, source="arrayrecord", paths=("*.arrayrecord",), eval_fraction=0.25)
  seen = {}
  for split in ("train", "eval"):
    for s in range(2):
      docs = shards_lib.tokenized_documents(d, split, seed=0, process_index=s, process_count=2,
                                          shuffle=split == "train", num_epochs=1)
      texts = [bytes((doc["tokens"][1:-1] - 4).astype(np.uint8)).decode() for doc in docs]
      assert {int(t.split(":")[0]) % 2 for t in texts} == {s}  # files s, s + 2, ...
      seen[split] = seen.get(split, []) + texts
  assert sorted(seen["train"] + seen["eval"]) == sorted(f"{f}:{i}" for f in range(5)
                                                        for i in range(8))
  held = sorted(t for t in seen["train"] + seen["eval"]
                if documents.held_out(f"{t.split(':')[0]}.arrayrecord:{t.split(':')[1]}", 0.25))
  assert sorted(seen["eval"]) == held


def test_shards_must_divide_across_processes():
  d = ml_collections.ConfigDict(dict(shards=3))
  assert shards_lib.data_shards(d, 1, 3) == [1]
  d.shards = 4
  assert shards_lib.data_shards(d, 1, 2) == [2, 3]
  d.shards = 3
  with pytest.raises(ValueError, match="data.shards=3 is not a multiple of the 2 processes"):
    shards_lib.data_shards(d, 0, 2)
