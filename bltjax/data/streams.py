"""Streamed documents of one data shard (JSONL, Parquet): no per-document index, checkpointable.

A shard reads only its own files, in order, with the held-out split applied on the fly
(`documents.held_out(key)`). Per epoch, the shard's file order is permuted (seed, shard, epoch) and
the documents are shuffled within consecutive windows of `window` documents of the split (each
window permuted by (seed, shard, epoch, window number)). Memory: one window of documents and one
open file (a row group for Parquet), whatever the corpus size.

Iterator state (JSON-able, saved with the train state): the epoch, where the current window
starts (file index in the epoch's order, position in that file), the window's number, the split's
documents before it in this epoch, and how many of its documents were returned. Restoring re-reads
that window and continues with exactly the next document.
"""

import logging

import grain
import numpy as np

from bltjax.data import formats
from bltjax.data.documents import MAX_DOCUMENT_BYTES, ProblemLog, held_out

_SEED_MOD = 2**63  # numpy seeds are non-negative


class DocumentStream(grain.IterDataset):
  """IterDataset of `Document`s of `files` (one data shard's), split `split` ('train'/'eval');
  documents longer than `max_document_bytes` are cut (`formats`)."""

  def __init__(self, kind: str, files, *, text_field: str, split: str, eval_fraction: float,
               seed: int, shard: int, shuffle: bool, window: int, num_epochs: int | None,
               name: str, max_document_bytes: int = MAX_DOCUMENT_BYTES):
    super().__init__()
    if window < 1:
      raise ValueError(f"data.shuffle_window={window} must be >= 1")
    self.kind, self.files, self.name = kind, list(files), name
    self.text_field, self.split, self.eval_fraction = text_field, split, eval_fraction
    self.seed, self.shard, self.shuffle, self.window = seed, shard, shuffle, window
    self.num_epochs, self.max_document_bytes = num_epochs, max_document_bytes

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Grain worker processes each read a slice of the shard's files."""
    n, count = len(self.files), sl.step or 1
    index = sl.start or 0
    if sequential_slice:
      bounds = np.linspace(0, n, count + 1).astype(int)
      files = self.files[bounds[index]:bounds[index + 1]]
    else:
      files = self.files[sl]
    if not files:
      raise ValueError(f"{self.name}: grain worker {index} of {count} gets none of the shard's "
                       f"{n} files; use data.num_workers <= {n} or more files")
    self.files = files
    self.name = f"{self.name} worker {index}/{count}"

  def __iter__(self):
    return _StreamIterator(self)

  def __str__(self) -> str:
    return f"DocumentStream({self.name}, {self.split}, {len(self.files)} files)"


class _StreamIterator(grain.DatasetIterator):

  def __init__(self, ds: DocumentStream):
    super().__init__()
    self._ds = ds
    self._log = ProblemLog(ds.name)
    want_eval = ds.split == "eval"
    self._fmt = formats.make(ds.kind, ds.text_field, self._log,
                             lambda key: held_out(key, ds.eval_fraction) == want_eval,
                             ds.max_document_bytes)
    self._order_epoch, self._order = None, None
    self._counts = dict(blank_lines=0, empty_files=0)
    self.set_state(dict(epoch=0, file=0, pos=list(formats.START), block=0, docs=0, index=0))

  # -- state -----------------------------------------------------------------------------------

  def get_state(self) -> dict:
    return dict(epoch=self._epoch, file=self._file, pos=list(self._pos), block=self._block_no,
                docs=self._docs, index=self._index)

  def set_state(self, state: dict) -> None:
    self._epoch, self._file = int(state["epoch"]), int(state["file"])
    self._pos = [int(p) for p in state["pos"]]
    self._block_no, self._docs = int(state["block"]), int(state["docs"])
    self._index = int(state["index"])
    self._block = self._end = None  # Loaded (re-read) on the next `__next__`.
    self._reader = self._reader_at = None

  # -- iteration -------------------------------------------------------------------------------

  def __next__(self):
    while True:
      if self._block is None:
        self._block = self._read_block()
      if self._index < len(self._block):
        self._index += 1
        return self._block[self._index - 1]
      if self._block:  # The window is used up: the next one starts where it ended.
        self._docs += len(self._block)
        self._file, self._pos = self._end
        self._block_no, self._index, self._block = self._block_no + 1, 0, None
        continue
      self._end_epoch()  # An empty window: the epoch's files are done.

  def _end_epoch(self):
    ds = self._ds
    if not self._docs:
      raise ValueError(
          f"{ds.name}: the {ds.split} split is empty after a full pass over the shard's "
          f"{len(ds.files)} files (data.eval_fraction={ds.eval_fraction}; documents are held out "
          "by sha256 of their key)")
    logging.info("%s: %s epoch %d done: %d documents, %d blank lines and %d empty files "
                 "skipped", ds.name, ds.split, self._epoch, self._docs,
                 self._counts["blank_lines"], self._counts["empty_files"])
    self._counts = dict(blank_lines=0, empty_files=0)
    if ds.num_epochs is not None and self._epoch + 1 >= ds.num_epochs:
      raise StopIteration
    self.set_state(dict(epoch=self._epoch + 1, file=0, pos=list(formats.START), block=0, docs=0,
                        index=0))

  def _file_order(self) -> np.ndarray:
    ds = self._ds
    if self._order_epoch != self._epoch:
      n = len(ds.files)
      self._order = (np.random.default_rng([ds.seed % _SEED_MOD, ds.shard, self._epoch])
                     .permutation(n) if ds.shuffle else np.arange(n))
      self._order_epoch = self._epoch
    return self._order

  def _read_block(self) -> list:
    """The next `window` documents of the split from (file, pos), permuted when shuffling (one
    document when not shuffling)."""
    ds, order = self._ds, self._file_order()
    size = ds.window if ds.shuffle else 1  # In order (eval): no need to read ahead.
    block, file, pos = [], self._file, list(self._pos)
    while len(block) < size and file < len(order):
      path = ds.files[order[file]]
      if self._reader_at != (file, pos) or self._reader is None:
        self._reader = self._fmt.read(path, pos)
      fresh, items = pos == list(formats.START), 0
      for key, raw, pos in self._reader:
        items += 1
        if raw is formats.BLANK:
          self._blank(key)
        elif raw is not formats.SKIP:
          block.append(self._fmt.decode(raw, key))
          if len(block) == size:
            break
      else:  # The file is done.
        if fresh and not items:
          self._empty(path)
        file, pos, self._reader = file + 1, list(formats.START), None
    self._end, self._reader_at = (file, pos), (file, pos)
    if ds.shuffle and len(block) > 1:
      perm = np.random.default_rng(
          [ds.seed % _SEED_MOD, ds.shard, self._epoch, self._block_no]).permutation(len(block))
      block = [block[i] for i in perm]
    return block

  def _blank(self, key):
    self._counts["blank_lines"] += 1
    if self._counts["blank_lines"] == 1:
      logging.warning("%s: skipping blank line %s (blank lines are counted per epoch)",
                      self._ds.name, key)

  def _empty(self, path):
    self._counts["empty_files"] += 1
    if self._counts["empty_files"] == 1:
      logging.warning("%s: empty file %s (empty files are counted per epoch)",
                      self._ds.name, path)

  def __str__(self) -> str:
    return f"_StreamIterator({self._ds.name}, state={self.get_state()})"
