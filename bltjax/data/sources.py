"""Documents: random-access sources (grain data sources), the held-out split, DocumentToTokens.

Random-access kinds: `stdlib` and `text` (one document per file) and `arrayrecord` (one record per
document): `len(src)`, `src[i] -> Document`, `src.key(i)` (a stable id, hashed by the split).
JSONL and Parquet are streamed (`bltjax.data.streams`). Sources pickle for grain's workers: files
are opened per read, readers are not pickled. Nothing is dropped silently: documents failing at
read time (empty, unreadable, malformed) come back with `problem` set and become flagged
`[BOS, EOS]` in `DocumentToTokens`, which the training metrics count.
"""

import hashlib
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
from etils import epath
import grain
import numpy as np

from bltjax import tokenizer
from bltjax.data import paths as paths_lib

Document = typing.NamedTuple("Document", [("data", bytes), ("problem", str | None)])
PROBLEMS = ("empty", "unreadable", "malformed")
SOURCES = ("stdlib", "text", "jsonl", "parquet", "arrayrecord")
STREAMED = ("jsonl", "parquet")  # read sequentially, sharded by file (bltjax.data.streams)

FLAG_INVALID_UTF8 = 1
FLAG_NUL = 2
FLAG_EMPTY = 4
FLAG_UNREADABLE = 8  # Also set for "malformed" records.

_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_LOG_EXAMPLES = 5  # Paths shown when logging exclusions.
MAX_READ_WARNINGS = 10  # Per source/stream instance and process; flags count the rest.


def to_bytes(text: str) -> bytes:
  """UTF-8, with the tokenizer's policy for lone surrogates."""
  try:
    return text.encode("utf-8")
  except UnicodeEncodeError:
    ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    return tokenizer.decode_bytes(ids)


class ProblemLog:
  """Logs the first few read-time problems of one reader; `DocumentToTokens` counts all."""

  def __init__(self, name: str):
    self.name, self.count = name, 0

  def __call__(self, problem: str, key: str, detail) -> Document:
    self.count += 1
    if self.count <= MAX_READ_WARNINGS:
      more = " (further problems are only counted)" if self.count == MAX_READ_WARNINGS else ""
      logging.warning("%s: %s document %s: %s%s", self.name, problem, key, detail, more)
    return Document(b"", problem)


class _Source:
  """Index checks, pickling and logging shared by the random-access sources."""

  _TRANSIENT = ("_readers", "_lock", "_problem")

  def __init__(self, name: str, size: int):
    self.name = name
    self._size = size
    self.index_stats = {"unreadable_files": 0, "empty_files": 0}
    self._reset()

  def _reset(self):
    self._readers = {}
    self._lock = threading.Lock()
    self._problem = ProblemLog(self.name)

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


class _FileSource(_Source):
  """One document per file; `key` is the path relative to `root` ("" = as given). Files are not
  stat'ed up front: empty and unreadable files are flagged when read."""

  def __init__(self, name, root, keys):
    super().__init__(name, len(keys))
    self._root, self._keys = root, list(keys)

  def key(self, i) -> str:
    return self._keys[self._index(i)]

  def _read(self, i) -> Document:
    key = self._keys[i]
    path = f"{self._root}/{key}" if self._root else key
    try:
      data = epath.Path(path).read_bytes()
    except Exception as e:  # noqa: BLE001 -- any storage error: one counted unreadable document
      return self._problem("unreadable", path, e)
    return Document(data, None) if data else Document(b"", "empty")


class StdlibSource(_FileSource):
  """The running Python's standard library `*.py` files, minus tests and site-packages.

  The one source that excludes empty/unreadable files while listing (the stdlib is small and
  local): this keeps the quickstart's documents as they have always been."""

  def __init__(self):
    root = sysconfig.get_paths()["stdlib"]
    errors, keys, unreadable, empty = [], [], [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
      dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
      for filename in filenames:
        if filename.endswith(".py") and not filename.startswith("test_"):
          path = os.path.join(dirpath, filename)
          try:
            st = os.stat(path)
            ok = stat.S_ISREG(st.st_mode) and os.access(path, os.R_OK)
          except OSError:
            ok = False
          if not ok or not st.st_size:
            (empty if ok else unreadable).append(path)
            continue
          keys.append(pathlib.PurePath(os.path.relpath(path, root)).as_posix())
    keys.sort()  # Relative POSIX paths: the same order on every machine.
    # Directories os.walk could not list count as unreadable files.
    unreadable += [e.filename or str(e) for e in errors]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    super().__init__(f"stdlib(python{version})", root, keys)
    self.index_stats.update(unreadable_files=len(unreadable), empty_files=len(empty))
    for what, excluded in (("unreadable", unreadable), ("empty", empty)):
      if excluded:
        logging.warning("%s: excluded %d %s file(s), e.g. %s", self.name, len(excluded), what,
                        ", ".join(excluded[:_LOG_EXAMPLES]))
    self._check_nonempty(root)


class TextFilesSource(_FileSource):
  """One document per file matched by glob patterns (local or gs://); `key` is the path."""

  def __init__(self, patterns):
    files = paths_lib.expand(patterns)
    super().__init__(f"text({len(files)} files)", "", files)


class ArrayRecordSource(_Source):
  """Each ArrayRecord record is one document's raw bytes; `files` are opened (only these).

  array_record reads gs:// itself (its bundled GCS client, application default credentials),
  not through etils.epath."""

  _READER_OPTIONS = "readahead_buffer_size:0"  # Random access: no readahead.

  def __init__(self, files):
    files = list(files)
    counts = []
    for path in files:
      reader = array_record_module.ArrayRecordReader(path, self._READER_OPTIONS)
      if not reader.ok():
        raise ValueError(f"cannot open ArrayRecord file {path} (unreadable or not ArrayRecord)")
      counts.append(reader.num_records())
      reader.close()
    super().__init__(f"arrayrecord({len(files)} files)", int(sum(counts)))
    self._paths = files
    self._file_starts = np.cumsum([0] + counts[:-1]).astype(np.int64)  # [files]
    self.index_stats["empty_files"] = counts.count(0)

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


def check_source(kind: str, paths=(), text_field: str = "text", where: str = "data") -> list:
  """Validates a source's kind/paths/text_field (errors name `where`'s fields); returns paths."""
  if kind not in SOURCES:
    raise ValueError(f"{where}.source={kind!r} is unknown; valid kinds: {', '.join(SOURCES)}")
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = list(paths)
  if kind != "stdlib" and not paths:
    raise ValueError(f"{where}.paths is required for data source {kind!r}")
  if kind == "stdlib" and paths:
    raise ValueError(f"data source 'stdlib' takes no {where}.paths, got {paths}")
  if text_field != "text" and kind not in STREAMED:
    raise ValueError(f"{where}.text_field={text_field!r} only applies to jsonl and parquet, "
                     f"not {kind!r}")
  return paths


def build_source(kind: str, paths=(), text_field: str = "text"):
  """The random-access source `kind` over glob `paths` (every matched file)."""
  paths = check_source(kind, paths, text_field)
  if kind in STREAMED:
    raise ValueError(f"data source {kind!r} is streamed: see bltjax.data.streams")
  if kind == "stdlib":
    return StdlibSource()
  if kind == "text":
    return TextFilesSource(paths)
  return ArrayRecordSource(paths_lib.expand(paths))


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
