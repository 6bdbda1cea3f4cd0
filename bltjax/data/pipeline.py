"""The grain input pipeline: documents -> packed rows of bytes -> patches -> local batches.

    per source (data.source, or each data.mixture component), per data shard:
      documents of the shard's split (random access: held-out split, [shard::shards], seeded
      shuffle per epoch; streamed JSONL/Parquet: the shard's files in a seeded order, split on
      the fly, shuffled in blocks of data.shuffle_window documents) -> tokenize (BOS/EOS per
      document) -> concat-then-split into rows of N + 1 bytes (documents kept whole across the
      stream) -> x = row[:-1], y = row[1:]
    -> mix the sources' rows by weight -> batch -> concatenate the shards' batches ->
    patching (entropy model / space / static / byte) -> multiprocess prefetch.

The documents of a shard come from `bltjax.data.shards`. Everything here is host numpy
(`bltjax.train.batch` says what a batch holds). Iterators are grain `DatasetIterator`s whose
state goes into the Orbax checkpoint.
"""

import grain
import jax
import numpy as np

from bltjax.data import bpe, documents, flag_table, mixture, preprocessed
from bltjax.data import shards as shards_lib
from bltjax.data.workers import init_worker

source_names = mixture.source_names


class RowToExample(grain.transforms.Map):
  """A packed row of N + 1 ids -> inputs, targets, loss mask and per-row document flags
  (`doc_flag_counts`: documents per flag, in `flag_table.FLAGS` order); BPE rows (token_lm) also
  give `target_bytes`, the text bytes of each target (0 where the mask is 0)."""

  def map(self, w):
    tokens, seg = w["tokens"], w["tokens_segment_ids"]
    counts = flag_table.counts(w["doc_flags"])
    # Padding (segment 0) only occurs at the end of a finite stream.
    mask = (seg[1:] > 0).astype(np.float32)
    out = dict(tokens=tokens[:-1].astype(np.int32), targets=tokens[1:].astype(np.int32),
               mask=mask, doc_flag_counts=counts)
    if "token_bytes" in w:
      out["target_bytes"] = w["token_bytes"][1:].astype(np.float32) * mask
    return out


def _rows(comp, data_cfg, split, tokenizer=None, **kw):
  to_tokens = documents.DocumentToTokens() if tokenizer is None else bpe.DocumentToBPE(tokenizer)
  docs = shards_lib.shard_documents(comp, data_cfg, split, **kw).map(to_tokens)
  if isinstance(docs, grain.MapDataset):
    docs = docs.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                                  prefetch_buffer_size=data_cfg.read_buffer))
  n = data_cfg.seq_len + 1
  lengths = {"tokens": n, "doc_flags": n} | ({"token_bytes": n} if tokenizer else {})
  it = grain.experimental.ConcatThenSplitIterDataset(docs, length_struct=lengths)
  return it.map(RowToExample())


def packed_rows(data_cfg, split: str, *, seed: int, process_index: int, process_count: int,
                shuffle: bool, num_epochs: int | None = None, source: str | None = None,
                tokenizer: str | None = None):
  """IterDataset of single examples (rows of data.seq_len bytes + targets) of data shard
  `process_index` of `process_count`: of source `source`, or of every source mixed by weight
  (a finite mixture ends when its first source does). `tokenizer`: the path of a BPE tokenizer
  (token_lm): rows of data.seq_len BPE tokens, with their bytes (`bltjax.data.bpe`)."""
  comps = mixture.select(data_cfg, source)
  kw = dict(seed=seed, shard=process_index, shards=process_count, shuffle=shuffle,
            num_epochs=num_epochs, tokenizer=tokenizer)
  if len(comps) == 1:
    return _rows(comps[0], data_cfg, split, **kw)
  # Keyed by name: a checkpoint restores each source's position by name.
  return grain.IterDataset.mix({c.name: _rows(c, data_cfg, split, **kw) for c in comps},
                               {c.name: c.weight for c in comps})


def make_dataset(config, split: str, *, local_batch_size: int, patch=None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_workers: int | None = None, num_epochs: int | None = None,
                 source: str | None = None):
  """The full pipeline for one process: an IterDataset of local batches (numpy dicts); of one
  data.mixture component when `source` names it (per-source evaluation). `split`: 'train',
  'eval' (the held-out documents) or 'all' (every document, unshuffled: an eval set)."""
  d = config.data
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if d.preprocessed_dir:
    it = preprocessed.batches(config, split, local_batch_size=local_batch_size,
                              process_index=process_index, process_count=process_count,
                              source=source)
  else:
    shards = shards_lib.data_shards(d, process_index, process_count)
    if local_batch_size % len(shards):
      raise ValueError(f"the local batch of {local_batch_size} rows does not split over "
                       f"this process's {len(shards)} data shards")
    total = d.shards or process_count
    tok = None
    if config.get("model_type") == "token_lm":
      tok = config.tokenizer.path
      if not tok:
        raise ValueError("token_lm: tokenizer.path is not set (bltjax.train.trainer sets it to the "
                         "tokenizer of bpe.ensure_tokenizer before reading data)")
    parts = [packed_rows(d, split, seed=config.seed, process_index=s, process_count=total,
                         shuffle=split == "train", num_epochs=num_epochs, source=source,
                         tokenizer=tok)
             .batch(local_batch_size // len(shards), drop_remainder=num_epochs is None)
             for s in shards]
    it = parts[0] if len(parts) == 1 else shards_lib.ConcatBatches(parts)
  if patch is not None:  # host patching (and/or host hash ids): bltjax.train.patcher.PatchBatch
    it = it.map(patch)
  workers = d.num_workers if num_workers is None else num_workers
  if workers > 0:  # batches come back in shared memory, released as bltjax.data.workers says
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=d.worker_buffer),
                        worker_init_fn=init_worker)
  return it
