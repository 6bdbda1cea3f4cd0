"""Hash n-gram ids for BLT byte embeddings (Meta's `byte_group_hash_function`).

For hash function f (prime `PRIMES[f % 11]`) and n-gram size n, the id at
position t of a row x of token ids (byte + 4; BOS=1, EOS=2, pad=0) is

  w = [x[t-n+1], ..., x[t]]                   (oldest first, x[<0] = 0)
  h = sum_j w[j] * prime**j                   (int64, two's-complement wrap)
  id = h mod vocab                            (floor mod: id in [0, vocab))

Details that the released weights were trained with, so we keep them even where
the paper says otherwise: the row is left-padded with n-1 zeros (the n-grams of
the first positions are hashed, not omitted); the *oldest* token gets prime**0;
`prime**j` itself wraps in int64; the modulo is Python/`torch.remainder` style
even for wrapped negative sums. Tables are ordered function-major:
`table = f * len(group_sizes) + group_index`.

Two implementations that agree exactly:
  * `hash_ids_numpy`: int64 numpy, for the host-side input pipeline and tests.
  * `hash_ids`: pure 32-bit JAX (works without `jax_enable_x64`), the 64-bit
    sum kept as (hi, lo) uint32 limbs; jittable with static hyperparameters.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# Meta's list; functions beyond 11 reuse primes cyclically (the HF port's
# `primes[f % 11]`; the reference itself would index out of range).
PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)
DEFAULT_GROUP_SIZES = (3, 4, 5, 6, 7, 8)

_MASK32 = (1 << 32) - 1
# `hash_ids` reduces with Horner steps `r * 256 + byte` in uint32.
_MAX_JAX_VOCAB = 1 << 24


def _check_config(group_sizes, num_functions, vocab, max_vocab, why):
  """Validates the static hyperparameters; returns them as plain Python ints."""
  group_sizes = tuple(group_sizes)
  if not group_sizes:
    raise ValueError("group_sizes must not be empty")
  if not all(_is_int(n) and n >= 1 for n in group_sizes):
    raise ValueError(f"group_sizes must be positive ints, got {group_sizes}")
  if not _is_int(num_functions) or num_functions < 1:
    raise ValueError(f"num_functions must be a positive int, got {num_functions}")
  if not _is_int(vocab) or not 1 <= vocab < max_vocab:
    raise ValueError(f"vocab must be an int in [1, {max_vocab}) ({why}), got {vocab}")
  # Plain ints: numpy scalars would overflow in the 2**64 arithmetic below.
  return tuple(int(n) for n in group_sizes), int(num_functions), int(vocab)


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _tables(group_sizes, num_functions):
  """(prime, n-gram size) of every table, in table order: function-major."""
  for f in range(num_functions):
    for n in group_sizes:
      yield PRIMES[f % len(PRIMES)], n


def _check_tokens(tokens_BxN, xp):
  """Raises unless `tokens_BxN` (a numpy or JAX array, `xp` its module) is 2-D integer."""
  if tokens_BxN.ndim != 2 or not xp.issubdtype(tokens_BxN.dtype, xp.integer):
    raise ValueError("tokens_BxN must be a 2-D integer array, got shape "
                     f"{tokens_BxN.shape} dtype {tokens_BxN.dtype}")


def _prime_powers_u64(prime: int, n: int) -> list[int]:
  """prime**j mod 2**64 for j < n, as Python ints (the int64 bit patterns)."""
  return [pow(prime, j, 1 << 64) for j in range(n)]


def hash_ids_numpy(tokens_BxN, *, group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
                   num_functions: int = 1, vocab: int = 500002) -> np.ndarray:
  """Hash n-gram ids with int64 numpy arithmetic.

  Args:
    tokens_BxN: integer array-like [B, N] of token ids (any int64 values).
    group_sizes: n-gram sizes, in table order within a function.
    num_functions: number of hash functions (primes).
    vocab: rows per hash table, in [1, 2**31) so that ids fit int32.

  Returns:
    ids_BxNxT: int32 [B, N, T], T = num_functions * len(group_sizes), per-table
    ids in [0, vocab) (no per-table offset), tables function-major.
  """
  group_sizes, num_functions, vocab = _check_config(group_sizes, num_functions, vocab, 1 << 31,
                                                    "ids are int32")
  tokens_BxN = np.asarray(tokens_BxN)
  _check_tokens(tokens_BxN, np)
  # uint64 inputs reinterpret as int64 bit patterns, which is what wraps.
  tokens_BxN = tokens_BxN.astype(np.int64)
  b, n_len = tokens_BxN.shape
  out = []
  # Array (not scalar) int64 ops wrap silently; errstate keeps it that way
  # should numpy ever start warning.
  with np.errstate(over="ignore"):
    for prime, n in _tables(group_sizes, num_functions):
      # Bit patterns of prime**j mod 2**64, reinterpreted as int64.
      powers = np.array(_prime_powers_u64(prime, n), np.uint64).view(np.int64)
      padded = np.concatenate([np.zeros((b, n - 1), np.int64), tokens_BxN], axis=1)
      h_BxN = np.zeros((b, n_len), np.int64)
      for j in range(n):
        h_BxN = h_BxN + padded[:, j:j + n_len] * powers[j:j + 1]
      # numpy integer % is floor mod, like Python and torch.remainder.
      out.append(np.mod(h_BxN, np.int64(vocab)))
  return np.stack(out, axis=-1).astype(np.int32)


# ---------------------------------------------------------------------------
# 32-bit JAX implementation: a uint64 is a pair (hi, lo) of uint32 limbs. All
# uint32 ops below wrap mod 2**32 (XLA integer semantics) unless noted.
# ---------------------------------------------------------------------------


def _u32(c: int):
  return np.uint32(c & _MASK32)


def _mulhi_u32(x, c: int):
  """High 32 bits of the 64-bit product x * c (x uint32 array, c < 2**32)."""
  x0, x1 = x & _u32(0xFFFF), x >> _u32(16)
  c0, c1 = _u32(c & 0xFFFF), _u32(c >> 16)
  p00, p01, p10, p11 = x0 * c0, x0 * c1, x1 * c0, x1 * c1  # each < 2**32
  # Middle column: at most 3 * (2**16 - 1), no overflow.
  mid = (p00 >> _u32(16)) + (p01 & _u32(0xFFFF)) + (p10 & _u32(0xFFFF))
  return p11 + (p01 >> _u32(16)) + (p10 >> _u32(16)) + (mid >> _u32(16))


def _mul_const_u64(x_hi, x_lo, c: int):
  """(x * c) mod 2**64 for a uint64 x = (x_hi, x_lo) and a Python int c."""
  c_hi, c_lo = c >> 32, c & _MASK32
  lo = x_lo * _u32(c_lo)
  # Cross terms only matter mod 2**32 in the high limb; x_hi * c_hi drops out.
  hi = _mulhi_u32(x_lo, c_lo) + x_lo * _u32(c_hi) + x_hi * _u32(c_lo)
  return hi, lo


def _add_u64(a_hi, a_lo, b_hi, b_lo):
  lo = a_lo + b_lo
  carry = (lo < a_lo).astype(jnp.uint32)
  return a_hi + b_hi + carry, lo


def _signed_mod_u64(hi, lo, vocab: int):
  """Floor mod of the int64 with bit pattern (hi, lo) by vocab < 2**24."""
  # Horner over the 8 bytes, most significant first: r < vocab keeps
  # r * 256 + 255 < 2**32.
  m = _u32(vocab)
  r = jnp.zeros_like(lo)
  for limb in (hi, lo):
    for shift in (24, 16, 8, 0):
      byte = (limb >> _u32(shift)) & _u32(0xFF)
      r = (r * _u32(256) + byte) % m
  # Negative int64 s = u - 2**64, so s mod M = (u mod M - 2**64 mod M) mod M;
  # adding M first keeps the uint32 difference non-negative.
  correction = _u32(vocab - (1 << 64) % vocab)
  neg = (hi >> _u32(31)).astype(jnp.bool_)
  return jnp.where(neg, (r + correction) % m, r)


def hash_ids(tokens_BxN, *, group_sizes: Sequence[int] = DEFAULT_GROUP_SIZES,
             num_functions: int = 1, vocab: int = 500002) -> jnp.ndarray:
  """Hash n-gram ids in 32-bit JAX, exactly equal to `hash_ids_numpy`.

  Jittable with `group_sizes`, `num_functions` and `vocab` static (they are
  Python values baked into the trace). Needs no `jax_enable_x64`.

  Args:
    tokens_BxN: integer [B, N] token ids. Any int32 value is handled exactly
      (negatives are sign-extended to int64 as the reference would see them);
      other integer dtypes are cast to int32 first.
    group_sizes: n-gram sizes, in table order within a function.
    num_functions: number of hash functions (primes).
    vocab: rows per hash table, in [1, 2**24) (the limit of the 32-bit modulo).

  Returns:
    ids_BxNxT: int32 [B, N, T], T = num_functions * len(group_sizes), per-table
    ids in [0, vocab) (no per-table offset), tables function-major.
  """
  group_sizes, num_functions, vocab = _check_config(
      group_sizes, num_functions, vocab, _MAX_JAX_VOCAB,
      "the 32-bit modulo needs vocab < 2**24; use hash_ids_numpy beyond")
  tokens_BxN = jnp.asarray(tokens_BxN)
  _check_tokens(tokens_BxN, jnp)
  tokens_BxN = tokens_BxN.astype(jnp.int32)
  b, n_len = tokens_BxN.shape
  # Limbs of the int64 sign extension of each token.
  lo_BxN = tokens_BxN.astype(jnp.uint32)
  hi_BxN = jnp.where(tokens_BxN < 0, _u32(_MASK32), _u32(0))

  max_n = max(group_sizes)
  pad = ((0, 0), (max_n - 1, 0))  # Zero left-padding shared by all sizes.
  lo_pad = jnp.pad(lo_BxN, pad)
  hi_pad = jnp.pad(hi_BxN, pad)

  out = []
  for prime, n in _tables(group_sizes, num_functions):
    powers = _prime_powers_u64(prime, n)
    h_hi = jnp.zeros((b, n_len), jnp.uint32)
    h_lo = jnp.zeros((b, n_len), jnp.uint32)
    for j in range(n):
      # Element j of the n-gram (oldest first) at position t is padded[t + j] after padding by
      # n - 1; with max_n - 1 padding it is shifted.
      start = max_n - n + j
      x_lo = lo_pad[:, start:start + n_len]
      x_hi = hi_pad[:, start:start + n_len]
      p_hi, p_lo = _mul_const_u64(x_hi, x_lo, powers[j])
      h_hi, h_lo = _add_u64(h_hi, h_lo, p_hi, p_lo)
    out.append(_signed_mod_u64(h_hi, h_lo, vocab).astype(jnp.int32))
  return jnp.stack(out, axis=-1)
