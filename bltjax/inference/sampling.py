"""Choosing the next byte: repetition penalty, greedy / temperature / top-k / top-p sampling,
and stop sequences (matched inside the jitted loop, cut and held back on the host).

Stop sequences live in the decode state as a right-aligned padded id array `stops_YxJ` (Y stop
sequences padded to J ids) with lengths `stop_len_Y`. After byte p is written, row b has stopped
iff for some s the last stop_len[s] ids of the row (positions p - stop_len[s] + 1 .. p) equal the
stop sequence and all of them were generated (stop_len[s] <= p + 1 - prompt_len[b]): a
fixed-shape [B, Y, J] compare.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from bltjax.model import tokenizer

_NEVER = np.iinfo(np.int32).max  # length of a padding row of the stop array: never matches


@flax.struct.dataclass
class Sampling:
  """How the next byte is chosen. Every field changes the compiled program (static)."""
  temperature: float = flax.struct.field(pytree_node=False, default=0.0)
  top_p: float = flax.struct.field(pytree_node=False, default=1.0)
  stop_at_eos: bool = flax.struct.field(pytree_node=False, default=True)
  top_k: int = flax.struct.field(pytree_node=False, default=0)
  repetition_penalty: float = flax.struct.field(pytree_node=False, default=1.0)


def make_sampling(temperature, top_p, stop_at_eos, top_k, repetition_penalty) -> Sampling:
  """Validated `Sampling` from user arguments."""
  if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
  if not np.isfinite(repetition_penalty) or repetition_penalty <= 0:
    raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {repetition_penalty!r}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
  top_k = 0 if top_k >= tokenizer.VOCAB_SIZE else int(top_k)  # keeping all ids is no filter
  return Sampling(temperature=float(temperature), top_p=float(top_p),
                  stop_at_eos=bool(stop_at_eos), top_k=top_k,
                  repetition_penalty=float(repetition_penalty))


def penalize(logits_BxV, seen_BxV, penalty: float):
  """HF/CTRL repetition penalty: the logits of ids already in the row are divided by the penalty
  where positive and multiplied where negative."""
  if penalty == 1.0:
    return logits_BxV
  logits = logits_BxV.astype(jnp.float32)
  return jnp.where(seen_BxV, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def mark_seen(seen_BxV, ids_B):
  """Adds byte ids (not specials) to the ids each row has seen."""
  rows = jnp.arange(ids_B.shape[0])
  return seen_BxV.at[rows, ids_B].max(ids_B >= tokenizer.OFFSET)


def sample(logits_BxV, rng, s: Sampling):
  """Greedy (temperature 0), or temperature sampling restricted to the top-k ids (ties kept, as
  in HF), then to the top-p nucleus of what remains."""
  if s.temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / s.temperature
  if 0 < s.top_k < logits.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_Bx1, -jnp.inf, logits)
  if s.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < s.top_p  # always keeps the top token
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def ends_with_stop(tokens_BxN, p, prompt_len_B, stops_YxJ, stop_len_Y):
  """[B]: the generated ids of each row, up to and including position p, end with a stop
  sequence."""
  num_stops, lmax = stops_YxJ.shape
  if num_stops == 0:
    return jnp.zeros(tokens_BxN.shape[:1], bool)
  # Positions p-J+1..p; those < 0 fall in a stop's padding whenever its length condition holds.
  idx_J = jnp.maximum(p - lmax + 1 + jnp.arange(lmax), 0)
  last_BxJ = jnp.take(tokens_BxN, idx_J, axis=1)
  pad_YxJ = jnp.arange(lmax)[None, :] < lmax - stop_len_Y[:, None]
  same_BxY = jnp.all((last_BxJ[:, None, :] == stops_YxJ[None]) | pad_YxJ[None], axis=-1)
  n_generated_B = p + 1 - prompt_len_B
  return jnp.any(same_BxY & (stop_len_Y[None, :] <= n_generated_B[:, None]), axis=-1)


# -- host side ------------------------------------------------------------------------------------

def encode_stops(stop, max_len: int) -> list[np.ndarray]:
  """Stop sequences (a str/bytes, or a sequence of them) -> their id arrays, validated."""
  if isinstance(stop, (str, bytes, bytearray)):
    stop = [stop]
  out = []
  for i, s in enumerate(stop):
    if not isinstance(s, (str, bytes, bytearray)):
      raise ValueError(f"stop[{i}] must be str or bytes, got {type(s).__name__}")
    ids = tokenizer.encode(s, add_bos=False, add_eos=False)
    if len(ids) == 0:
      raise ValueError(f"stop[{i}] is empty")
    if len(ids) > max_len:
      raise ValueError(f"stop[{i}] has {len(ids)} bytes, more than the model's context of "
                       f"{max_len} bytes")
    if not any(np.array_equal(ids, o) for o in out):
      out.append(ids)
  return out


def stop_arrays(stops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Right-aligned padded (ids [Y, J], lengths [Y]); Y and J are rounded up (to a power of two,
  a multiple of 8) so that similar stop lists share a compiled program."""
  if not stops:
    return np.zeros((0, 1), np.int32), np.zeros((0,), np.int32)
  num_stops = 1 << (len(stops) - 1).bit_length()
  lmax = -(-max(len(s) for s in stops) // 8) * 8
  ids = np.full((num_stops, lmax), -1, np.int32)
  lengths = np.full((num_stops,), _NEVER, np.int32)
  for i, s in enumerate(stops):
    ids[i, lmax - len(s):] = s
    lengths[i] = len(s)
  return ids, lengths


def cut_at_stop(ids: np.ndarray, stops: list[np.ndarray]) -> np.ndarray:
  """`ids` up to the earliest occurrence of any stop sequence (excluded)."""
  cut = len(ids)
  for s in stops:
    if len(s) <= len(ids):
      hits = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(ids, len(s)) == s,
                                   axis=-1))
      if len(hits):
        cut = min(cut, int(hits[0]))
  return ids[:cut]


def held_back(ids: list[int], stops: list[np.ndarray]) -> int:
  """How many trailing ids may be the start of a stop sequence (streaming must wait for them)."""
  held = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(ids)), held, -1):
      if ids[-k:] == s[:k].tolist():
        held = k
        break
  return held
