"""Random-access document sources (grain data sources) and the tokenizing transform.

`len(src)`, `src[i] -> Document`, `src.key(i)` (a stable id, hashed by `split_indices`).
Sources pickle for grain's workers: files are opened per read, caches are not pickled.
Nothing is dropped silently: files excluded while indexing and blank JSONL lines are
counted in `src.index_stats` and logged once; documents failing at read time come back
with `problem` set and become flagged `[BOS, EOS]` in `DocumentToTokens`.
"""

import array
import glob
import hashlib
import json
import logging
import operator
import os
import pathlib
import stat
import sys
import sysconfig
import threading
import typing

from array_record.python import array_record_module
import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bltjax import tokenizer

Document = typing.NamedTuple("Document", [("data", bytes), ("problem", str | None)])
PROBLEMS = ("empty", "unreadable", "malformed")
SOURCES = ("stdlib", "text", "jsonl", "parquet", "arrayrecord")

FLAG_INVALID_UTF8 = 1
FLAG_NUL = 2
FLAG_EMPTY = 4
FLAG_UNREADABLE = 8  # Also set for "malformed" records.

_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_LOG_EXAMPLES = 5  # Paths shown when logging exclusions.
_MAX_READ_WARNINGS = 10  # Per source instance and process; flags count the rest.
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
               pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)


def _to_bytes(text: str) -> bytes:
  """UTF-8, with the tokenizer's policy for lone surrogates."""
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError:
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    return tokenizer.decode_bytes(ids)


def _expand(patterns) -> list[str]:
  """Sorted unique files matched by glob patterns (`**` recurses)."""
  if isinstance(patterns, (str, os.PathLike)):
    patterns = [patterns]
  patterns = [os.fspath(p) for p in patterns]
  if not patterns:
    raise ValueError("no path patterns given")
  paths = set()
  for pattern in patterns:
    matched = glob.glob(os.path.expanduser(pattern), recursive=True)
    matched = [p for p in matched if not os.path.isdir(p)]
    if not matched:
      raise ValueError(f"data path pattern {pattern!r} matched no files")
    paths.update(matched)
  return sorted(paths)


def _log_excluded(name: str, what: str, paths: list[str]) -> None:
  if paths:
    logging.warning("%s: excluded %d %s file(s), e.g. %s", name, len(paths), what,
                    ", ".join(paths[:_LOG_EXAMPLES]))


class _Source:
  """Index checks, pickling and logging shared by all sources."""

  _TRANSIENT = ("_cache", "_readers", "_lock", "_warned")

  def __init__(self, name: str, size: int):
    self.name = name
    self._size = size
    self.index_stats = {"unreadable_files": 0, "empty_files": 0, "blank_lines": 0}
    self._reset()

  def _reset(self):
    self._cache = None
    self._readers = {}
    self._lock = threading.Lock()
    self._warned = 0

  def _check_nonempty(self, where):
    if not self._size:
      raise ValueError(f"{self.name}: no documents in {where} (index stats: {self.index_stats})")

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._reset()

  def __len__(self) -> int:
    return self._size

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.name!r}, documents={self._size})"

  def _index(self, i) -> int:
    i = operator.index(i)
    if i < 0:
      i += self._size
    if not 0 <= i < self._size:
      raise IndexError(f"{self.name}: index {i} out of range [0, {self._size})")
    return i

  def __getitem__(self, i) -> Document:
    return self._read(self._index(i))

  def _problem(self, problem: str, key: str, detail) -> Document:
    """Logs the first few read-time problems; `DocumentToTokens` counts all."""
    self._warned += 1
    if self._warned <= _MAX_READ_WARNINGS:
      more = " (further problems are only counted)" if self._warned == _MAX_READ_WARNINGS else ""
      logging.warning("%s: %s document %s: %s%s", self.name, problem, key, detail, more)
    return Document(b"", problem)


class _FileSource(_Source):
  """One document per file; `key` is the path relative to `root` ("" = as given)."""

  def __init__(self, name, root, keys, unreadable=()):
    unreadable, empty, kept = list(unreadable), [], []
    for key in keys:
      path = os.path.join(root, key) if root else key
      try:
        st = os.stat(path)
        ok = stat.S_ISREG(st.st_mode) and os.access(path, os.R_OK)
      except OSError:
        ok = False
      if not ok:
        unreadable.append(path)
      elif st.st_size == 0:
        empty.append(path)
      else:
        kept.append(key)
    super().__init__(name, len(kept))
    self._root, self._keys = root, kept
    self.index_stats.update(unreadable_files=len(unreadable), empty_files=len(empty))
    _log_excluded(name, "unreadable", unreadable)
    _log_excluded(name, "empty", empty)

  def key(self, i) -> str:
    return self._keys[self._index(i)]

  def _read(self, i) -> Document:
    key = self._keys[i]
    path = os.path.join(self._root, key) if self._root else key
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      return self._problem("unreadable", path, e)
    return Document(data, None if data else "empty")


class StdlibSource(_FileSource):
  """The running Python's standard library `*.py` files, minus tests and site-packages."""

  def __init__(self):
    root = sysconfig.get_paths()["stdlib"]
    errors, keys = [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
      dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
      for filename in filenames:
        if filename.endswith(".py") and not filename.startswith("test_"):
          rel = os.path.relpath(os.path.join(dirpath, filename), root)
          keys.append(pathlib.PurePath(rel).as_posix())
    keys.sort()  # Relative POSIX paths: the same order on every machine.
    # Directories os.walk could not list count as unreadable files.
    unreadable = [e.filename or str(e) for e in errors]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    super().__init__(f"stdlib(python{version})", root, keys, unreadable)
    self._check_nonempty(root)


class TextFilesSource(_FileSource):
  """One document per file matched by glob patterns; `key` is the path."""

  def __init__(self, patterns):
    paths = _expand(patterns)
    super().__init__(f"text({len(paths)} files)", "", paths)
    self._check_nonempty(patterns)


class JsonlSource(_Source):
  """One JSON object per line; the document is the string in `text_field`."""

  def __init__(self, patterns, text_field: str = "text"):
    paths = _expand(patterns)
    # Compact int64 arrays rather than lists: corpora can have many millions of lines.
    file_ids, offsets, line_numbers = array.array("q"), array.array("q"), array.array("q")
    blank, empty = 0, []
    for file_id, path in enumerate(paths):
      offset = 0
      try:
        with open(path, "rb") as f:
          for line_number, line in enumerate(f, 1):
            if line.strip():
              file_ids.append(file_id)
              offsets.append(offset)
              line_numbers.append(line_number)
            else:
              blank += 1
            offset += len(line)
      except OSError as e:
        raise ValueError(f"cannot read JSONL file {path}: {e}") from e
      if not offset:
        empty.append(path)
    super().__init__(f"jsonl({len(paths)} files, field {text_field!r})", len(offsets))
    self._paths, self._text_field = paths, text_field
    self._file_ids = np.asarray(file_ids, np.int64)
    self._offsets = np.asarray(offsets, np.int64)
    self._line_numbers = np.asarray(line_numbers, np.int64)
    self.index_stats.update(empty_files=len(empty), blank_lines=blank)
    _log_excluded(self.name, "empty", empty)
    if blank:
      logging.warning("%s: skipped %d blank line(s)", self.name, blank)
    self._check_nonempty(patterns)

  def key(self, i) -> str:
    i = self._index(i)
    return f"{self._paths[self._file_ids[i]]}:{self._line_numbers[i]}"

  def _read(self, i) -> Document:
    path = self._paths[self._file_ids[i]]
    try:
      with open(path, "rb") as f:
        f.seek(int(self._offsets[i]))
        line = f.readline()
    except OSError as e:
      return self._problem("unreadable", self.key(i), e)
    try:
      obj = json.loads(line)
    except ValueError as e:  # Includes UnicodeDecodeError.
      return self._problem("malformed", self.key(i), f"invalid JSON ({e})")
    if not isinstance(obj, dict):
      return self._problem("malformed", self.key(i), f"not an object ({type(obj).__name__})")
    text = obj.get(self._text_field)
    if not isinstance(text, str):
      detail = "missing" if self._text_field not in obj else f"a {type(text).__name__}"
      return self._problem("malformed", self.key(i), f"field {self._text_field!r} is {detail}")
    return Document(_to_bytes(text), None) if text else Document(b"", "empty")


class ParquetSource(_Source):
  """One document per row of `text_column` (str or bytes) in Parquet files."""

  def __init__(self, patterns, text_column: str = "text"):
    paths = _expand(patterns)
    file_starts, groups, empty, total = [], [], [], 0  # groups: (file, row group, start).
    for file_id, path in enumerate(paths):
      file_starts.append(total)
      try:
        with pq.ParquetFile(path) as pf:
          schema, meta = pf.schema_arrow, pf.metadata
      except (OSError, pa.ArrowException) as e:
        raise ValueError(f"cannot read Parquet file {path}: {e}") from e
      if text_column not in schema.names:
        raise ValueError(f"Parquet file {path} has no column {text_column!r}; "
                         f"available columns: {schema.names}")
      column_type = schema.field(text_column).type
      if not any(f(column_type) for f in _TEXT_TYPES):
        raise ValueError(f"Parquet file {path}: column {text_column!r} has type "
                         f"{column_type}, expected string or binary")
      for rg in range(meta.num_row_groups):
        rows = meta.row_group(rg).num_rows
        if rows:
          groups.append((file_id, rg, total))
          total += rows
      if total == file_starts[-1]:
        empty.append(path)
    super().__init__(f"parquet({len(paths)} files, column {text_column!r})", total)
    self._paths, self._column = paths, text_column
    self._file_starts = np.asarray(file_starts, np.int64)
    self._groups = np.asarray(groups, np.int64).reshape(-1, 3)
    self.index_stats["empty_files"] = len(empty)
    _log_excluded(self.name, "empty", empty)
    self._check_nonempty(patterns)

  def key(self, i) -> str:
    i = self._index(i)
    file_id = int(np.searchsorted(self._file_starts, i, side="right")) - 1
    return f"{self._paths[file_id]}:{i - self._file_starts[file_id]}"

  def _read(self, i) -> Document:
    g = int(np.searchsorted(self._groups[:, 2], i, side="right")) - 1
    file_id, rg, start = (int(v) for v in self._groups[g])
    cache = self._cache  # (group, values); swapped whole, so threads see a consistent pair.
    if cache is None or cache[0] != g:
      try:
        with pq.ParquetFile(self._paths[file_id]) as pf:
          table = pf.read_row_group(rg, columns=[self._column])
        cache = (g, table.column(0).to_pylist())
      except (OSError, pa.ArrowException) as e:
        return self._problem("unreadable", self.key(i), e)
      self._cache = cache
    value = cache[1][i - start]
    if not value:
      return Document(b"", "empty")
    return Document(_to_bytes(value) if isinstance(value, str) else bytes(value), None)


class ArrayRecordSource(_Source):
  """Each ArrayRecord record is one document's raw bytes."""

  _READER_OPTIONS = "readahead_buffer_size:0"  # Random access: no readahead.

  def __init__(self, patterns):
    paths = _expand(patterns)
    counts = []
    for path in paths:
      reader = array_record_module.ArrayRecordReader(path, self._READER_OPTIONS)
      if not reader.ok():
        raise ValueError(f"cannot open ArrayRecord file {path} (unreadable or not ArrayRecord)")
      counts.append(reader.num_records())
      reader.close()
    empty = [p for p, n in zip(paths, counts) if not n]
    super().__init__(f"arrayrecord({len(paths)} files)", int(sum(counts)))
    self._paths = paths
    self._file_starts = np.cumsum([0] + counts[:-1]).astype(np.int64)
    self.index_stats["empty_files"] = len(empty)
    _log_excluded(self.name, "empty", empty)
    self._check_nonempty(patterns)

  def _locate(self, i) -> tuple[int, int]:
    file_id = int(np.searchsorted(self._file_starts, i, side="right")) - 1
    return file_id, int(i - self._file_starts[file_id])

  def key(self, i) -> str:
    file_id, pos = self._locate(self._index(i))
    return f"{self._paths[file_id]}:{pos}"

  def _read(self, i) -> Document:
    file_id, pos = self._locate(i)
    try:
      with self._lock:  # Readers are shared by grain's reader threads; create once.
        reader = self._readers.get(file_id)
        if reader is None:
          reader = array_record_module.ArrayRecordReader(
              self._paths[file_id], self._READER_OPTIONS)
          self._readers[file_id] = reader
      data = reader.read([pos])[0]
    except (OSError, RuntimeError) as e:
      return self._problem("unreadable", self.key(i), e)
    return Document(data, None) if data else Document(b"", "empty")


def build_source(kind: str, paths=(), text_field: str = "text"):
  """Builds the source `kind` (one of SOURCES) over glob `paths`."""
  if kind not in SOURCES:
    raise ValueError(f"unknown data source {kind!r}; valid kinds: {', '.join(SOURCES)}")
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = list(paths)
  if kind != "stdlib" and not paths:
    raise ValueError(f"data.paths is required for data source {kind!r}")
  if kind == "stdlib" and paths:
    raise ValueError(f"data source 'stdlib' takes no data.paths, got {paths}")
  if text_field != "text" and kind not in ("jsonl", "parquet"):
    raise ValueError(f"text_field={text_field!r} only applies to jsonl and parquet, not {kind!r}")
  if kind == "stdlib":
    return StdlibSource()
  if kind in ("jsonl", "parquet"):
    return (JsonlSource if kind == "jsonl" else ParquetSource)(paths, text_field)
  return (TextFilesSource if kind == "text" else ArrayRecordSource)(paths)


def _key_hash(key: str) -> int:
  digest = hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).digest()
  return int.from_bytes(digest[:8], "big")


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
  hashes = np.array([_key_hash(source.key(i)) for i in range(len(source))], np.uint64)
  held_out = hashes < np.uint64(int(eval_fraction * 2**64))
  name = getattr(source, "name", source)
  if eval_fraction > 0 and len(hashes) < 2:
    logging.warning("%s: %d document(s), too few for a held-out split", name, len(hashes))
  elif eval_fraction > 0:
    for to_eval, pick in ((True, np.argmin), (False, np.argmax)):
      if (held_out != to_eval).all():  # That side is empty: move the extreme hash over.
        j = int(pick(hashes))
        held_out[j] = to_eval
        logging.info("%s: no document hashed into %s (fraction %g); moved %s there", name,
                     "eval" if to_eval else "train", eval_fraction, source.key(j))
  return np.flatnonzero(~held_out), np.flatnonzero(held_out)


class DocumentToTokens(grain.transforms.Map):
  """Document -> {"tokens": BOS + (byte + 4)... + EOS, "doc_flags": FLAG_* bits at index 0}."""

  def map(self, element) -> dict[str, np.ndarray]:
    data, problem = element
    if problem is not None and problem not in PROBLEMS:
      raise ValueError(f"unknown document problem {problem!r}; expected one of {PROBLEMS}")
    flags = 0
    if problem in ("unreadable", "malformed"):
      flags |= FLAG_UNREADABLE
    elif not data:
      flags |= FLAG_EMPTY
    try:
      bytes(data).decode("utf-8")
    except UnicodeDecodeError:
      flags |= FLAG_INVALID_UTF8  # Kept: every byte is a valid input id.
    if b"\x00" in data:
      flags |= FLAG_NUL
    tokens = tokenizer.encode(data)
    doc_flags = np.zeros(tokens.shape, np.int8)
    doc_flags[0] = flags
    return {"tokens": tokens, "doc_flags": doc_flags}


def count_flags(doc_flags) -> dict[str, int]:
  """Counts documents per flag in a `doc_flags` array of any shape."""
  flags = np.asarray(doc_flags)
  names = {"invalid_utf8_docs": FLAG_INVALID_UTF8, "nul_docs": FLAG_NUL,
           "empty_docs": FLAG_EMPTY, "unreadable_docs": FLAG_UNREADABLE}
  return {name: int(np.count_nonzero(flags & bit)) for name, bit in names.items()}
