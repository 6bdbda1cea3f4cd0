"""Tests for bltjax.model.patching. Expected values are worked out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bltjax.model import patching as pt


def _encode(text):
  """BOS + (byte + 4), as the blt tokenizer does (no EOS)."""
  return np.array([[1] + [b + 4 for b in text.encode("utf-8")]])


def _mask_from_starts(starts, length):
  mask = np.zeros((1, length), bool)
  mask[0, starts] = True
  return mask


# ----------------------------------------------------------------------------
# Hand-checked examples per mode.
# ----------------------------------------------------------------------------


def test_entropy_global_strict_threshold():
  # t >= 2 starts iff H[t-1] > 1.0: t=3 (2.0), t=6 (3.0); t=5 has H[4] == 1.0
  # exactly and must not start (strict); t=8 is the virtual next byte (0.9).
  h = np.array([[9.0, 0.1, 2.0, 0.5, 1.0, 3.0, 0.2, 0.9]])
  mask = pt.entropy_start_mask(h, 1.0)
  np.testing.assert_array_equal(mask, _mask_from_starts([0, 1, 3, 6], 9))
  np.testing.assert_array_equal(
      pt.patch_lengths_from_entropies(h, 1.0), [[1, 2, 3, 3]])
  np.testing.assert_array_equal(
      pt.patch_lengths_from_entropies(h, 1.0, include_next_token=False),
      [[1, 2, 3, 2]])
  # H[7] > threshold makes the virtual next byte its own patch.
  h[0, 7] = 1.5
  np.testing.assert_array_equal(
      pt.patch_lengths_from_entropies(h, 1.0), [[1, 2, 3, 2, 1]])


def test_entropy_monotonic_forces_position_2():
  # theta_r = 0.5. t=2 forced although H1 - H0 = -5; t=3: 0; t=4: +1;
  # t=5: +1; t=6: +0.5 (strict, no); t=7: -2.5; t=8: +3.
  h = np.array([[5.0, 0.0, 0.0, 1.0, 2.0, 2.5, 0.0, 3.0]])
  mask = pt.entropy_start_mask(h, 0.5, monotonic=True)
  np.testing.assert_array_equal(mask, _mask_from_starts([0, 1, 2, 4, 5, 8], 9))
  np.testing.assert_array_equal(
      pt.patch_lengths_from_entropies(h, 0.5, monotonic=True),
      [[1, 1, 2, 1, 3, 1]])


def test_entropy_combined_quirks():
  # threshold 1.0, threshold_add 0.5. t=2 forced. t=3 would pass both rules
  # (diff 3, level 3) but never starts (~mask_prev quirk). t=4, t=5
  # consecutive starts are allowed. t=6: diff -2.5. t=7: diff 0.6, level 3.6.
  # t=8: diff < 0. t=9: diff 0.7 but level 0.9 <= 1. t=10: diff 1.6, level 2.5.
  h = np.array([[0.0, 0.0, 3.0, 4.0, 5.5, 3.0, 3.6, 0.2, 0.9, 2.5]])
  mask = pt.entropy_start_mask(h, 1.0, threshold_add=0.5)
  np.testing.assert_array_equal(
      mask, _mask_from_starts([0, 1, 2, 4, 5, 7, 10], 11))
  np.testing.assert_array_equal(
      pt.patch_lengths_from_entropies(h, 1.0, threshold_add=0.5),
      [[1, 1, 2, 1, 2, 3, 1]])
  np.testing.assert_array_equal(
      pt.patch_lengths_from_entropies(
          h, 1.0, threshold_add=0.5, include_next_token=False),
      [[1, 1, 2, 1, 2, 3]])


def test_space_thrones_example():
  toks = _encode("Game of Thrones, a ")
  # Bytes 1..19: "Game " | "of " | "Thrones," | " a " then the next byte.
  np.testing.assert_array_equal(
      pt.space_patch_lengths(toks), [[1, 5, 3, 8, 3, 1]])
  np.testing.assert_array_equal(
      pt.space_patch_lengths(toks, include_next_token=False), [[1, 5, 3, 8, 3]])


def test_space_special_ids_and_utf8():
  # BOS, "a", EOS, "b", "é" (0xC3 0xA9), "c": EOS ends a patch even though it
  # follows a letter; the UTF-8 lead byte 0xC3 is space-like, 0xA9 is not.
  toks = np.array([[1, 97 + 4, 2, 98 + 4, 0xC3 + 4, 0xA9 + 4, 99 + 4]])
  # ends: 0 (BOS), 2 (EOS), 4 (lead byte) -> starts 0, 1, 3, 5.
  np.testing.assert_array_equal(pt.space_patch_lengths(toks), [[1, 2, 2, 3]])
  # Consecutive special ids each end their own patch.
  toks = np.array([[1, 97 + 4, 2, 0, 0]])
  np.testing.assert_array_equal(pt.space_patch_lengths(toks), [[1, 2, 1, 1, 1]])


def test_static_and_byte():
  toks = np.zeros((2, 8), np.int32)
  eq = np.testing.assert_array_equal
  eq(pt.static_patch_lengths(toks, 3), [[3, 3, 3]] * 2)
  eq(pt.static_patch_lengths(toks, 3, include_next_token=False),
     [[3, 3, 2]] * 2)
  eq(pt.byte_patch_lengths(toks[:, :4]), [[1] * 5] * 2)
  eq(pt.byte_patch_lengths(toks[:, :4], include_next_token=False),
     [[1] * 4] * 2)
  for bad in (4.5, 0, True, None):
    with pytest.raises(ValueError, match="patch_size"):
      pt.static_start_mask(1, 8, bad)


def test_max_patch_length_split():
  mask = _mask_from_starts([0, 1], 8)  # lengths [1, 7]
  split = pt.apply_max_patch_length(mask, 3)
  np.testing.assert_array_equal(
      pt.lengths_from_start_mask(split), [[1, 3, 3, 1]])
  split_jax = pt.apply_max_patch_length(jnp.asarray(mask), 3)
  np.testing.assert_array_equal(
      pt.lengths_from_start_mask(split_jax), [[1, 3, 3, 1]])
  assert pt.apply_max_patch_length(mask, None) is mask
  with pytest.raises(ValueError, match="max_patch_length"):
    pt.apply_max_patch_length(mask, 0)
  # Each over-long patch is split from its own start: [1, 4, 5] -> m=2.
  mask = _mask_from_starts([0, 1, 5], 10)
  np.testing.assert_array_equal(
      pt.lengths_from_start_mask(pt.apply_max_patch_length(mask, 2)),
      [[1, 2, 2, 2, 2, 1]])


def test_lengths_batch_padding_and_sums():
  h = np.array([[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  # Row 0 starts 0, 1, 2, 3; row 1 starts 0, 1.
  lengths = pt.patch_lengths_from_entropies(h, 1.0)
  np.testing.assert_array_equal(lengths, [[1, 1, 1, 2], [1, 4, 0, 0]])
  assert lengths.dtype == np.int32
  np.testing.assert_array_equal(lengths.sum(1), [5, 5])
  short = pt.patch_lengths_from_entropies(h, 1.0, include_next_token=False)
  np.testing.assert_array_equal(short.sum(1), [4, 4])


def test_dispatcher():
  toks = _encode("ab cd")
  h = np.zeros(toks.shape)
  np.testing.assert_array_equal(
      pt.start_mask("entropy", entropies=h, threshold=1.0),
      pt.entropy_start_mask(h, 1.0))
  np.testing.assert_array_equal(
      pt.start_mask("space", tokens=toks), pt.space_start_mask(toks))
  np.testing.assert_array_equal(
      pt.start_mask("static", tokens=toks, patch_size=2, max_patch_length=1),
      pt.byte_start_mask(1, 6))
  no_next = pt.start_mask("byte", tokens=toks, include_next_token=False)
  assert no_next.shape == (1, 6)
  assert isinstance(pt.start_mask("byte", tokens=jnp.asarray(toks)), jax.Array)
  with pytest.raises(ValueError,
                     match="valid modes.*entropy.*space.*static.*byte"):
    pt.start_mask("bpe", tokens=toks)
  with pytest.raises(ValueError, match="'threshold'"):
    pt.start_mask("entropy", entropies=h)
  with pytest.raises(ValueError, match="'entropies'"):
    pt.start_mask("entropy", threshold=1.0)
  with pytest.raises(ValueError, match="'tokens'"):
    pt.start_mask("space")
  with pytest.raises(ValueError, match="'patch_size'"):
    pt.start_mask("static", tokens=toks)


# ----------------------------------------------------------------------------
# Patch ids.
# ----------------------------------------------------------------------------


def test_patch_ids_worked_example():
  lengths = np.array([[1, 3, 2, 3]])
  for arr in (lengths, jnp.asarray(lengths)):
    np.testing.assert_array_equal(
        pt.patch_ids_from_lengths(arr, 8), [[0, 1, 1, 1, 2, 2, 3, 3]])
    np.testing.assert_array_equal(
        pt.decoder_patch_ids_from_lengths(arr, 8), [[0, 0, 0, 1, 1, 2, 2, 2]])
  assert pt.patch_ids_from_lengths(lengths, 8).dtype == np.int32
  assert pt.patch_start_positions(lengths, 8) == [[0, 1, 4, 6]]
  assert pt.patch_start_positions(np.array([[1, 7, 1, 0]]), 8) == [[0, 1]]


def test_patch_ids_match_definition_numpy_and_jit():
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, 4, size=(5, 7)).astype(np.int32)
  lengths[1, 3:] = 0  # padded row
  seq_len = 12
  cum = np.concatenate([np.zeros((5, 1), int), np.cumsum(lengths, 1)], 1)
  # Direct O(N * P) definition: #{j : cum[j] <= t} - 1.
  expected = (cum[:, None, :] <= np.arange(seq_len)[None, :, None]).sum(-1) - 1
  np.testing.assert_array_equal(
      pt.patch_ids_from_lengths(lengths, seq_len), expected)
  jitted = jax.jit(pt.patch_ids_from_lengths, static_argnums=1)
  got = jitted(jnp.asarray(lengths), seq_len)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------
# Fixed-shape jax path.
# ----------------------------------------------------------------------------


def test_fixed_overflow_merge():
  mask = _mask_from_starts([0, 1, 3, 4, 6], 8)  # lengths [1, 2, 1, 2, 2]
  lengths, overflow = pt.lengths_from_start_mask_fixed(mask, 3)
  np.testing.assert_array_equal(lengths, [[1, 2, 5]])
  np.testing.assert_array_equal(overflow, [2])
  lengths, overflow = pt.lengths_from_start_mask_fixed(mask, 5)
  np.testing.assert_array_equal(lengths, [[1, 2, 1, 2, 2]])
  np.testing.assert_array_equal(overflow, [0])
  lengths, overflow = pt.lengths_from_start_mask_fixed(mask, 7)
  np.testing.assert_array_equal(lengths, [[1, 2, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(overflow, [0])
  lengths, overflow = pt.lengths_from_start_mask_fixed(mask, 1)
  np.testing.assert_array_equal(lengths, [[8]])
  np.testing.assert_array_equal(overflow, [4])


@pytest.mark.parametrize("kw", [
    dict(mode="entropy", threshold=1.0),
    dict(mode="entropy", threshold=0.3, monotonic=True),
    dict(mode="entropy", threshold=0.8, threshold_add=0.2, max_patch_length=4),
    dict(mode="space", max_patch_length=5),
    dict(mode="static", patch_size=3),
    dict(mode="byte"),
])
def test_jit_fixed_matches_numpy(kw):
  rng = np.random.default_rng(1)
  b, n, num_patches = 4, 33, 34
  h = rng.gamma(2.0, 0.6, size=(b, n)).astype(np.float32)
  vocab = np.array([1, 2, 36, 48, 50, 69, 101, 102, 200])
  toks = rng.choice(vocab, size=(b, n))

  @jax.jit
  def fixed(h, toks):
    mask = pt.start_mask(entropies=h, tokens=toks, **kw)
    return pt.lengths_from_start_mask_fixed(mask, num_patches)

  lengths, overflow = fixed(jnp.asarray(h), jnp.asarray(toks))
  ref = pt.lengths_from_start_mask(
      pt.start_mask(entropies=h, tokens=toks, **kw))
  assert ref.shape[1] <= num_patches
  expected = np.pad(ref, ((0, 0), (0, num_patches - ref.shape[1])))
  np.testing.assert_array_equal(lengths, expected)
  np.testing.assert_array_equal(overflow, np.zeros(b))
  np.testing.assert_array_equal(lengths.sum(1), n + 1)


# ----------------------------------------------------------------------------
# Incremental property: f(x[:i]) == f(x)[:i].
# ----------------------------------------------------------------------------

# Entropies on a coarse grid so ties with the thresholds actually occur.
_entropies = st.lists(st.integers(0, 8).map(lambda k: k * 0.25),
                      min_size=1, max_size=24)
_tokens = st.lists(st.sampled_from([0, 1, 2, 3, 36, 48, 52, 69, 101, 130, 200]),
                   min_size=1, max_size=24)
_max_len = st.one_of(st.none(), st.integers(1, 5))

_MODES = {
    "global": lambda x, m: pt.start_mask(
        "entropy", entropies=x, threshold=1.0, max_patch_length=m),
    "monotonic": lambda x, m: pt.start_mask(
        "entropy", entropies=x, threshold=0.5, monotonic=True,
        max_patch_length=m),
    "combined": lambda x, m: pt.start_mask(
        "entropy", entropies=x, threshold=1.0, threshold_add=0.25,
        max_patch_length=m),
    "space": lambda x, m: pt.start_mask("space", tokens=x, max_patch_length=m),
    "static": lambda x, m: pt.start_mask(
        "static", tokens=x, patch_size=3, max_patch_length=m),
    "byte": lambda x, m: pt.start_mask("byte", tokens=x, max_patch_length=m),
}


@pytest.mark.parametrize("mode", sorted(_MODES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_incremental(mode, data):
  values = data.draw(_entropies if mode in ("global", "monotonic", "combined")
                     else _tokens)
  max_len = data.draw(_max_len)
  x = np.array([values])
  fn = _MODES[mode]
  full = fn(x, max_len)
  assert full.shape == (1, x.shape[1] + 1)
  for i in range(1, x.shape[1] + 1):
    np.testing.assert_array_equal(fn(x[:, :i], max_len), full[:, :i + 1])
  if max_len is not None:
    assert pt.lengths_from_start_mask(full).max() <= max_len


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


def test_validate_ok():
  lengths = np.array([[1, 3, 2, 3], [1, 8, 0, 0]])
  assert pt.validate_patch_lengths(lengths, 8) is None
  assert pt.validate_patch_lengths(
      np.array([[1, 3, 4]]), 8, include_next_token=False) is None


@pytest.mark.parametrize("lengths, pattern", [
    (np.array([1, 3, 5]), "2-D integer"),
    (np.array([[1.0, 8.0]]), "2-D integer"),
    (np.array([[1, 8], [1, -1]]), r"row 1: negative"),
    (np.array([[1, 8, 0], [1, 0, 8]]), r"row 1: non-zero .* after a zero"),
    (np.array([[1, 8], [1, 7]]), r"row 1: sum is 8, expected 9"),
    (np.array([[1, 8], [2, 7]]),
     r"row 1: first patch has length 2, expected 1 \(the BOS patch"),
])
def test_validate_errors(lengths, pattern):
  with pytest.raises(ValueError, match=pattern):
    pt.validate_patch_lengths(lengths, 8)


def test_validate_without_next_token_sum():
  pattern = r"row 0: sum is 9, expected 8.*include_next_token=False"
  with pytest.raises(ValueError, match=pattern):
    pt.validate_patch_lengths(np.array([[1, 8]]), 8, include_next_token=False)
