"""Sequential readers of one JSONL or Parquet file, restartable from a position.

`fmt.read(path, pos)` yields `(key, raw, next_pos)` from position `pos` on: `raw` is the record
before decoding (`fmt.decode(raw, key) -> Document`), or SKIP for a record outside the wanted
split (`wanted(key)` is False: not decoded, and a Parquet row group without wanted rows is not
read), `next_pos` the position just after it (restart there to continue with the next record). A
blank JSONL line yields `raw=BLANK` (not a document; the stream counts it). A file that cannot be
opened or fails mid-read yields one unreadable `Document` (key: the path, or the record where it
failed) and ends. Positions are JSON-able `[int, int]`: JSONL [byte offset, lines read], Parquet
[row group, row in the group]; START is the beginning of a file.

Keys (hashed for the held-out split): `path:line` (1-based, blank lines counted) for JSONL,
`path:row` (0-based row of the file) for Parquet.

Documents longer than `max_bytes` (data.max_document_bytes) keep their first `max_bytes` bytes
and are flagged oversized. A JSONL line is read into memory up to `line_limit(max_bytes)` bytes
(room for the text escaped in JSON plus other fields): the rest of a longer line is skipped
unread, and the document is what the cut line holds of its text field. A Parquet value comes
whole with its row group and is cut after reading.
"""

import codecs
import json

from etils import epath
import pyarrow as pa
import pyarrow.parquet as pq

from bltjax.data.documents import MAX_DOCUMENT_BYTES, Document, ProblemLog, to_bytes

START = (0, 0)
BLANK = object()  # The raw record of a blank JSONL line.
SKIP = object()  # A record of the other split.
_DONE = [-1, -1]  # A file given up after a read error: nothing more to read there.
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
               pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
# Read text as bytes: no UTF-8 decode/encode round trip, invalid UTF-8 kept as is.
_AS_BINARY = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}
_CHUNK = 64 << 10  # bytes per read() of a JSONL file (the memory of a line reader)
_JSON = json.JSONDecoder()


def line_limit(max_bytes: int) -> int:
  """Bytes of a JSONL line read into memory: JSON escapes take up to 3 bytes per byte of text
  outside control characters (ensure_ascii: 12 for a 4-byte character), plus other fields."""
  return 4 * max_bytes + (64 << 10)


class _Cut(bytes):
  """The first `line_limit` bytes of a longer JSONL line; `size` its full length."""
  size = 0


class _Lines:
  """The lines of a binary file, each held in memory up to `limit` bytes (`iter(f)` would hold a
  line whole, and fsspec files (gs://) take no readline size): `next()` -> the line, a `_Cut`
  of a longer line (the rest is read and dropped), or None at the end."""

  def __init__(self, f, limit: int):
    self._f, self._limit, self._buf, self._pos = f, limit, bytearray(), 0

  def _more(self) -> bool:
    del self._buf[:self._pos]
    self._pos = 0
    chunk = self._f.read(_CHUNK)
    self._buf += chunk
    return bool(chunk)

  def next(self):
    buf, limit = self._buf, self._limit
    searched = 0  # Bytes of this line searched for its newline.
    while True:
      nl = buf.find(b"\n", self._pos + searched)
      if nl >= 0 and nl - self._pos <= limit:
        line, self._pos = bytes(buf[self._pos:nl + 1]), nl + 1
        return line
      if nl >= 0 or len(buf) - self._pos > limit:
        break  # Longer than `limit`.
      searched = len(buf) - self._pos
      if not self._more():  # The last line, without a newline.
        line, self._pos = bytes(buf[self._pos:]), len(buf)
        return line or None
    cut = _Cut(buf[self._pos:self._pos + limit])
    while True:  # Skip to the end of the line, a chunk at a time.
      nl = buf.find(b"\n", self._pos)
      if nl >= 0:
        cut.size += nl + 1 - self._pos
        self._pos = nl + 1
        return cut
      cut.size += len(buf) - self._pos
      self._pos = len(buf)
      if not self._more():
        return cut


def _text_prefix(head: bytes, field: str) -> str | None:
  """The string `field` of the JSON object whose line was cut after `head`, as far as `head`
  holds it; None if `head` does not reach it or it is no string (the rest is not parsed)."""
  try:
    s = codecs.getincrementaldecoder("utf-8")().decode(head)  # Drops a character cut in two.
    i = _skip_ws(s, 0)
    if s[i] != "{":
      return None
    i += 1
    while True:
      i = _skip_ws(s, i)
      key, i = json.decoder.scanstring(s, i + 1) if s[i] == '"' else (None, i)
      i = _skip_ws(s, i)
      if key is None or s[i] != ":":
        return None
      i = _skip_ws(s, i + 1)
      if key == field:
        return _string_prefix(s, i) if s[i] == '"' else None
      _, i = _JSON.raw_decode(s, i)  # Another field's value: skip it.
      i = _skip_ws(s, i)
      if s[i] != ",":
        return None
      i += 1
  except (ValueError, IndexError):  # Invalid JSON, or the cut comes first.
    return None


def _skip_ws(s: str, i: int) -> int:
  while s[i] in " \t\r\n":
    i += 1
  return i


def _string_prefix(s: str, i: int) -> str:
  """The JSON string starting at s[i] == '"', up to where `s` ends (an escape cut short at the
  end is dropped)."""
  try:
    return json.decoder.scanstring(s, i + 1)[0]  # Complete within the cut line.
  except ValueError:
    pass
  body = s[i + 1:]
  for drop in range(6):  # The longest cut escape: backslash, u and three hex digits.
    try:
      return json.decoder.scanstring(body[:len(body) - drop] + '"', 0)[0]
    except ValueError:
      continue
  raise ValueError("invalid JSON string")


class _Format:
  """A file format: `read` opens the file (a failure is one unreadable document), `_records`
  reads it from a position, `_decode` turns a record into a Document."""

  def __init__(self, text_field: str, log: ProblemLog, wanted=lambda key: True,
               max_bytes: int = MAX_DOCUMENT_BYTES):
    self.text_field, self.log, self.wanted, self.max_bytes = text_field, log, wanted, max_bytes

  def _failed(self, key, error):
    return self.log("unreadable", key, error) if self.wanted(key) else SKIP

  def read(self, path: str, pos):
    """Yields (key, raw, next_pos) from `pos` on (the module docstring says what they are)."""
    if pos[0] < 0:  # given up after a read error
      return
    try:
      f = epath.Path(path).open("rb")
      reader = self._open(f, pos)
    except Exception as e:  # noqa: BLE001 -- any storage error: one counted unreadable document
      yield path, self._failed(path, e), _DONE
      return
    with f:
      yield from self._records(path, reader, pos)

  def decode(self, raw, key: str) -> Document:
    """The Document of a record `read` yielded (an unreadable one comes as its Document)."""
    return raw if isinstance(raw, Document) else self._decode(raw, key)


class Jsonl(_Format):
  """One JSON object per line; the document is the string in `text_field`."""

  def _open(self, f, pos):
    if pos[0]:
      f.seek(pos[0])
    return f

  def _records(self, path: str, f, pos):
    offset, line_no = pos
    lines = _Lines(f, line_limit(self.max_bytes))
    while True:
      try:
        line = lines.next()
      except Exception as e:  # noqa: BLE001
        key = f"{path}:{line_no + 1}"
        yield key, self._failed(key, e), _DONE
        return
      if line is None:
        return
      offset += line.size if isinstance(line, _Cut) else len(line)
      line_no += 1
      key = f"{path}:{line_no}"
      raw = BLANK if not line.strip() else line if self.wanted(key) else SKIP
      yield key, raw, [offset, line_no]

  def _decode(self, raw, key: str) -> Document:
    if isinstance(raw, _Cut):
      text = _text_prefix(raw, self.text_field)
      data = to_bytes(text or "")[:self.max_bytes]
      return self.log("oversized", key, f"a line of {raw.size} bytes, longer than "
                      f"{len(raw)} (4 x data.max_document_bytes + 64 KiB): kept the first "
                      f"{len(data)} bytes of field {self.text_field!r} (as far as read)", data)
    try:
      obj = json.loads(raw)
    except ValueError as e:  # Includes UnicodeDecodeError.
      return self.log("malformed", key, f"invalid JSON ({e})")
    if not isinstance(obj, dict):
      return self.log("malformed", key, f"not an object ({type(obj).__name__})")
    text = obj.get(self.text_field)
    if not isinstance(text, str):
      detail = "missing" if self.text_field not in obj else f"a {type(text).__name__}"
      return self.log("malformed", key, f"field {self.text_field!r} is {detail}")
    data = to_bytes(text)
    return self.log.document(data, key, self.max_bytes, len(data))


class Parquet(_Format):
  """One document per row of the `text_field` column (string or binary), a row group at a time."""

  def _check_schema(self, path, schema):
    if self.text_field not in schema.names:
      raise ValueError(f"Parquet file {path} has no column {self.text_field!r}; "
                       f"available columns: {schema.names}")
    column_type = schema.field(self.text_field).type
    if not any(f(column_type) for f in _TEXT_TYPES):
      raise ValueError(f"Parquet file {path}: column {self.text_field!r} has type "
                       f"{column_type}, expected string or binary")

  def _open(self, f, pos):
    del pos  # a row group is found from the file's metadata
    return pq.ParquetFile(f)

  def _records(self, path: str, pf, pos):
    group, row = pos
    self._check_schema(path, pf.schema_arrow)  # A wrong column is a config error: raise.
    layout = pf.metadata  # row groups and their sizes
    file_row = sum(layout.row_group(g).num_rows for g in range(group)) + row
    for g in range(group, layout.num_row_groups):
      first, rows = (row if g == group else 0), layout.row_group(g).num_rows
      keys = [f"{path}:{file_row + r - first}" for r in range(first, rows)]
      wanted = [self.wanted(k) for k in keys]
      values = None
      if any(wanted):  # Otherwise the row group is not read at all.
        try:
          column = pf.read_row_group(g, columns=[self.text_field]).column(0)
          target = _AS_BINARY.get(column.type)
          values = (column.cast(target) if target else column).to_pylist()
        except Exception as e:  # noqa: BLE001
          yield keys[0], self._failed(keys[0], e), _DONE
          return
      for r, key, want in zip(range(first, rows), keys, wanted):
        nxt = [g, r + 1] if r + 1 < rows else [g + 1, 0]
        yield key, values[r] if want else SKIP, nxt
      file_row += rows - first

  def _decode(self, raw, key: str) -> Document:
    if raw is None:  # As a JSON null: no text.
      return self.log("malformed", key, f"field {self.text_field!r} is null")
    data = to_bytes(raw) if isinstance(raw, str) else bytes(raw)
    return self.log.document(data, key, self.max_bytes, len(data))


def make(kind: str, text_field: str, log: ProblemLog, wanted=lambda key: True,
         max_bytes: int = MAX_DOCUMENT_BYTES):
  return {"jsonl": Jsonl, "parquet": Parquet}[kind](text_field, log, wanted, max_bytes)
