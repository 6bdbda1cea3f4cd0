"""The grain pipeline: packing keeps every byte exactly once, worker processes lose nothing,
patching of packed rows, and offline preprocessing gives the online batches."""

import ml_collections
import numpy as np
import pytest

from bltjax import configs, tokenizer
from bltjax.data import pipeline, sources
from bltjax.data.patcher import PatchBatch, document_starts
from bltjax.model.config import PatchingConfig


@pytest.fixture
def corpus(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(23):
    n = int(rng.integers(0, 300))
    data = bytes(rng.integers(0, 256, n, dtype=np.uint8)) if i % 3 else b"x" * n
    (tmp_path / f"doc{i:02d}.txt").write_bytes(data)
  return tmp_path


def data_cfg(corpus, seq_len=64, **kw):
  return ml_collections.ConfigDict(dict(
      source="text", paths=(str(corpus / "*.txt"),), text_field="text", seq_len=seq_len,
      eval_fraction=0.0, shards=0, num_workers=0, worker_buffer=2, prefetch=2, read_threads=1,
      read_buffer=4, host_hash_ids=False, preprocessed_dir=None) | kw)


def window_tokens(example):
  """The packed window w (x plus the last target), and which of its positions are real."""
  w = np.concatenate([example["tokens"], example["targets"][-1:]])
  real = np.concatenate([[True], example["mask"] > 0])
  return w, real


def test_packing_keeps_every_byte_exactly_once_in_order(corpus):
  d = data_cfg(corpus)
  docs = pipeline.tokenized_documents(d, "train", seed=3, process_index=0, process_count=1,
                                      shuffle=True, num_epochs=1)
  stream = np.concatenate([doc["tokens"] for doc in docs])
  windows = list(pipeline.packed_windows(d, "train", seed=3, process_index=0, process_count=1,
                                         shuffle=True, num_epochs=1))
  assert all(len(w["tokens"]) == d.seq_len for w in windows)
  packed = np.concatenate([w[real] for w, real in map(window_tokens, windows)])
  np.testing.assert_array_equal(packed, stream)
  # Inputs and targets are the same window shifted by one.
  for w in windows:
    np.testing.assert_array_equal(w["tokens"][1:], w["targets"][:-1])
  # One epoch then the next: a different (seeded) document order, same bytes.
  two = pipeline.tokenized_documents(d, "train", seed=3, process_index=0, process_count=1,
                                     shuffle=True, num_epochs=2)
  second = np.concatenate([two[i]["tokens"] for i in range(len(docs), 2 * len(docs))])
  assert sorted(second.tolist()) == sorted(stream.tolist())
  assert not np.array_equal(second, stream)


def test_worker_processes_yield_every_element_once(corpus):
  d = data_cfg(corpus, seq_len=32)
  cfg = ml_collections.ConfigDict(dict(data=d, seed=0, model_type="entropy_model"))
  all_docs = np.concatenate([doc["tokens"] for doc in pipeline.tokenized_documents(
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
    docs = pipeline.tokenized_documents(d, "train", seed=0, process_index=p, process_count=3,
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
    for k, v in pipeline.host_stats(batch).items():
      totals[k] = totals.get(k, 0) + v
  assert totals["invalid_utf8_docs"] == 1 and totals["nul_docs"] == 1


def test_packed_rows_patch_at_document_boundaries():
  bos, eos = tokenizer.BOS_ID, tokenizer.EOS_ID
  tokens = np.array([[70, 71, eos, bos, 80, 81, 82, eos, bos, 90]])
  starts = document_starts(tokens)
  assert starts.shape == (1, 11)
  assert sorted(np.flatnonzero(starts[0])) == [3, 4, 8, 9]  # BOS, after BOS, after EOS
  pc = PatchingConfig(mode="static", threshold=None, threshold_add=None, monotonic=False,
                      patch_size=100, max_patch_length=None)
  out = PatchBatch(pc, max_patches=8).map(dict(tokens=tokens))
  # Row start rule (0, 1) + document boundaries; the static patch never starts inside the row.
  np.testing.assert_array_equal(out["patch_lengths"][0], [1, 2, 1, 4, 1, 2, 0, 0])
  assert out["patch_overflow"][0] == 0


def test_overflowing_rows_are_merged_and_counted():
  tokens = np.full((1, 12), 70)
  pc = PatchingConfig(mode="byte", threshold=None, threshold_add=None, monotonic=False,
                      patch_size=None, max_patch_length=None)
  out = PatchBatch(pc, max_patches=5).map(dict(tokens=tokens))
  np.testing.assert_array_equal(out["patch_lengths"][0], [1, 1, 1, 1, 9])
  assert out["patch_overflow"][0] == 13 - 5


def test_preprocessed_rows_give_the_online_batches(tmp_path, corpus):
  from bltjax import preprocess
  cfg = configs.tiny(configs.load("experiments/debug.py"))
  cfg.data.update(source="text", paths=(str(corpus / "*.txt"),), seq_len=64, eval_fraction=0.1)
  cfg.model.encoder.attn_window = cfg.model.decoder.attn_window = 32
  cfg.patching.update(mode="space", max_patches=40)
  cfg.train.update(steps=3, batch_size=4, eval_batches=1)
  out = str(tmp_path / "pre")
  meta = preprocess.preprocess(cfg, out)
  assert meta["rows"] == {"train": 12, "eval": 4}
  patch, _ = __import__("bltjax.train", fromlist=["x"]).prepare_patching(cfg, None, None)
  online = iter(pipeline.make_dataset(cfg, "train", local_batch_size=4, patch=patch))
  cfg.data.preprocessed_dir = out
  offline = iter(pipeline.make_dataset(cfg, "train", local_batch_size=4, patch=None))
  for _ in range(3):
    a, b = next(online), next(offline)
    for key in ("tokens", "targets", "mask", "patch_lengths"):
      np.testing.assert_array_equal(a[key], b[key])
  cfg.patching.max_patches = 41
  with pytest.raises(ValueError, match="max_patches=40"):
    pipeline.make_dataset(cfg, "train", local_batch_size=4, patch=None)


def test_sources_report_invalid_kind():
  with pytest.raises(ValueError, match="arrayrecord"):
    sources.build_source("csv", ("x",))
