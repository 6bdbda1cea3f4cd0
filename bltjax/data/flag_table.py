"""The one table of document flags: what the training metrics count about the input documents.

Flag i is bit `1 << i` of a document's `doc_flags` (set at its first token by
`documents.DocumentToTokens`), column i of a packed row's `doc_flag_counts` (`pipeline`, stored so
by `preprocessed`) and the metric `NAMES[i]` (`batch.host_stats`, metrics.jsonl). New flags go at
the end: earlier columns keep their meaning.

  invalid_utf8  bytes that are not UTF-8 (kept: every byte is an input id)
  nul           NUL bytes (kept)
  empty         an empty file, record or text field
  unreadable    could not be read: I/O errors, a directory or broken symlink where a file was
                listed, an unreadable Parquet/JSONL file (one document per failure)
  malformed     a JSONL line that is not JSON, not an object, misses the text field or holds a
                non-string there; a Parquet row whose text is null
  oversized     longer than data.max_document_bytes: cut to its first that many bytes
"""

import numpy as np

FLAGS = ("invalid_utf8", "nul", "empty", "unreadable", "malformed", "oversized")
BIT = {name: 1 << i for i, name in enumerate(FLAGS)}
NAMES = tuple(f"{name}_docs" for name in FLAGS)  # metric names, in column order
# Flags a reader sets (`Document.problem`); invalid_utf8 and nul come from the bytes themselves.
PROBLEMS = ("empty", "unreadable", "malformed", "oversized")
assert len(FLAGS) <= 7, "doc_flags is int8"


def counts(doc_flags) -> np.ndarray:
  """int32 [len(FLAGS)]: documents per flag in a `doc_flags` array of any shape."""
  f = np.asarray(doc_flags)
  return np.array([np.count_nonzero(f & BIT[name]) for name in FLAGS], np.int32)

