"""Patching: turn bytes (or their entropies) into patch lengths. The one home of the rule:
training (host or accelerator), preprocessing and generation all cut patches with
`row_start_mask` / `cut_rows` below; `bltjax.train.patcher` only decides who runs them, and where.

Follows Meta's reference (`bytelatent/data/patcher.py`; its rules and quirks:
docs/reference-notes.md §1). Every mode first builds a boolean start mask over positions
`0..M-1`, `M = N + include_next_token`; position `N` is the virtual next byte, so with
`include_next_token=True` lengths sum to `N + 1`. Shared code then turns masks into int32 lengths
`[B, P]`, right-padded with 0.

Mask functions accept numpy or jax arrays (and are jittable for the latter); they have no
data-dependent shapes. Shape suffixes: B batch rows, N byte positions, P patches, and (here only)
M mask positions, `N + include_next_token`.
"""

import operator

import jax
import jax.numpy as jnp
import numpy as np

from bltjax.model.tokenizer import BOS_ID, EOS_ID, OFFSET

PATCHING_MODES = ("entropy", "space", "static", "byte")


def _xp(*arrays):
  """Returns jnp if any input is a jax array (incl. tracers), else np."""
  return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _check_2d(x, name):
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D [B, N], got shape {x.shape}")


def _rows(x_BxN, name):
  """(xp, `x_BxN` as an xp array) for a 2-D input, xp = jnp for jax arrays, else np."""
  xp = _xp(x_BxN)
  x_BxN = xp.asarray(x_BxN)
  _check_2d(x_BxN, name)
  return xp, x_BxN


def _after_zero(xp, x_BxN):
  """A zero (False) column, then `x_BxN` ([B, 1 + N]): column t holds x[t-1]."""
  return xp.concatenate([xp.zeros((x_BxN.shape[0], 1), x_BxN.dtype), x_BxN], axis=1)


def _positive_int(value, name):
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  try:
    value = operator.index(value)
  except TypeError:
    # Floats are rejected: the reference fills an int tensor, so 4.5 breaks.
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}") from None
  if value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value}")
  return value


# -- Start masks ----------------------------------------------------------------------------------


def entropy_start_mask(entropies_BxN, threshold, *, monotonic=False, threshold_add=None,
                       include_next_token=True):
  """Entropy patching start mask (reference `find_entropy_patch_start_ids`).

  `entropies_BxN[:, t]` is the entropy (nats) of predicting byte `t + 1`.
  Positions 0 (BOS) and 1 always start a patch. For `t >= 2`:
    global:    `H[t-1] > threshold`.
    monotonic: `H[t-1] - H[t-2] > threshold` (threshold is θ_r); t=2 forced.
    combined (`threshold_add` set, not monotonic):
               `H[t-1] - H[t-2] > threshold_add and H[t-1] > threshold`;
               t=2 forced, t=3 never.
  Comparisons are strict and run in the entropies' dtype (a Python float threshold is weakly
  typed, as in torch).

  Returns:
    bool [B, N + include_next_token].
  """
  xp, h_BxN = _rows(entropies_BxN, "entropies")
  n = h_BxN.shape[1]
  # Shifted views over positions t = 0..N: h1[t] = H[t-1], h2[t] = H[t-2] (zero where undefined;
  # those positions are forced anyway).
  h1_BxM = _after_zero(xp, h_BxN)
  h2_BxM = _after_zero(xp, h1_BxM[:, :-1])
  t_M = xp.arange(n + 1)
  if monotonic:
    # Reference sets mask[0] = True on E = H[1:], forcing a start at t = 2.
    mask_BxM = (t_M < 3) | (h1_BxM - h2_BxM > threshold)
  elif threshold_add is not None:
    # Reference: mask[0] = True, then `... & ~mask_prev[j-1]` where mask_prev is the *initial*
    # mask (only index 0 set): this forbids only t = 3 and is not a "no two consecutive starts"
    # rule. Kept: released models use it.
    rule_BxM = (h1_BxM - h2_BxM > threshold_add) & (h1_BxM > threshold)
    mask_BxM = (t_M < 3) | ((t_M >= 4) & rule_BxM)
  else:
    mask_BxM = (t_M < 2) | (h1_BxM > threshold)
  # Without the next token the reference drops the mask entry of position N.
  return mask_BxM[:, :n + int(include_next_token)]


def _space_like(tokens):
  """SpaceByte "space-like": not [0-9A-Za-z], not a UTF-8 continuation byte."""
  u = tokens - OFFSET
  return ((u < ord("0")) | ((u > ord("9")) & (u < ord("A")))
          | ((u > ord("Z")) & (u < ord("a"))) | ((u > ord("z")) & (u < 0x80))
          | (u >= 0xC0))


def space_start_mask(tokens_BxN, *, include_next_token=True):
  """SpaceByte start mask (reference `find_space_patch_start_ids`).

  Byte `t` ends a patch if it is the first of a run of space-like bytes, or a special id (< 4).
  Positions 0, 1 always start; `t >= 2` starts iff byte `t-1` ended a patch. So ", a " patches as
  `Thrones,` | ` a `.

  Returns:
    bool [B, N + include_next_token].
  """
  xp, tokens_BxN = _rows(tokens_BxN, "tokens")
  b, n = tokens_BxN.shape
  sl_BxN = _space_like(tokens_BxN)
  prev_BxN = _after_zero(xp, sl_BxN[:, :-1])
  end_BxN = (sl_BxN & ~prev_BxN) | (tokens_BxN < OFFSET)
  true_Bx2 = xp.ones((b, 2), bool)
  mask_BxM = xp.concatenate([true_Bx2, end_BxN[:, 1:]], axis=1)
  # The reference pads with sentinel N+1, only valid with the next token; we simply drop
  # position N, which is consistent for any batch size.
  return mask_BxM[:, :n + int(include_next_token)]


def static_start_mask(batch_size, seq_len, patch_size, *, include_next_token=True):
  """Fixed-size patches (no BOS rule): starts at multiples of `patch_size`.

  Returns:
    numpy bool [batch_size, seq_len + include_next_token] (a constant under jit).
  """
  patch_size = _positive_int(patch_size, "patch_size")
  t_M = np.arange(seq_len + int(include_next_token))
  return np.broadcast_to(t_M % patch_size == 0, (batch_size, t_M.size)).copy()


def byte_start_mask(batch_size, seq_len, *, include_next_token=True):
  """One byte per patch (used to train the entropy model).

  Returns:
    numpy bool [batch_size, seq_len + include_next_token], all True.
  """
  return np.ones((batch_size, seq_len + int(include_next_token)), bool)


def apply_max_patch_length(start_mask_BxM, max_patch_length):
  """Splits patches longer than `m` into [m, ..., m, rest] from their start.

  Same result as the reference `split_large_numbers`, but on the mask; it only looks backwards,
  so patching stays incremental. Position 0 is treated as a start. `None` is a no-op.
  """
  if max_patch_length is None:
    return start_mask_BxM
  m = _positive_int(max_patch_length, "max_patch_length")
  xp = _xp(start_mask_BxM)
  mask_BxM = xp.asarray(start_mask_BxM)
  t_M = xp.arange(mask_BxM.shape[1])
  start_pos_BxM = xp.where(mask_BxM, t_M, 0)
  if xp is jnp:
    last_start_BxM = jax.lax.cummax(start_pos_BxM, axis=1)
  else:
    last_start_BxM = np.maximum.accumulate(start_pos_BxM, axis=1)
  return mask_BxM | ((t_M - last_start_BxM) % m == 0)


def start_mask(mode, *, tokens=None, entropies=None, threshold=None, threshold_add=None,
               monotonic=False, patch_size=None, max_patch_length=None, include_next_token=True):
  """Start mask for `mode` in PATCHING_MODES, then the max-length split.

  entropy needs `entropies` and `threshold` (the reference's top-k mode, `threshold=None`, is not
  supported); space, static and byte need `tokens` (static also `patch_size`). Returns bool
  [B, N + include_next_token], as jax if the input is jax.
  """
  if mode not in PATCHING_MODES:
    raise ValueError(f"unknown patching mode {mode!r}; valid modes: {PATCHING_MODES}")

  def need(value, name):
    if value is None:
      raise ValueError(f"patching mode {mode!r} requires {name!r}")
    return value

  if mode == "entropy":
    need(entropies, "entropies")
    need(threshold, "threshold")
    mask = entropy_start_mask(entropies, threshold, monotonic=monotonic,
                              threshold_add=threshold_add, include_next_token=include_next_token)
  else:
    xp, tokens = _rows(need(tokens, "tokens"), "tokens")
    if mode == "space":
      mask = space_start_mask(tokens, include_next_token=include_next_token)
    else:
      b, n = tokens.shape
      if mode == "static":
        mask = static_start_mask(b, n, need(patch_size, "patch_size"),
                                 include_next_token=include_next_token)
      else:
        mask = byte_start_mask(b, n, include_next_token=include_next_token)
      mask = xp.asarray(mask)
  return apply_max_patch_length(mask, max_patch_length)


# -- Masks -> lengths -----------------------------------------------------------------------------


def _patch_index(xp, mask_BxM):
  """Patch index of every position; position 0 always starts a patch."""
  first_M = xp.arange(mask_BxM.shape[1]) == 0
  return xp.cumsum(mask_BxM | first_M, axis=1, dtype=xp.int32) - 1


def lengths_from_start_mask(start_mask_BxM):
  """Numpy: lengths int32 [B, P], P = max patches over the batch, 0-padded."""
  mask_BxM = np.asarray(start_mask_BxM, bool)
  _check_2d(mask_BxM, "start_mask")
  b, m = mask_BxM.shape
  pid_BxM = _patch_index(np, mask_BxM)
  p = int(pid_BxM[:, -1].max()) + 1 if m and b else 0
  # One bincount over flattened (row, patch) ids: O(B * M).
  flat = (pid_BxM + p * np.arange(b)[:, None]).ravel()
  return np.bincount(flat, minlength=b * p).reshape(b, p).astype(np.int32)


def lengths_from_start_mask_fixed(start_mask_BxM, num_patches):
  """Jittable: lengths with a fixed number of patches.

  Rows with more than `num_patches` patches keep their first `num_patches - 1` patches; all
  remaining bytes go into the last one, so rows still sum to M. A scatter-add keeps this O(B * M).

  Returns:
    (lengths int32 [B, num_patches], overflow int32 [B]): overflow is the number of patches
    merged away (0 when the row fits).
  """
  num_patches = _positive_int(num_patches, "num_patches")
  mask_BxM = jnp.asarray(start_mask_BxM, bool)
  _check_2d(mask_BxM, "start_mask")
  b, m = mask_BxM.shape
  pid_BxM = _patch_index(jnp, mask_BxM)
  rows_BxM = jnp.broadcast_to(jnp.arange(b)[:, None], (b, m))
  lengths_BxP = jnp.zeros((b, num_patches), jnp.int32).at[
      rows_BxM, jnp.minimum(pid_BxM, num_patches - 1)].add(1)
  total_B = pid_BxM[:, -1] + 1 if m else jnp.zeros((b,), jnp.int32)
  overflow_B = jnp.maximum(total_B - num_patches, 0)
  return lengths_BxP, overflow_B


# -- Packed rows: the rule training, preprocessing and generation all cut by ----------------------


def document_starts(tokens_BxN):
  """bool [B, N+1]: the positions after a BOS or an EOS (a document's BOS always follows the
  previous document's EOS). Position p depends only on byte p-1, so generation can apply the
  same rule before byte p exists."""
  ends_BxN = (tokens_BxN == BOS_ID) | (tokens_BxN == EOS_ID)
  return _after_zero(_xp(tokens_BxN), ends_BxN)


def row_start_mask(tokens_BxN, entropies_BxN, pc):
  """Patch starts over N + 1 positions of packed rows (jittable; `pc` a PatchingConfig).

  The configured mode, plus one rule that makes a packed row patch like the reference patches
  each document on its own: positions 0 and 1 always start (the decoder needs a first patch of
  length 1) and BOS and EOS each end a patch. Then the max-length split.
  """
  mask = start_mask(pc.mode, tokens=tokens_BxN, entropies=entropies_BxN,
                    threshold=pc.threshold, threshold_add=pc.threshold_add,
                    monotonic=pc.monotonic, patch_size=pc.patch_size)
  first = jnp.arange(mask.shape[1]) < 2
  mask = mask | first | document_starts(tokens_BxN)
  return apply_max_patch_length(mask, pc.max_patch_length)


def cut_rows(tokens_BxN, entropies_BxN, pc, max_patches):
  """Packed rows -> (patch_lengths int32 [B, max_patches], overflow int32 [B]) (jittable).

  `entropies_BxN` (nats, float32) is only read in entropy mode. Rows with more patches keep
  the first max_patches - 1 and merge the rest into the last one (counted in `overflow`).
  """
  return lengths_from_start_mask_fixed(row_start_mask(tokens_BxN, entropies_BxN, pc),
                                       max_patches)


def calibrate_threshold(entropies, target_patch_size: float) -> float:
  """Global threshold giving about `target_patch_size` bytes per patch on these entropies.

  The reference ships no tool for this (facebookresearch/blt#106): a patch starts where
  H[t-1] > threshold, so the threshold is the (1 - 1/target) quantile of the entropies.
  """
  values = np.asarray(entropies, np.float64).ravel()
  return float(np.quantile(values, 1.0 - 1.0 / target_patch_size))


# -- Numpy convenience wrappers: lengths [B, P], trimmed and zero padded --------------------------


def patch_lengths_from_entropies(entropies, threshold, *, monotonic=False, threshold_add=None,
                                 max_patch_length=None, include_next_token=True):
  """Numpy entropy patching (see `entropy_start_mask`): int32 [B, P]."""
  mask = entropy_start_mask(np.asarray(entropies), threshold, monotonic=monotonic,
                            threshold_add=threshold_add, include_next_token=include_next_token)
  return lengths_from_start_mask(apply_max_patch_length(mask, max_patch_length))


def space_patch_lengths(tokens, *, max_patch_length=None, include_next_token=True):
  """Numpy SpaceByte patching (see `space_start_mask`): int32 [B, P]."""
  mask = space_start_mask(np.asarray(tokens), include_next_token=include_next_token)
  return lengths_from_start_mask(apply_max_patch_length(mask, max_patch_length))


def static_patch_lengths(tokens, patch_size, *, include_next_token=True):
  """Numpy static patching; `tokens` only gives the shape: int32 [B, P]."""
  b, n = np.shape(tokens)
  return lengths_from_start_mask(static_start_mask(b, n, patch_size,
                                                   include_next_token=include_next_token))


def byte_patch_lengths(tokens, *, include_next_token=True):
  """Numpy byte patching (all ones): int32 [B, N + include_next_token]."""
  b, n = np.shape(tokens)
  return lengths_from_start_mask(byte_start_mask(b, n, include_next_token=include_next_token))


# -- Lengths -> patch ids / starts, and validation ------------------------------------------------


def patch_ids_from_lengths(lengths_BxP, seq_len):
  """Patch index of every byte: int32 [B, seq_len].

  `id[t] = #{j : cum[j] <= t} - 1` with `cum = [0, cumsum(lengths)]`, i.e. a right-searchsorted
  of t in `cumsum(lengths)`; zero-length patches are skipped. O(B * seq_len * log P), no
  [B, N, P] intermediate.
  """
  xp, lengths_BxP = _rows(lengths_BxP, "lengths")
  t_N = xp.arange(seq_len)
  if xp is jnp:
    cum_BxP = jnp.cumsum(lengths_BxP, axis=1, dtype=jnp.int32)
    search = jax.vmap(lambda c: jnp.searchsorted(c, t_N, side="right"))
    return search(cum_BxP).astype(jnp.int32)
  # Numpy: one searchsorted over all rows, each offset into its own range.
  b, p = lengths_BxP.shape
  cum_BxP = np.cumsum(lengths_BxP, axis=1, dtype=np.int64)
  span = max(int(cum_BxP.max(initial=0)), seq_len) + 1
  offset_Bx1 = span * np.arange(b, dtype=np.int64)[:, None]
  idx = np.searchsorted((cum_BxP + offset_Bx1).ravel(), (t_N + offset_Bx1).ravel(),
                        side="right")
  return (idx.reshape(b, seq_len) - p * np.arange(b)[:, None]).astype(np.int32)


def decoder_patch_ids_from_lengths(lengths_BxP, seq_len):
  """Global patch read by every decoder byte: int32 [B, seq_len].

  Byte t predicts byte t+1, so it may only see patches that end at or before t: it reads
  `patch_id(t+1) - 1`, the patch preceding the one that holds t+1. Dropping the (length-1) BOS
  patch shifts ids by one and does exactly that; it needs lengths that cover N+1 positions
  (include_next_token). Worked example: docs/reference-notes.md §1.5.
  """
  return patch_ids_from_lengths(lengths_BxP[:, 1:], seq_len)


def patch_start_positions(lengths, seq_len):
  """Numpy: per row, the sorted patch start positions in `[0, seq_len)`."""
  lengths = np.asarray(lengths)
  _check_2d(lengths, "lengths")
  starts = np.cumsum(lengths, axis=1) - lengths
  return [sorted(set(int(s) for s, n in zip(row_s, row_n) if n > 0 and s < seq_len))
          for row_s, row_n in zip(starts, lengths)]


def validate_patch_lengths(lengths, seq_len, *, include_next_token=True):
  """Numpy: raises ValueError (naming the row) if `lengths` is malformed."""
  lengths = np.asarray(lengths)
  if lengths.ndim != 2 or not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError("patch lengths must be a 2-D integer array, got "
                     f"shape {lengths.shape} dtype {lengths.dtype}")

  def fail(bad_B, problem):
    if np.any(bad_B):
      row = int(np.argmax(bad_B))
      raise ValueError(f"patch lengths row {row}: {problem(row)} (row = {lengths[row].tolist()})")

  fail(np.any(lengths < 0, axis=1), lambda r: "negative patch length")
  fail(np.any((lengths[:, 1:] != 0) & (lengths[:, :-1] == 0), axis=1),
       lambda r: "non-zero patch length after a zero (padding must be last)")
  expected = seq_len + int(include_next_token)
  sums_B = lengths.sum(axis=1)
  fail(sums_B != expected, lambda r: (
      f"sum is {int(sums_B[r])}, expected {expected} (seq_len={seq_len}, "
      f"include_next_token={include_next_token})"))
  if lengths.shape[1]:
    fail(lengths[:, 0] != 1, lambda r: (
        f"first patch has length {int(lengths[r, 0])}, expected 1 "
        "(the BOS patch the decoder relies on)"))
