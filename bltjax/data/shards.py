"""The documents of one data shard, and the data shards of a process.

A shard reads only its own files (JSONL, Parquet, ArrayRecord: files[shard::shards]; stdlib and
text: its documents of the listed files), with the held-out split applied by document key:

    random access (stdlib, text, arrayrecord): held-out split, [shard::shards], seeded shuffle
        per epoch (`Subset`, `SplitView`);
    streamed (jsonl, parquet): the shard's files in a seeded order, split on the fly, shuffled
        in windows of data.shuffle_window documents (`bltjax.data.streams`).

`bltjax.data.pipeline` packs these documents into rows and batches; `bltjax.data.bpe` and
`bltjax.data.preprocessed` read them too.
"""

import functools
import logging
import os

import grain
import numpy as np

from bltjax.data import documents, mixture, paths as paths_lib, sources, streams


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


def shard_documents(comp, data_cfg, split, *, seed, shard, shards, shuffle, num_epochs):
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


def one_source(data_cfg, source):
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
  comp = one_source(data_cfg, source)
  docs = shard_documents(comp, data_cfg, split, seed=seed, shard=process_index,
                         shards=process_count, shuffle=shuffle, num_epochs=num_epochs)
  return docs.map(documents.DocumentToTokens())


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
