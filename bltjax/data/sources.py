"""Random-access document sources (grain data sources): `stdlib`, `text`, `arrayrecord`.

`stdlib` and `text` hold one document per file, `arrayrecord` one per record: `len(src)`,
`src[i] -> Document`, `src.key(i)` (a stable id, hashed by the held-out split). JSONL and Parquet
are streamed (`bltjax.data.streams`). Sources pickle for grain's workers: files are opened per
read, readers are not pickled. What a document is, its problems (a document failing at read time
comes back flagged, never dropped), the split and `DocumentToTokens`: `bltjax.data.documents`.
Files are read at most `max_document_bytes` (+ 1) bytes into memory; an ArrayRecord record is
read whole, then cut.
"""

import logging
import operator
import os
import pathlib
import stat
import sys
import sysconfig
import threading

from array_record.python import array_record_module
from etils import epath
import numpy as np

from bltjax.data import paths as paths_lib
from bltjax.data.documents import MAX_DOCUMENT_BYTES, Document, ProblemLog

SOURCES = ("stdlib", "text", "jsonl", "parquet", "arrayrecord")
STREAMED = ("jsonl", "parquet")  # read sequentially, sharded by file (bltjax.data.streams)
_READ_CHUNK = 1 << 20  # bytes per read() of a document file

_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
_LOG_EXAMPLES = 5  # Paths shown when logging exclusions.


def read_prefix(f, max_bytes: int) -> bytes:
  """At most `max_bytes + 1` bytes of file `f` (one more tells an oversized document), in chunks:
  a huge file is never read whole, nor is a buffer of `max_bytes` allocated per small file."""
  chunks, size = [], 0
  while size <= max_bytes:
    chunk = f.read(min(_READ_CHUNK, max_bytes + 1 - size))
    if not chunk:
      break
    chunks.append(chunk)
    size += len(chunk)
  return b"".join(chunks)


class _Source:
  """Index checks, pickling and logging shared by the random-access sources."""

  _TRANSIENT = ("_readers", "_lock", "_problem")

  def __init__(self, name: str, size: int, max_document_bytes: int):
    self.name = name
    self._size, self.max_document_bytes = size, max_document_bytes
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

  def __init__(self, name, root, keys, max_document_bytes):
    super().__init__(name, len(keys), max_document_bytes)
    self._root, self._keys = root, list(keys)

  def key(self, i) -> str:
    return self._keys[self._index(i)]

  def _read(self, i) -> Document:
    key = self._keys[i]
    path = f"{self._root}/{key}" if self._root else key
    try:  # A directory or broken symlink listed as a file fails here too.
      with epath.Path(path).open("rb") as f:
        data = read_prefix(f, self.max_document_bytes)
    except Exception as e:  # noqa: BLE001 -- any storage error: one counted unreadable document
      return self._problem("unreadable", path, e)
    return self._problem.document(data, path, self.max_document_bytes)


class StdlibSource(_FileSource):
  """The running Python's standard library `*.py` files, minus tests and site-packages.

  The one source that excludes empty/unreadable files while listing (the stdlib is small and
  local): this keeps the quickstart's documents as they have always been."""

  def __init__(self, max_document_bytes: int = MAX_DOCUMENT_BYTES):
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
    super().__init__(f"stdlib(python{version})", root, keys, max_document_bytes)
    self.index_stats.update(unreadable_files=len(unreadable), empty_files=len(empty))
    for what, excluded in (("unreadable", unreadable), ("empty", empty)):
      if excluded:
        logging.warning("%s: excluded %d %s file(s), e.g. %s", self.name, len(excluded), what,
                        ", ".join(excluded[:_LOG_EXAMPLES]))
    self._check_nonempty(root)


class TextFilesSource(_FileSource):
  """One document per file matched by glob patterns (local or gs://); `key` is the path."""

  def __init__(self, patterns, max_document_bytes: int = MAX_DOCUMENT_BYTES):
    files = paths_lib.expand(patterns)
    super().__init__(f"text({len(files)} files)", "", files, max_document_bytes)


class ArrayRecordSource(_Source):
  """Each ArrayRecord record is one document's raw bytes; `files` are opened (only these).

  array_record reads gs:// itself (its bundled GCS client, application default credentials),
  not through etils.epath."""

  _READER_OPTIONS = "readahead_buffer_size:0"  # Random access: no readahead.

  def __init__(self, files, max_document_bytes: int = MAX_DOCUMENT_BYTES):
    files = list(files)
    counts = []
    for path in files:
      reader = array_record_module.ArrayRecordReader(path, self._READER_OPTIONS)
      if not reader.ok():
        raise ValueError(f"cannot open ArrayRecord file {path} (unreadable or not ArrayRecord)")
      counts.append(reader.num_records())
      reader.close()
    super().__init__(f"arrayrecord({len(files)} files)", int(sum(counts)),
                     max_document_bytes)
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
    # The reader returns the record whole: a huge record is cut after reading.
    return self._problem.document(data, self.key(i), self.max_document_bytes, len(data))


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


def build_source(kind: str, paths=(), text_field: str = "text",
                 max_document_bytes: int = MAX_DOCUMENT_BYTES):
  """The random-access source `kind` over glob `paths` (every matched file)."""
  paths = check_source(kind, paths, text_field)
  if kind in STREAMED:
    raise ValueError(f"data source {kind!r} is streamed: see bltjax.data.streams")
  if kind == "stdlib":
    return StdlibSource(max_document_bytes)
  if kind == "text":
    return TextFilesSource(paths, max_document_bytes)
  return ArrayRecordSource(paths_lib.expand(paths), max_document_bytes)
