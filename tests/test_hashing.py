"""Tests for bltjax.model.hashing: int64 semantics and 32-bit JAX parity."""

import dataclasses

import jax
import numpy as np
import pytest

from bltjax.model import hashing
from tests import tiny

_JIT_HASH = jax.jit(
    hashing.hash_ids, static_argnames=("group_sizes", "num_functions", "vocab")
)


def _wrap_int64(h: int) -> int:
  return ((h + 2**63) % 2**64) - 2**63


def _python_hash_ids(tokens, group_sizes, num_functions, vocab):
  """Independent reference: Python ints, explicit n-grams, wrap once at the end.

  Wrapping only the final sum is equivalent to wrapping every product and
  partial sum (including prime**j), since all of them are taken mod 2**64.
  """
  out = []
  for row in tokens:
    row = [int(x) for x in row]
    out_row = []
    for t in range(len(row)):
      ids_t = []
      for f in range(num_functions):
        prime = hashing.PRIMES[f % 11]
        for n in group_sizes:
          ngram = [row[i] if i >= 0 else 0 for i in range(t - n + 1, t + 1)]
          h = sum(w * prime**j for j, w in enumerate(ngram))
          ids_t.append(_wrap_int64(h) % vocab)
      out_row.append(ids_t)
    out.append(out_row)
  return np.array(out, dtype=np.int64)


def _has_negative_wrapped_sums(tokens, group_sizes, num_functions):
  for row in tokens:
    row = [int(x) for x in row]
    for t in range(len(row)):
      for f in range(num_functions):
        prime = hashing.PRIMES[f % 11]
        for n in group_sizes:
          ngram = [row[i] if i >= 0 else 0 for i in range(t - n + 1, t + 1)]
          if _wrap_int64(sum(w * prime**j for j, w in enumerate(ngram))) < 0:
            return True
  return False


def test_hand_computed_small_example():
  p = 1000000007  # PRIMES[0]
  tokens = np.array([[1, 80, 105]])
  ids = hashing.hash_ids_numpy(
      tokens, group_sizes=(2,), num_functions=1, vocab=101
  )
  # n=2: n-grams [0, 1], [1, 80], [80, 105]; the oldest token gets p**0.
  # No wrap-around yet (all sums < 2**63).
  expected = [(0 + 1 * p) % 101, (1 + 80 * p) % 101, (80 + 105 * p) % 101]
  assert ids.shape == (1, 3, 1)
  assert ids[0, :, 0].tolist() == expected

  # n=3: 10 * p**2 ~ 1e19 overflows int64 and wraps to a negative value.
  tokens = np.array([[259, 259, 10]])
  ids = hashing.hash_ids_numpy(
      tokens, group_sizes=(3,), num_functions=1, vocab=101
  )
  h = 259 + 259 * p + 10 * p**2  # Window [259, 259, 10], oldest first.
  wrapped = h % 2**64
  wrapped = wrapped - 2**64 if wrapped >= 2**63 else wrapped
  assert wrapped == -8446743674709549054  # Negative: exercises floor-mod.
  assert wrapped % 101 == 100  # Python % is floor mod (C-style % gives -1).
  assert ids[0, 2, 0] == 100
  # Position 0 sees [0, 0, 259]: only the newest token, times p**2.
  assert ids[0, 0, 0] == _wrap_int64(259 * p**2) % 101


def test_prime_power_itself_wraps():
  # PRIMES[6] ** 2 > 2**64: the power is reduced before multiplying.
  prime = hashing.PRIMES[6]
  assert prime**2 > 2**64
  tokens = np.array([[7, 11]])
  ids = hashing.hash_ids_numpy(
      tokens, group_sizes=(2,), num_functions=7, vocab=500002
  )
  assert ids.shape == (1, 2, 7)
  assert ids[0, 1, 6] == _wrap_int64(7 + 11 * prime) % 500002
  ids3 = hashing.hash_ids_numpy(
      np.array([[3, 5, 9]]), group_sizes=(3,), num_functions=7, vocab=500002
  )
  assert ids3[0, 2, 6] == _wrap_int64(3 + 5 * prime + 9 * prime**2) % 500002


def test_numpy_matches_python_reference_with_wraparound():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 260, size=(3, 40))
  tokens[0, :12] = 259  # Large ids in long n-grams: wraps for sure.
  tokens[1, :] = 0  # Pad-only n-grams.
  tokens[2, 0] = 1  # BOS.
  group_sizes = (1, 3, 8)
  assert _has_negative_wrapped_sums(tokens, group_sizes, 3)
  for vocab in (500002, 101, 2**24 - 1):
    got = hashing.hash_ids_numpy(
        tokens, group_sizes=group_sizes, num_functions=3, vocab=vocab
    )
    want = _python_hash_ids(tokens, group_sizes, 3, vocab)
    assert got.dtype == np.int32
    assert got.shape == (3, 40, 9)
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() < vocab


def test_numpy_no_overflow_warnings():
  tokens = np.full((2, 16), 259)
  with np.errstate(all="raise"):
    hashing.hash_ids_numpy(tokens, num_functions=11)


def test_table_order_is_function_major():
  tokens = np.random.default_rng(1).integers(0, 260, size=(2, 10))
  both = hashing.hash_ids_numpy(
      tokens, group_sizes=(3, 5), num_functions=2, vocab=997
  )
  for f in range(2):
    for g, n in enumerate((3, 5)):
      single = _python_hash_ids(tokens, (n,), f + 1, 997)[..., f]
      np.testing.assert_array_equal(both[..., f * 2 + g], single)


@pytest.mark.parametrize(
    "group_sizes,num_functions,vocab",
    [
        ((3, 4, 5, 6, 7, 8), 1, 500002),
        ((3, 4, 5, 6, 7, 8), 3, 50002),
        ((1, 2), 2, 101),
        ((8,), 3, 2**24 - 1),
        ((5, 3), 1, 1),
    ],
)
def test_jax_matches_numpy(group_sizes, num_functions, vocab):
  assert not jax.config.jax_enable_x64  # The point: exact in 32-bit JAX.
  rng = np.random.default_rng(vocab)
  tokens = rng.integers(0, 260, size=(4, 37)).astype(np.int32)
  tokens[0, :16] = 259
  tokens[1, 5:] = 0
  got = _JIT_HASH(
      tokens, group_sizes=group_sizes, num_functions=num_functions, vocab=vocab
  )
  assert got.dtype == np.int32
  want = hashing.hash_ids_numpy(
      tokens, group_sizes=group_sizes, num_functions=num_functions, vocab=vocab
  )
  np.testing.assert_array_equal(np.asarray(got), want)


def test_jax_matches_numpy_all_primes_and_any_int32():
  # Every prime, and tokens over the full int32 range (negatives are
  # sign-extended to int64, as the reference would see them).
  rng = np.random.default_rng(2)
  tokens = rng.integers(-(2**31), 2**31, size=(2, 20), dtype=np.int64)
  tokens = tokens.astype(np.int32)
  kw = dict(group_sizes=(2, 7), num_functions=12, vocab=65521)
  np.testing.assert_array_equal(
      np.asarray(hashing.hash_ids(tokens, **kw)),
      hashing.hash_ids_numpy(tokens, **kw),
  )


def test_short_and_empty_rows():
  kw = dict(group_sizes=(3, 8), num_functions=1, vocab=500002)
  tokens = np.array([[1, 77]], np.int32)  # N < n: n-grams are mostly padding.
  np.testing.assert_array_equal(
      np.asarray(hashing.hash_ids(tokens, **kw)),
      hashing.hash_ids_numpy(tokens, **kw),
  )
  empty = np.zeros((2, 0), np.int32)
  assert hashing.hash_ids(empty, **kw).shape == (2, 0, 2)
  assert hashing.hash_ids_numpy(empty, **kw).shape == (2, 0, 2)


def test_matches_hugging_face_port():
  torch = pytest.importorskip("torch")
  modeling_blt = pytest.importorskip("transformers.models.blt.modeling_blt")
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 260, size=(2, 33))
  tokens[0, :10] = 259
  group_sizes, num_functions, vocab = (3, 4, 5, 6, 7, 8), 2, 500002
  ours = np.asarray(
      _JIT_HASH(
          tokens.astype(np.int32),
          group_sizes=group_sizes,
          num_functions=num_functions,
          vocab=vocab,
      )
  )
  torch_tokens = torch.from_numpy(tokens.astype(np.int64))
  for f in range(num_functions):
    for g, n in enumerate(group_sizes):
      theirs = modeling_blt.byte_group_hash_function(
          torch_tokens, n, hashing.PRIMES[f % 11], vocab
      ).numpy()
      np.testing.assert_array_equal(ours[..., f * len(group_sizes) + g], theirs)


def test_config_errors():
  tokens = np.zeros((1, 4), np.int32)
  with pytest.raises(ValueError, match="vocab"):
    hashing.hash_ids(tokens, vocab=2**24)
  with pytest.raises(ValueError, match="vocab"):
    hashing.hash_ids_numpy(tokens, vocab=0)
  with pytest.raises(ValueError, match="group_sizes"):
    hashing.hash_ids(tokens, group_sizes=(3, 0))
  with pytest.raises(ValueError, match="group_sizes"):
    hashing.hash_ids_numpy(tokens, group_sizes=())
  # numpy integer hyperparameters are accepted (and made plain ints).
  np_kw = dict(num_functions=np.int64(2), vocab=np.int64(97))
  np.testing.assert_array_equal(
      np.asarray(hashing.hash_ids(tokens + 5, **np_kw)),
      hashing.hash_ids_numpy(tokens + 5, num_functions=2, vocab=97),
  )
  with pytest.raises(ValueError, match="num_functions"):
    hashing.hash_ids(tokens, num_functions=0)
  with pytest.raises(ValueError, match="tokens_BxN"):
    hashing.hash_ids_numpy(np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="tokens_BxN"):
    hashing.hash_ids(np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("group_sizes, num_functions", [(hashing.DEFAULT_GROUP_SIZES, 1),
                                                         ((1, 2, 3), 2), ((3, 4), 3)])
def test_one_table_per_function_and_ngram_size(group_sizes, num_functions):
  """T = BLTConfig.num_hash_tables: the model's hash embedding has one table per id column."""
  cfg = dataclasses.replace(tiny.blt_config(), hash_group_sizes=group_sizes,
                            hash_functions=num_functions)
  tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
  kw = dict(group_sizes=group_sizes, num_functions=num_functions, vocab=97)
  assert hashing.hash_ids_numpy(tokens, **kw).shape == (2, 5, cfg.num_hash_tables)
  assert _JIT_HASH(tokens, **kw).shape == (2, 5, cfg.num_hash_tables)
