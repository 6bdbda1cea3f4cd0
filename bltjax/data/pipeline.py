"""The grain input pipeline: documents -> packed byte windows -> patches -> local batches.

    source -> held-out split -> shard by process -> shuffle (seeded, per epoch) -> tokenize
    (BOS/EOS per document) -> concat-then-split into windows of N + 1 bytes (documents kept whole
    across the stream, boundaries marked by BOS/EOS) -> x = w[:-1], y = w[1:] -> batch ->
    patching (entropy model / space / static / byte) -> multiprocess prefetch.

Everything here is host numpy; `global_batch` turns a local batch into sharded global arrays.
Iterators are grain `DatasetIterator`s whose state goes into the Orbax checkpoint.
"""

import functools
import glob
import io
import json
import logging
import os

import grain
import jax
import numpy as np

from bltjax.data import sources
from bltjax.data.patcher import PatchBatch

# Keys that go to the device; the others are host-side statistics for the logs.
DEVICE_KEYS = ("tokens", "targets", "mask", "patch_lengths", "hash_ids")
FLAG_NAMES = ("invalid_utf8_docs", "nul_docs", "empty_docs", "unreadable_docs")
_FLAG_BITS = (sources.FLAG_INVALID_UTF8, sources.FLAG_NUL, sources.FLAG_EMPTY,
              sources.FLAG_UNREADABLE)


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


class WindowToExample(grain.transforms.Map):
  """A packed window of N + 1 ids -> inputs, targets, loss mask and per-row document flags."""

  def map(self, w):
    tokens, seg, flags = w["tokens"], w["tokens_segment_ids"], w["doc_flags"]
    counts = np.array([np.count_nonzero(flags & bit) for bit in _FLAG_BITS], np.int32)
    return dict(tokens=tokens[:-1].astype(np.int32), targets=tokens[1:].astype(np.int32),
                # Padding (segment 0) only occurs at the end of a finite stream.
                mask=(seg[1:] > 0).astype(np.float32), doc_flag_counts=counts)


@functools.lru_cache(maxsize=8)
def _indexed_source(kind, paths, text_field, eval_fraction):
  """Sources are indexed (and their exclusions logged) once per process."""
  source = sources.build_source(kind, paths, text_field)
  return source, sources.split_indices(source, eval_fraction)


def document_split(data_cfg, split: str):
  """The documents of `split` ('train' or 'eval') as a random-access source."""
  source, (train_idx, eval_idx) = _indexed_source(
      data_cfg.source, tuple(data_cfg.paths or ()), data_cfg.text_field, data_cfg.eval_fraction)
  idx = train_idx if split == "train" else eval_idx
  logging.info("data: %s split of %r: %d of %d documents", split, source, len(idx), len(source))
  if not len(idx):
    raise ValueError(f"data: the {split} split of {source!r} has no documents "
                     f"(data.eval_fraction={data_cfg.eval_fraction})")
  return Subset(source, idx)


def tokenized_documents(data_cfg, split: str, *, seed: int, process_index: int,
                        process_count: int, shuffle: bool, num_epochs: int | None = None):
  """MapDataset of this process's tokenized documents, shuffled per epoch (None: forever)."""
  docs = document_split(data_cfg, split)
  ds = grain.MapDataset.source(docs)[process_index::process_count]
  if not len(ds):
    raise ValueError(f"data: process {process_index} of {process_count} gets no {split} "
                     f"documents ({len(docs)} in total)")
  if shuffle:
    ds = ds.seed(seed).shuffle()
  return ds.repeat(num_epochs).map(sources.DocumentToTokens())


def packed_windows(data_cfg, split: str, *, seed: int, process_index: int, process_count: int,
                   shuffle: bool, num_epochs: int | None = None):
  """IterDataset of single examples (windows of data.seq_len bytes + targets)."""
  ds = tokenized_documents(data_cfg, split, seed=seed, process_index=process_index,
                           process_count=process_count, shuffle=shuffle, num_epochs=num_epochs)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_cfg.read_threads,
                                            prefetch_buffer_size=data_cfg.read_buffer))
  n = data_cfg.seq_len + 1
  it = grain.experimental.ConcatThenSplitIterDataset(
      it, length_struct={"tokens": n, "doc_flags": n})
  return it.map(WindowToExample())


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


def make_dataset(config, split: str, *, local_batch_size: int, patch: PatchBatch | None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_workers: int | None = None, num_epochs: int | None = None):
  """The full pipeline for one process: an IterDataset of local batches (numpy dicts)."""
  d = config.data
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if d.preprocessed_dir:
    it = preprocessed_rows(d.preprocessed_dir, split, config, process_index=process_index,
                           process_count=process_count)
    it = it.batch(local_batch_size, drop_remainder=True)
  else:
    shards = data_shards(d, process_index, process_count)
    if local_batch_size % len(shards):
      raise ValueError(f"the local batch of {local_batch_size} rows does not split over "
                       f"this process's {len(shards)} data shards")
    total = d.shards or process_count
    parts = [packed_windows(d, split, seed=config.seed, process_index=s, process_count=total,
                            shuffle=split == "train", num_epochs=num_epochs)
             .batch(local_batch_size // len(shards), drop_remainder=num_epochs is None)
             for s in shards]
    it = parts[0] if len(parts) == 1 else ConcatBatches(parts)
    if patch is not None:
      it = it.map(patch)
  workers = d.num_workers if num_workers is None else num_workers
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=d.worker_buffer))
  return it


def global_batch(local, batch_shardings):
  """Local numpy batch -> dict of global jax.Arrays (the keys the step reads)."""
  return {k: jax.make_array_from_process_local_data(batch_shardings[k], local[k])
          for k in DEVICE_KEYS if k in local and k in batch_shardings}


def host_stats(local) -> dict:
  """Per-batch statistics computed on the host (no device sync): bytes per patch, flags."""
  stats = {name: int(c) for name, c in zip(FLAG_NAMES, local["doc_flag_counts"].sum(axis=0))}
  if "patch_lengths" in local:
    real = local["mask"].sum() + local["mask"].shape[0]  # N real bytes + the next byte, per row
    stats["bytes_per_patch"] = float(real / max(np.count_nonzero(local["patch_lengths"]), 1))
    stats["patch_overflow"] = int(local["patch_overflow"].sum())
  return stats


# -- offline preprocessing ------------------------------------------------------------------------

_META = "preprocessed.json"


def _rows_file(directory, split, process_index, process_count):
  return os.path.join(directory, f"{split}.process_{process_index}-of-{process_count}.arrayrecord")


def write_rows(directory, split, batches, *, process_index, process_count, num_rows):
  """Writes the first `num_rows` rows of `batches` (local batch dicts) in order."""
  from array_record.python.array_record_module import ArrayRecordWriter
  os.makedirs(directory, exist_ok=True)
  writer = ArrayRecordWriter(_rows_file(directory, split, process_index, process_count),
                             "group_size:1")
  written = 0
  try:
    for batch in batches:
      for r in range(len(batch["tokens"])):
        if written == num_rows:
          return written
        buf = io.BytesIO()
        np.savez(buf, **{k: v[r] for k, v in batch.items()})
        writer.write(buf.getvalue())
        written += 1
  finally:
    writer.close()
  return written


def write_meta(directory, meta: dict):
  with open(os.path.join(directory, _META), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def read_meta(directory) -> dict:
  path = os.path.join(directory, _META)
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.preprocessed_dir={directory}: no {_META} (write it with "
                            "python -m bltjax.preprocess)")
  with open(path) as f:
    return json.load(f)


class _DecodeRow(grain.transforms.Map):
  def map(self, record):
    with np.load(io.BytesIO(record)) as z:
      return {k: z[k] for k in z.files}


def preprocessed_rows(directory, split, config, *, process_index, process_count):
  meta = read_meta(directory)
  expect = dict(seq_len=config.data.seq_len, max_patches=config.patching.max_patches,
                process_count=process_count)
  for key, value in expect.items():
    if meta.get(key) != value:
      raise ValueError(f"data.preprocessed_dir={directory} was written with {key}="
                       f"{meta.get(key)}, but this run has {key}={value}")
  path = _rows_file(directory, split, process_index, process_count)
  if not glob.glob(path):
    raise FileNotFoundError(f"{path} does not exist")
  src = grain.sources.ArrayRecordDataSource([path])
  return grain.MapDataset.source(src).repeat().map(_DecodeRow()).to_iter_dataset()
