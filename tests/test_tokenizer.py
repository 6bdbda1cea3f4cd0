"""Tests for bltjax.model.tokenizer: reference ids, bytes input, decode policies."""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.model import tokenizer as tok


def test_constants():
  specials = (tok.BOE_ID, tok.PAD_ID, tok.BOS_ID, tok.EOS_ID, tok.BPE_ID)
  assert specials == (0, 0, 1, 2, 3)
  assert tok.OFFSET == 4 and tok.VOCAB_SIZE == 260


def test_reference_fixture():
  # Meta's fixtures/tokenizer_data.json.
  ids = tok.encode("Let's check if these tokenizers match!")
  assert ids.dtype == np.int32
  assert ids[:7].tolist() == [1, 80, 105, 120, 43, 119, 36]
  assert ids[-2:].tolist() == [37, 2]
  assert len(ids) == len("Let's check if these tokenizers match!") + 2


def test_bos_eos_flags():
  assert tok.encode("a").tolist() == [1, 101, 2]
  assert tok.encode("a", add_eos=False).tolist() == [1, 101]
  assert tok.encode("a", add_bos=False).tolist() == [101, 2]
  assert tok.encode("", add_bos=False, add_eos=False).tolist() == []
  assert tok.encode("").tolist() == [1, 2]


def test_bytes_input_taken_as_is():
  data = b"\x00ab\xff\xfe\x80"  # NUL and invalid UTF-8.
  want = [1, 4, 101, 102, 259, 258, 132, 2]
  assert tok.encode(data).tolist() == want
  assert tok.encode(bytearray(data)).tolist() == want
  assert tok.encode(memoryview(data)).tolist() == want
  assert tok.decode_bytes(tok.encode(data)) == data


def test_utf8_multibyte():
  ids = tok.encode("é€😀", add_bos=False, add_eos=False)
  assert (ids - 4).tolist() == list("é€😀".encode("utf-8"))
  assert tok.decode(tok.encode("é€😀")) == "é€😀"


def test_encode_type_errors():
  for bad in (None, 3, [1, 2], np.array([1, 2], np.uint8)):
    with pytest.raises(TypeError, match=type(bad).__name__):
      tok.encode(bad)


def test_lone_surrogates():
  # surrogateescape round-trips the bytes a surrogateescape decode produced.
  raw = b"ok\xff\xfe"
  text = raw.decode("utf-8", errors="surrogateescape")
  assert tok.decode_bytes(tok.encode(text)) == raw
  # Unmappable lone surrogates become "?" (the reference drops them);
  # escapable neighbours still round-trip.
  ids = tok.encode("a\ud800b\udcffc", add_bos=False, add_eos=False)
  assert tok.decode_bytes(ids) == b"a?b\xffc"
  assert tok.decode_bytes(tok.encode("\ud83d\ude00")) == b"??"


def test_decode_drops_specials_and_cuts_at_eos():
  ids = [1, 0, 108, 3, 109, 2, 110, 0]  # BOS, pad, "h", BPE, "i", EOS, "j", pad
  assert tok.decode(ids) == "hij"
  assert tok.decode(ids, cut_at_eos=True) == "hi"
  assert tok.decode_bytes(ids, cut_at_eos=True) == b"hi"
  assert tok.decode([]) == ""
  assert tok.decode_bytes(np.zeros((0,), np.int32)) == b""


def test_decode_policies():
  ids = tok.encode(b"a\xe2\x82b")  # Truncated 3-byte sequence.
  assert tok.decode(ids) == "a\ufffdb"  # Default: visible replacement.
  assert tok.decode(ids, errors="ignore") == "ab"  # The reference.
  text = tok.decode(ids, errors="surrogateescape")
  assert tok.decode_bytes(tok.encode(text)) == b"a\xe2\x82b"
  with pytest.raises(UnicodeDecodeError):
    tok.decode(ids, errors="strict")
  with pytest.raises(LookupError):
    tok.decode(tok.encode("valid"), errors="no-such-handler")


def test_decode_accepts_numpy_and_jax():
  ids = tok.encode("hey")
  assert tok.decode(ids) == "hey"
  assert tok.decode(jnp.asarray(ids)) == "hey"
  assert tok.decode(ids.tolist()) == "hey"
  assert tok.decode(ids.astype(np.uint16)) == "hey"


def test_bad_ids():
  with pytest.raises(ValueError, match=r"ids\[3\] = 260"):
    tok.decode([1, 100, 101, 260, -1])
  with pytest.raises(ValueError, match=r"ids\[1\] = -1"):
    tok.decode_bytes(np.array([5, -1, 999], np.int64))
  with pytest.raises(ValueError, match="integer dtype"):
    tok.decode(np.array([5.0, 6.0]))
  with pytest.raises(ValueError, match="1-D"):
    tok.decode(np.ones((2, 3), np.int32))


def test_validate_ids():
  tok.validate_ids(np.arange(260).reshape(2, 130))
  tok.validate_ids(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"tokens\[1, 2\] = 300.*\[0, 260\)"):
    tok.validate_ids(np.array([[1, 2, 3], [4, 5, 300]]))
  with pytest.raises(ValueError, match=r"batch\[0\] = -4"):
    tok.validate_ids([-4, 1000], name="batch")
  with pytest.raises(ValueError, match="integer dtype"):
    tok.validate_ids(np.array([True, False]))
  with pytest.raises(ValueError, match="integer dtype"):
    tok.validate_ids(np.zeros(3, np.float32))


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(data=st.binary(max_size=64))
def test_bytes_round_trip(data):
  ids = tok.encode(data)
  tok.validate_ids(ids)
  assert tok.decode_bytes(ids) == data
  text = tok.decode(ids, errors="surrogateescape")
  assert tok.encode(text).tolist() == ids.tolist()


# Surrogates (category Cs) are not valid UTF-8 text; see test_lone_surrogates.
_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)))


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(text=_TEXT)
def test_text_round_trip(text):
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode(text), errors="ignore") == text
