"""Documents: what every reader returns, its problems and flags, the held-out split, and
`DocumentToTokens` (a document -> its tokens and flag bits).

A reader (`bltjax.data.sources`: random access; `bltjax.data.streams` and `formats`: JSONL and
Parquet) returns `Document(data, problem)`. Nothing is dropped silently: a document failing at
read time comes back with `problem` set (one of `flag_table.PROBLEMS`: empty, unreadable, malformed,
oversized) and becomes a flagged `[BOS, EOS]` in `DocumentToTokens`; the training metrics count
every flag (`bltjax.data.flag_table`, the one table of flags). A document longer than
`max_document_bytes` (data.max_document_bytes) keeps its first that many bytes and is flagged
oversized: a prefix trains, and the cut is counted, not silent.

The held-out split is a hash of each document's key (`held_out`, `split_indices`): the same split
on every machine, for random-access and streamed sources alike.
"""

import codecs
import collections
import hashlib
import logging
import typing

import grain
import numpy as np

from bltjax.data import flag_table
from bltjax.model import tokenizer

Document = typing.NamedTuple("Document", [("data", bytes), ("problem", str | None)])
# data.max_document_bytes of the experiments: far above any real document, a bound on memory.
MAX_DOCUMENT_BYTES = 64 << 20
MAX_READ_WARNINGS = 10  # Per kind of problem, source/stream instance and process; flags count all.


def to_bytes(text: str) -> bytes:
  """UTF-8, with the tokenizer's policy for lone surrogates."""
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError:
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    return tokenizer.decode_bytes(ids)


class ProblemLog:
  """Logs the first few read-time problems of each kind of one reader (bounded: no log line per
  document); `DocumentToTokens` flags every one, the metrics count them."""

  def __init__(self, name: str):
    self.name, self.counts = name, collections.Counter()

  def __call__(self, problem: str, key: str, detail, data: bytes = b"") -> Document:
    self.counts[problem] += 1
    n = self.counts[problem]
    if n <= MAX_READ_WARNINGS:
      more = f" (further {problem} documents are only counted)" if n == MAX_READ_WARNINGS else ""
      logging.warning("%s: %s document %s: %s%s", self.name, problem, key, detail, more)
    return Document(data, problem)

  def document(self, data: bytes, key: str, max_bytes: int, size=None) -> Document:
    """`data` as a Document: flagged empty, or cut to `max_bytes` and flagged oversized.
    `size`: the document's full length when known (else `len(data)`, maybe already cut)."""
    if len(data) > max_bytes:
      total = f"{size} bytes" if size is not None else f"more than {max_bytes} bytes"
      return self("oversized", key, f"{total}, longer than data.max_document_bytes: kept its "
                  f"first {max_bytes} bytes", bytes(data[:max_bytes]))
    return Document(data, None) if data else self("empty", key, "no bytes")


def key_hash(key: str) -> int:
  digest = hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).digest()
  return int.from_bytes(digest[:8], "big")


def held_out(key: str, eval_fraction: float) -> bool:
  """Whether the document `key` belongs to the eval split: sha256(key)[:8] / 2**64 < fraction."""
  return key_hash(key) < int(eval_fraction * 2**64)


def split_indices(source, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Splits documents by a hash of their key: the same split on every machine.

  Document i is held out iff sha256(key)[:8] / 2**64 < eval_fraction. With
  eval_fraction > 0 and at least two documents, neither side is left empty:
  the smallest (largest) hash moves to eval (train), and that is logged.

  Returns:
    (train_idx, eval_idx): sorted int64 index arrays, disjoint, covering all.
  """
  if not 0 <= eval_fraction < 1:
    raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
  hashes = np.array([key_hash(source.key(i)) for i in range(len(source))], np.uint64)
  held = hashes < np.uint64(int(eval_fraction * 2**64))
  name = getattr(source, "name", source)
  if eval_fraction > 0 and len(hashes) < 2:
    logging.warning("%s: %d document(s), too few for a held-out split", name, len(hashes))
  elif eval_fraction > 0:
    for to_eval, pick in ((True, np.argmin), (False, np.argmax)):
      if (held != to_eval).all():  # That side is empty: move the extreme hash over.
        j = int(pick(hashes))
        held[j] = to_eval
        logging.info("%s: no document hashed into %s (fraction %g); moved %s there", name,
                     "eval" if to_eval else "train", eval_fraction, source.key(j))
  return np.flatnonzero(~held), np.flatnonzero(held)


class DocumentToTokens(grain.transforms.Map):
  """Document -> {"tokens": BOS + (byte + 4)... + EOS, "doc_flags": flag bits at index 0}.

  Flags: `bltjax.data.flag_table`. Invalid UTF-8 and NUL bytes are kept (every byte is a valid input
  id) and flagged; the first few of each are logged with their offset and the bytes around it (a
  Document carries no key: the readers log the keys of the problems they meet)."""

  def __init__(self):
    self._logged = collections.Counter()

  def map(self, element) -> dict[str, np.ndarray]:
    data, problem = element
    if problem is not None and problem not in flag_table.PROBLEMS:
      raise ValueError(f"unknown document problem {problem!r}; expected one of "
                       f"{flag_table.PROBLEMS}")
    bit = flag_table.BIT
    doc_bits = bit[problem] if problem else 0
    if not data and problem is None:
      doc_bits |= bit["empty"]
    try:  # A cut (oversized) document may end inside a character: that is not invalid UTF-8.
      codecs.getincrementaldecoder("utf-8")().decode(data, final=problem != "oversized")
    except UnicodeDecodeError as e:
      doc_bits |= bit["invalid_utf8"]
      self._log("invalid_utf8", data, e.start)
    if b"\x00" in data:
      doc_bits |= bit["nul"]
      self._log("nul", data, bytes(data).index(b"\x00"))
    tokens = tokenizer.encode(data)
    doc_flags = np.zeros(tokens.shape, np.int8)
    doc_flags[0] = doc_bits
    return {"tokens": tokens, "doc_flags": doc_flags}

  def _log(self, flag: str, data, offset: int):
    self._logged[flag] += 1
    if self._logged[flag] <= MAX_READ_WARNINGS:
      more = " (further ones are only counted)" if self._logged[flag] == MAX_READ_WARNINGS else ""
      logging.warning("document of %d bytes flagged %s (kept) at byte %d: %r%s", len(data), flag,
                      offset, bytes(data[max(offset - 16, 0):offset + 16]), more)
