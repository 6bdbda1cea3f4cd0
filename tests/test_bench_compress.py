"""bltjax.bench.compress: the compressors see exactly the held-out ids the evaluator's batches
hold (checked against `pipeline.make_dataset(config, 'eval', ...)`), and its figures are what
lzma/gzip give on those documents."""

import gzip
import lzma

import numpy as np
import pytest

from bltjax.bench import compress
from bltjax.data import documents, pipeline
from bltjax.data import shards as shards_lib
from bltjax.model import tokenizer
from bltjax.train import experiment


def _corpus(root):
  rng = np.random.default_rng(0)
  words = [b"def", b"return", b"self", b"import", b"x", b"for", b"in", b"(", b")", b":", b"\n"]
  for i in range(24):  # source-like text, 20 bytes to ~1.5 KB (longer than a tiny window)
    n = int(rng.integers(5, 400))
    (root / f"doc{i:02d}.txt").write_bytes(b" ".join(words[j] for j in rng.integers(0, 11, n)))
  return root


def _config(tmp_path, shards, eval_batches):
  c = experiment.load("experiments/debug.py:tiny")
  c.data.update(source="text", paths=(str(_corpus(tmp_path) / "*.txt"),), eval_fraction=0.3,
                shards=shards)
  c.train.eval_batches = eval_batches
  return c


def _evaluated_windows(config):
  """Per data shard, the windows (ids, x plus the last target) of the evaluator's batches, and
  the total of their loss masks (the evaluator's target count)."""
  ds = pipeline.make_dataset(config, "eval", local_batch_size=config.train.batch_size,
                             num_workers=0)
  it = iter(ds)
  batches = [next(it) for _ in range(config.train.eval_batches)]
  shards = len(shards_lib.data_shards(config.data, 0, 1))
  rows = config.train.batch_size // shards
  per_shard = [[] for _ in range(shards)]
  for b in batches:  # a batch is the shards' batches, in shard order
    for r in range(config.train.batch_size):
      per_shard[r // rows].append(np.concatenate([b["tokens"][r], b["targets"][r, -1:]]))
  return ([np.concatenate(w) for w in per_shard],
          sum(float(b["mask"].sum()) for b in batches))


@pytest.mark.parametrize("shards,eval_batches", [(0, 1), (2, 3), (0, 12)])  # 12: cycles
def test_covered_documents_are_the_evaluated_ids(tmp_path, shards, eval_batches):
  config = _config(tmp_path, shards, eval_batches)
  windows, targets = _evaluated_windows(config)
  docs = compress.covered_documents(config)
  for shard, ids in enumerate(windows):
    mine = [d.ids for d in docs if d.shard == shard]
    assert np.array_equal(np.concatenate(mine), ids)
  res = compress.compress_figures(config)
  cov = res["covered"]
  assert cov["ids"] == sum(len(w) for w in windows)
  assert cov["targets"] == targets  # eval_bpb's denominator
  specials = sum(int((w < tokenizer.OFFSET).sum()) for w in windows)
  assert cov["bytes"] == cov["ids"] - specials
  assert cov["documents"] == len(docs)
  assert len(cov["cut"]) == sum(d.cut for d in docs) <= len(windows)
  if eval_batches == 12:  # more ids than the eval split has: it repeats, as in the evaluator
    assert cov["documents"] > res["eval_split"]["documents"]


def _split_docs(ids):
  """The document bytes in a stream of BOS + bytes + EOS ids (the first may lack its BOS, the
  last its EOS)."""
  out, cur = [], []
  for i in ids.tolist():
    if i == tokenizer.BOS_ID:
      cur = []
    elif i == tokenizer.EOS_ID:
      out.append(bytes(cur))
      cur = None
    elif cur is not None:
      cur.append(i - tokenizer.OFFSET)
  if cur is not None:
    out.append(bytes(cur))
  return out


def test_figures_match_an_independent_computation(tmp_path):
  config = _config(tmp_path, 0, 2)
  (ids,), _ = _evaluated_windows(config)
  docs = _split_docs(ids)
  assert ids[0] == tokenizer.BOS_ID and ids[-1] != tokenizer.EOS_ID  # the last one is cut
  nbytes = sum(map(len, docs))
  xz = sum(8 * len(lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)) for d in docs) / nbytes
  gz = sum(8 * len(gzip.compress(d, 9, mtime=0)) for d in docs) / nbytes
  xz_cat = 8 * len(lzma.compress(b"".join(docs), preset=9 | lzma.PRESET_EXTREME)) / nbytes
  res = compress.compress_figures(config)
  cov = res["covered"]
  assert (cov["documents"], cov["bytes"]) == (len(docs), nbytes)
  assert cov["per_document"]["xz -9e"] == pytest.approx(xz, rel=1e-12)
  assert cov["per_document"]["gzip -9"] == pytest.approx(gz, rel=1e-12)
  assert cov["concatenated"]["xz -9e"] == pytest.approx(xz_cat, rel=1e-12)
  assert 0 < cov["per_document"]["zstd -19"] < 8 + 8 * 64 * len(docs) / nbytes
  # The whole eval split: every held-out file (by the hash of its path) once, whole.
  held = [p.read_bytes() for p in tmp_path.glob("*.txt") if documents.held_out(str(p), 0.3)]
  whole = res["eval_split"]
  assert (whole["documents"], whole["bytes"]) == (len(held), sum(map(len, held)))
  assert whole["per_document"]["xz -9e"] == pytest.approx(sum(
      8 * len(lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)) for d in held) / whole["bytes"])
  table = compress.format_table(res, config)
  assert "xz -9e" in table and "cut after" in table
