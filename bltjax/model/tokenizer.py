"""Byte tokenizer for BLT: byte b <-> id b + 4, plus four special ids.

Matches Meta's `BltTokenizer` (no BPE delimiters): ids 0..3 are BOE/pad, BOS,
EOS and BPE; byte value b (0..255) is id b + OFFSET; the vocabulary has 260 ids.

Text policy (where we depart from the reference, and why):
  * encode(str): UTF-8 with `errors="surrogateescape"`, so a string obtained
    with `bytes.decode("utf-8", errors="surrogateescape")` encodes back to the
    exact original bytes. Lone surrogates that surrogateescape cannot map
    (outside U+DC80..U+DCFF) become b"?" (`errors="replace"`). The reference
    encodes with `errors="ignore"` and silently drops them.
  * decode: specials (< OFFSET) are dropped and the bytes are decoded with a
    caller-chosen `errors` policy. The default "replace" turns invalid UTF-8
    into U+FFFD, so decoding never raises and never loses data silently;
    "ignore" reproduces the reference (which drops invalid or truncated
    sequences, e.g. a generation cut mid-character); "surrogateescape"
    round-trips arbitrary bytes through `encode`.
  * Padding is BOE=0 (what Meta's data pipeline actually pads with), not the
    reference's `PAD_ID=-1`, which is never fed to the model.
"""

import codecs

import numpy as np

BOE_ID = 0
PAD_ID = 0  # The reference pads batches with BOE (`tokenizer.boe_id`).
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3
OFFSET = 4  # Byte b has id b + OFFSET.
BYTE_UNITS = 256
VOCAB_SIZE = BYTE_UNITS + OFFSET  # 260


def _text_to_bytes(text: str) -> bytes:
  """UTF-8 with surrogateescape; unmappable lone surrogates become b"?"."""
  try:
    return text.encode("utf-8", errors="surrogateescape")
  except UnicodeEncodeError:
    pass
  # Rare path: encode the good runs in bulk and fall back per character only
  # inside the ranges the codec rejects, so escapable surrogates next to
  # unmappable ones still round-trip.
  out = bytearray()
  pos = 0
  while pos < len(text):
    try:
      out += text[pos:].encode("utf-8", errors="surrogateescape")
      break
    except UnicodeEncodeError as e:
      start, end = pos + e.start, pos + e.end
      out += text[pos:start].encode("utf-8", errors="surrogateescape")
      for ch in text[start:end]:
        try:
          out += ch.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
          out += ch.encode("utf-8", errors="replace")
      pos = end
  return bytes(out)


def encode(
    text: str | bytes | bytearray | memoryview,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
) -> np.ndarray:
  """Encodes text or raw bytes into BLT ids.

  Args:
    text: a `str` (encoded as UTF-8, see the module docstring for lone
      surrogates) or `bytes`/`bytearray`/`memoryview`, taken as-is (every byte,
      including NUL and invalid UTF-8, is a valid input).
    add_bos: prepend BOS_ID (the reference default; generation keeps it).
    add_eos: append EOS_ID (the reference default; generation prompts use
      `add_eos=False`).

  Returns:
    ids_N: int32 array of length `len(bytes) + add_bos + add_eos`.

  Raises:
    TypeError: `text` is not one of the accepted types.
  """
  if isinstance(text, str):
    data = _text_to_bytes(text)
  elif isinstance(text, (bytes, bytearray)):
    data = bytes(text)
  elif isinstance(text, memoryview):
    data = text.tobytes()
  else:
    raise TypeError(
        "encode() expects str, bytes, bytearray or memoryview, got "
        f"{type(text).__name__}"
    )
  byte_ids_N = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + OFFSET
  parts = []
  if add_bos:
    parts.append(np.array([BOS_ID], np.int32))
  parts.append(byte_ids_N)
  if add_eos:
    parts.append(np.array([EOS_ID], np.int32))
  return np.concatenate(parts)


def validate_ids(ids, *, name: str = "tokens") -> None:
  """Checks that `ids` is an integer array with every value in [0, 260).

  Host-side check (it reads the values), meant for inputs at API boundaries.

  Args:
    ids: array-like of any shape (numpy, concrete jax array, nested lists).
    name: what to call the array in error messages.

  Raises:
    ValueError: the dtype is not an integer type, or some id is out of range;
      the message names `name`, the first bad position and its value.
  """
  arr = np.asarray(ids)
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"{name} must have an integer dtype, got {arr.dtype} "
        f"(ids are in [0, {VOCAB_SIZE}))"
    )
  bad = (arr < 0) | (arr >= VOCAB_SIZE)
  if np.any(bad):
    flat = int(np.argmax(bad.reshape(-1)))
    index = np.unravel_index(flat, arr.shape)
    position = ", ".join(str(int(i)) for i in index)
    value = arr.reshape(-1)[flat].item()
    raise ValueError(
        f"{name}[{position}] = {value} is outside the vocabulary "
        f"[0, {VOCAB_SIZE}); {int(np.sum(bad))} bad id(s) in total"
    )


def decode_bytes(ids, *, cut_at_eos: bool = False) -> bytes:
  """Maps ids back to raw bytes, dropping the special ids (< OFFSET).

  Args:
    ids: 1-D integer array-like of ids in [0, 260).
    cut_at_eos: drop everything after the first EOS (as the reference does).

  Returns:
    The byte string (no UTF-8 interpretation).

  Raises:
    ValueError: `ids` is not 1-D, not integer, or has an id outside [0, 260).
  """
  arr = np.asarray(ids)
  if arr.size == 0:  # `np.asarray([])` is float64; nothing to validate.
    return b""
  if arr.ndim != 1:
    raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
  validate_ids(arr, name="ids")
  if cut_at_eos:
    eos = np.flatnonzero(arr == EOS_ID)
    if eos.size:
      arr = arr[: eos[0] + 1]
  byte_ids = arr[arr >= OFFSET]
  return (byte_ids - OFFSET).astype(np.uint8).tobytes()


def decode(ids, *, cut_at_eos: bool = False, errors: str = "replace") -> str:
  """Decodes ids to text, dropping special ids.

  Args:
    ids: 1-D integer array-like of ids in [0, 260).
    cut_at_eos: drop everything after the first EOS (as the reference does).
    errors: codec error policy for invalid UTF-8. "replace" (default) gives
      U+FFFD and never raises; "ignore" reproduces the reference, which drops
      invalid sequences; "surrogateescape" round-trips arbitrary bytes through
      `encode`; "strict" raises UnicodeDecodeError.

  Returns:
    The decoded string.

  Raises:
    ValueError: bad `ids` (see `decode_bytes`).
    LookupError: `errors` is not a registered codec error handler.
  """
  codecs.lookup_error(errors)  # Fail early even when the bytes are valid.
  return decode_bytes(ids, cut_at_eos=cut_at_eos).decode("utf-8", errors=errors)
