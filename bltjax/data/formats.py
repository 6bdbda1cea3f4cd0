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
"""

import json

from etils import epath
import pyarrow as pa
import pyarrow.parquet as pq

from bltjax.data.sources import Document, ProblemLog, to_bytes

START = (0, 0)
BLANK = object()  # The raw record of a blank JSONL line.
SKIP = object()  # A record of the other split.
_DONE = [-1, -1]  # A file given up after a read error: nothing more to read there.
_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view,
               pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
# Read text as bytes: no UTF-8 decode/encode round trip, invalid UTF-8 kept as is.
_AS_BINARY = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}


class _Format:

  def __init__(self, text_field: str, log: ProblemLog, wanted=lambda key: True):
    self.text_field, self.log, self.wanted = text_field, log, wanted

  def _failed(self, key, error):
    return self.log("unreadable", key, error) if self.wanted(key) else SKIP


class Jsonl(_Format):
  """One JSON object per line; the document is the string in `text_field`."""

  def read(self, path: str, pos):
    offset, line_no = pos
    if offset < 0:
      return
    try:
      f = epath.Path(path).open("rb")
      if offset:
        f.seek(offset)
    except Exception as e:  # noqa: BLE001 -- any storage error: one counted unreadable document
      yield path, self._failed(path, e), _DONE
      return
    with f:
      lines = iter(f)
      while True:
        try:
          line = next(lines, None)
        except Exception as e:  # noqa: BLE001
          key = f"{path}:{line_no + 1}"
          yield key, self._failed(key, e), _DONE
          return
        if line is None:
          return
        offset, line_no = offset + len(line), line_no + 1
        key = f"{path}:{line_no}"
        raw = BLANK if not line.strip() else line if self.wanted(key) else SKIP
        yield key, raw, [offset, line_no]

  def decode(self, raw, key: str) -> Document:
    if isinstance(raw, Document):
      return raw
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
    return Document(to_bytes(text), None) if text else Document(b"", "empty")


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

  def read(self, path: str, pos):
    group, row = pos
    if group < 0:
      return
    try:
      f = epath.Path(path).open("rb")
      pf = pq.ParquetFile(f)
    except Exception as e:  # noqa: BLE001
      yield path, self._failed(path, e), _DONE
      return
    with f:
      self._check_schema(path, pf.schema_arrow)  # A wrong column is a config error: raise.
      meta = pf.metadata
      file_row = sum(meta.row_group(g).num_rows for g in range(group)) + row
      for g in range(group, meta.num_row_groups):
        first, rows = (row if g == group else 0), meta.row_group(g).num_rows
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

  def decode(self, raw, key: str) -> Document:
    if isinstance(raw, Document):
      return raw
    if not raw:
      return Document(b"", "empty")
    return Document(to_bytes(raw) if isinstance(raw, str) else bytes(raw), None)


def make(kind: str, text_field: str, log: ProblemLog, wanted=lambda key: True):
  return {"jsonl": Jsonl, "parquet": Parquet}[kind](text_field, log, wanted)
