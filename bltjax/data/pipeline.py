"""The grain input pipeline: documents -> packed rows of bytes -> patches -> local batches.

    per source (data.source, or each data.mixture component), per data shard:
      documents of the shard's split (random access: held-out split, [shard::shards], seeded
      shuffle per epoch; streamed JSONL/Parquet: the shard's files in a seeded order, split on
      the fly, shuffled in blocks of data.shuffle_window documents) -> tokenize (BOS/EOS per
      document) -> concat-then-split into rows of N + 1 bytes (documents kept whole across the
      stream) -> x = row[:-1], y = row[1:]
    -> mix the sources' rows by weight -> batch -> concatenate the shards' batches ->
    patching (entropy model / space / static / byte) -> multiprocess prefetch.

A shard reads only its own files (JSONL, Parquet, ArrayRecord: files[shard::shards]; stdlib and
text: its documents of the listed files). Everything here is host numpy (`bltjax.batch` says what
a batch holds). Iterators are grain `DatasetIterator`s whose state goes into the Orbax checkpoint.
"""

import functools
import logging
import os

import grain
import jax
import numpy as np

from bltjax import bpe
from bltjax.data import documents, flags, mixture, paths as paths_lib, preprocessed, sources
from bltjax.data import streams

source_names = mixture.source_names


class Subset:
  """Random-access view of `source` restricted to `indices` (picklable for grain workers)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  def __repr__(self):
    return f"Subset({self.source!r}, {len(self)} documents)"


class SplitView:
  """Random-access view of `source` whose documents outside `split` read as None (skipped by
  grain), decided by key hash before reading: no per-document index."""

  def __init__(self, source, split: str, eval_fraction: float):
    self.source, self.eval_fraction = source, eval_fraction
    self._want_eval = split == "eval"

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if documents.held_out(self.source.key(i), self.eval_fraction) != self._want_eval:
      return None
    return self.source[i]

  def first(self) -> int | None:
    """The first document of the split (expected after ~1/fraction keys), or None."""
    return next((i for i in range(len(self)) if documents.held_out(
        self.source.key(i), self.eval_fraction) == self._want_eval), None)


class RowToExample(grain.transforms.Map):
  """A packed row of N + 1 ids -> inputs, targets, loss mask and per-row document flags
  (`doc_flag_counts`: documents per flag, in `flags.FLAGS` order); BPE rows (token_lm) also
  give `target_bytes`, the text bytes of each target (0 where the mask is 0)."""

  def map(self, w):
    tokens, seg = w["tokens"], w["tokens_segment_ids"]
    counts = flags.counts(w["doc_flags"])
    # Padding (segment 0) only occurs at the end of a finite stream.
    mask = (seg[1:] > 0).astype(np.float32)
    out = dict(tokens=tokens[:-1].astype(np.int32), targets=tokens[1:].astype(np.int32),
               mask=mask, doc_flag_counts=counts)
    if "token_bytes" in w:
      out["target_bytes"] = w["token_bytes"][1:].astype(np.float32) * mask
    return out


@functools.lru_cache(maxsize=8)
def _listed_source(kind, paths, eval_fraction, max_document_bytes, cwd):
  """stdlib/text: the file list and its held-out split, once per process (hashes of the paths
  only; files are read when their documents are). `cwd` keys relative paths."""
  del cwd
  source = sources.build_source(kind, paths, max_document_bytes=max_document_bytes)
  return source, documents.split_indices(source, eval_fraction)


def max_document_bytes(data_cfg) -> int:
  """data.max_document_bytes, as an int (a config may write it as an expression)."""
  return int(data_cfg.max_document_bytes)


def _shard_files(comp, data_cfg, shard: int, shards: int) -> list[str]:
  files = paths_lib.expand(comp.paths)
  mine = files[shard::shards]
  if not mine:
    raise ValueError(f"data: shard {shard} of {shards} gets no file of source {comp.name!r}: "
                     f"its paths match {len(files)} file(s), fewer than the {shards} data shards "
                     f"(data.shards={data_cfg.shards}; 0 = one per process); split the corpus "
                     "into more files or use fewer shards")
  return mine


def _documents(comp, data_cfg, split, *, seed, shard, shards, shuffle, num_epochs):
  """Shard `shard`'s documents of `split` of one source: a MapDataset (random access) or an
  IterDataset (streamed) of `Document`s. Split 'all' is every document (an eval set, read
  whole): nothing is held out."""
  name = f"{comp.name} shard {shard}/{shards}"
  max_bytes = max_document_bytes(data_cfg)
  fraction = 0.0 if split == "all" else data_cfg.eval_fraction
  if comp.source in sources.STREAMED:  # shuffles and repeats itself
    return streams.DocumentStream(
        comp.source, _shard_files(comp, data_cfg, shard, shards), text_field=comp.text_field,
        split=split, eval_fraction=fraction, seed=seed, shard=shard,
        shuffle=shuffle, window=data_cfg.shuffle_window, num_epochs=num_epochs, name=name,
        max_document_bytes=max_bytes)
  if comp.source == "arrayrecord":
    view = SplitView(sources.ArrayRecordSource(_shard_files(comp, data_cfg, shard, shards),
                                               max_bytes),
                     split, fraction)
    if view.first() is None:
      raise ValueError(f"data: {name} has no {split} documents among its {len(view)} records "
                       f"(data.eval_fraction={data_cfg.eval_fraction})")
    ds = grain.MapDataset.source(view)
  else:
    source, (train_idx, eval_idx) = _listed_source(comp.source, comp.paths, fraction, max_bytes,
                                                   os.getcwd())
    idx = eval_idx if split == "eval" else train_idx  # 'all': fraction 0 holds nothing out
    logging.info("data: %s split of %r: %d of %d documents", split, source, len(idx),
                 len(source))
    if not len(idx):
      raise ValueError(f"data: the {split} split of {source!r} has no documents "
                       f"(data.eval_fraction={data_cfg.eval_fraction})")
    ds = grain.MapDataset.source(Subset(source, idx))[shard::shards]
    if not len(ds):
      raise ValueError(f"data: shard {shard} of {shards} gets no {split} documents "
                       f"({len(idx)} in total)")
  if shuffle:
    ds = ds.seed(seed).shuffle()
  return ds.repeat(num_epochs)


def _one_source(data_cfg, source):
  comps = mixture.select(data_cfg, source)
  if len(comps) != 1:
    raise ValueError(f"data.mixture has {len(comps)} sources: name one "
                     f"({mixture.source_names(data_cfg)})")
  return comps[0]


def tokenized_documents(data_cfg, split: str, *, seed: int, process_index: int,
                        process_count: int, shuffle: bool, num_epochs: int | None = None,
                        source: str | None = None):
  """Data shard `process_index` of `process_count`'s tokenized documents of one source (a
  MapDataset for stdlib/text/arrayrecord, an IterDataset for jsonl/parquet), shuffled per epoch
  (num_epochs None: forever)."""
  comp = _one_source(data_cfg, source)
  docs = _documents(comp, data_cfg, split, seed=seed, shard=process_index, shards=process_count,
                    shuffle=shuffle, num_epochs=num_epochs)
  return docs.map(documents.DocumentToTokens())


def _rows(comp, data_cfg, split, tokenizer=None, **kw):
  to_tokens = documents.DocumentToTokens() if tokenizer is None else bpe.DocumentToBPE(tokenizer)
  docs = _documents(comp, data_cfg, split, **kw).map(to_tokens)
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
  (token_lm): rows of data.seq_len BPE tokens, with their bytes (`bltjax.bpe`)."""
  comps = mixture.select(data_cfg, source)
  kw = dict(seed=seed, shard=process_index, shards=process_count, shuffle=shuffle,
            num_epochs=num_epochs, tokenizer=tokenizer)
  if len(comps) == 1:
    return _rows(comps[0], data_cfg, split, **kw)
  # Keyed by name: a checkpoint restores each source's position by name.
  return grain.IterDataset.mix({c.name: _rows(c, data_cfg, split, **kw) for c in comps},
                               {c.name: c.weight for c in comps})


class _ConcatBatchesIterator(grain.DatasetIterator):
  def __next__(self):
    batches = [next(p) for p in self._parents]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return {"shards": [p.get_state() for p in self._parents]}

  def set_state(self, state):
    for p, s in zip(self._parents, state["shards"]):
      p.set_state(s)


class ConcatBatches(grain.IterDataset):
  """Row-wise concatenation of the next batch of every parent (one parent per data shard)."""

  def __iter__(self):
    return _ConcatBatchesIterator([iter(p) for p in self._parents])


def data_shards(data_cfg, process_index: int, process_count: int) -> list[int]:
  """The data shards this process reads. `data.shards` (0 = one per process) fixes the data
  layout independently of the number of processes: a global batch is the shards' batches in
  shard order, so 1 process reading shards 0..S-1 sees the same batches as S processes."""
  shards = data_cfg.shards or process_count
  if shards % process_count:
    raise ValueError(f"data.shards={shards} is not a multiple of the {process_count} processes")
  per = shards // process_count
  return list(range(process_index * per, (process_index + 1) * per))


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
    shards = data_shards(d, process_index, process_count)
    if local_batch_size % len(shards):
      raise ValueError(f"the local batch of {local_batch_size} rows does not split over "
                       f"this process's {len(shards)} data shards")
    total = d.shards or process_count
    tok = None
    if config.get("model_type") == "token_lm":
      tok = config.tokenizer.path
      if not tok:
        raise ValueError("token_lm: tokenizer.path is not set (bltjax.train sets it to the "
                         "tokenizer of bpe.ensure_tokenizer before reading data)")
    parts = [packed_rows(d, split, seed=config.seed, process_index=s, process_count=total,
                            shuffle=split == "train", num_epochs=num_epochs, source=source,
                            tokenizer=tok)
             .batch(local_batch_size // len(shards), drop_remainder=num_epochs is None)
             for s in shards]
    it = parts[0] if len(parts) == 1 else ConcatBatches(parts)
  if patch is not None:  # host patching (and/or host hash ids): bltjax.patcher.PatchBatch
    it = it.map(patch)
  workers = d.num_workers if num_workers is None else num_workers
  if workers > 0:
    from bltjax.data.workers import init_worker  # workers end with this process
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=d.worker_buffer),
                        worker_init_fn=init_worker)
  return it
