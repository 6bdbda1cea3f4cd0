"""Attention kernels as pure functions (no parameters).

Shape suffixes follow the legend in `bltjax.model` (B rows, N bytes, P patches, H query heads,
K KV heads, G = H / K, E head dim, C cache slots, k sub-queries per patch; Q and M the query and
key rows of a kernel, U the query chunk of local attention).

- `local_attention`: sliding-window causal self-attention with document (segment) masking, computed
  blockwise: query chunks (of the window size, or a divisor of it) attend to themselves and the
  chunks that cover the window before them, so the cost is O(N·w), never O(N^2).
- `chunk_attention`: the softmax-attention kernel on those blocks, with a flash-style custom VJP.
- `dense_attention`: masked attention with an explicit boolean mask (latent transformer, tests).
- `patch_pooling_attention`: the encoder's cross-attention (patch sub-queries attend to the bytes of
  their own patch), as a segment softmax over bytes: O(N·k), no [P, N] mask.
- `byte_to_patch_attention`: the decoder's cross-attention (byte t attends to the k sub-vectors of
  one patch), as a gather: O(N·k), no [N, P] mask.

Fully masked query rows give a zero output (as the reference's flex attention does), never NaN.
Scores and softmax are fp32 whatever the compute dtype.
"""

import jax
import jax.numpy as jnp

from bltjax.model.layers import row_positions


def _masked_softmax(scores, mask, *, rows_may_be_empty=True):
  """Softmax over the last axis where masked entries get 0; an all-masked row gives all zeros.

  Self-attention rows always see their own position, so they skip the empty-row guard (each
  elementwise pass over the scores costs real time on CPU, where attention is memory-bound).
  """
  if not rows_may_be_empty:
    return jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(scores - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom == 0, 1.0, denom)


def _heads_first(q_BxQxHxE, num_kv_heads):
  """[B, Q, H, E] -> [B, K, G, Q, E]. XLA:CPU runs batched matmuls several times faster when the
  batch dimensions (batch, KV heads) lead; `local_attention` likewise puts (chunk, batch, KV
  head) first."""
  b, q_len, h, e = q_BxQxHxE.shape
  return q_BxQxHxE.reshape(b, q_len, num_kv_heads, h // num_kv_heads, e).transpose(0, 2, 3, 1, 4)


def dense_attention(q_BxQxHxE, k_BxMxKxE, v_BxMxKxE, mask_BxQxM, *, rows_may_be_empty=True):
  """softmax(q k^T / sqrt(E)) v with a boolean mask (True = may attend). Returns [B, Q, H, E]."""
  b, q_len, h, e = q_BxQxHxE.shape
  num_kv = k_BxMxKxE.shape[2]
  g = h // num_kv
  q = _heads_first(q_BxQxHxE * (e**-0.5), num_kv).reshape(b, num_kv, g * q_len, e)
  k = k_BxMxKxE.transpose(0, 2, 1, 3)  # [B, K, M, E]
  v = v_BxMxKxE.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkqe,bkme->bkqm", q, k, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, num_kv, g, q_len, -1)
  probs = _masked_softmax(scores, mask_BxQxM[:, None, None, :, :],
                          rows_may_be_empty=rows_may_be_empty)
  probs = probs.reshape(b, num_kv, g * q_len, -1).astype(v.dtype)
  out = jnp.einsum("bkqm,bkme->bkqe", probs, v, preferred_element_type=jnp.float32)
  out = out.reshape(b, num_kv, g, q_len, e).transpose(0, 3, 1, 2, 4).reshape(b, q_len, h, e)
  return out.astype(q_BxQxHxE.dtype)


def causal_segment_mask(q_pos_BxQ, k_pos_BxM, q_seg_BxQ, k_seg_BxM, window=None,
                        transposed=False):
  """Key j is visible from query i iff same segment, j <= i and (window) i - j < window.

  Returns [B, Q, M], or [B, M, Q] with `transposed` (built in that layout, not transposed).
  """
  q_axis, k_axis = (2, 1) if transposed else (1, 2)
  qp, kp = jnp.expand_dims(q_pos_BxQ, k_axis), jnp.expand_dims(k_pos_BxM, q_axis)
  mask = (jnp.expand_dims(q_seg_BxQ, k_axis) == jnp.expand_dims(k_seg_BxM, q_axis)) & (kp <= qp)
  if window is not None:
    mask &= qp - kp < window
  return mask


def local_attention(q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN, *, window, chunk=None,
                    loop=False):
  """Sliding-window causal self-attention within segments, blockwise in O(N·window).

  Query i sees key j iff seg[i] == seg[j] and i - window < j <= i (window keys including itself,
  the reference's xformers `make_local_attention(window)` semantics). Queries are cut into chunks
  of U positions (default U = window); a chunk attends to itself and the window / U chunks
  before it, which covers every visible key: N·(window + U) scores instead of N^2. With U = window
  half of the scores are masked; smaller chunks waste less (U = window/4: a fifth).

  `loop` computes the chunks one after another (`lax.map`) instead of as one batch, so that each
  chunk's [U, window + U] scores stay in cache: faster on CPUs, where attention is bound by memory
  traffic; accelerators prefer the single batched op.
  """
  b, n, h, e = q_BxNxHxE.shape
  num_kv = k_BxNxKxE.shape[2]
  g = h // num_kv
  positions = row_positions(b, n)
  if window is None or n <= window:
    mask = causal_segment_mask(positions, positions, segment_ids_BxN, segment_ids_BxN, window)
    return dense_attention(q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, mask, rows_may_be_empty=False)

  u = window if chunk is None else chunk
  if window % u:
    raise ValueError(f"attention chunk {u} must divide the window {window}")
  num_prev = window // u  # previous chunks each query chunk needs
  nu = -(-n // u)
  pad = nu * u - n

  def chunked(x_BxNx___, fill=0):
    """[B, N, ...] -> [nU, B, U, ...]: chunk-major, so chunks are the leading batch axis."""
    widths = [(0, 0)] * x_BxNx___.ndim
    widths[1] = (0, pad)
    x = jnp.pad(x_BxNx___, widths, constant_values=fill)
    return jnp.moveaxis(x.reshape(b, nu, u, *x.shape[2:]), 1, 0)

  def with_previous(x_nUxBxUx___, fill=0):
    """Rows (axis 2) of the num_prev previous chunks, then the chunk's own: [nU, B, M, ...] with
    M = window + U keys."""
    padded = jnp.pad(x_nUxBxUx___, [(num_prev, 0)] + [(0, 0)] * (x_nUxBxUx___.ndim - 1),
                     constant_values=fill)
    return jnp.concatenate([padded[j:j + nu] for j in range(num_prev + 1)], axis=2)

  # Queries [nU, B, K, G*U, E] (the G heads of a KV group one after another); keys and values
  # [nU, B, K, M, E].
  q = chunked(q_BxNxHxE * (e**-0.5)).reshape(nu, b, u, num_kv, g, e)
  q = q.transpose(0, 1, 3, 4, 2, 5).reshape(nu, b, num_kv, g * u, e)
  k = with_previous(chunked(k_BxNxKxE)).transpose(0, 1, 3, 2, 4)
  v = with_previous(chunked(v_BxNxKxE)).transpose(0, 1, 3, 2, 4)

  q_pos, q_seg = chunked(positions, fill=-1), chunked(segment_ids_BxN, fill=-1)  # [nU, B, U]
  k_pos = with_previous(q_pos)
  k_seg = with_previous(q_seg, fill=-2)  # padding before the first chunk: no query's segment
  m = (num_prev + 1) * u
  q_pos, q_seg = q_pos.reshape(nu * b, u), q_seg.reshape(nu * b, u)
  k_pos, k_seg = k_pos.reshape(nu * b, m), k_seg.reshape(nu * b, m)
  mask = causal_segment_mask(q_pos, k_pos, q_seg, k_seg, window)
  # The backward pass works on transposed scores; building that mask directly is cheaper than
  # transposing this one.
  mask_t = causal_segment_mask(q_pos, k_pos, q_seg, k_seg, window, transposed=True)
  # Every query head of a KV group shares the mask: [nU, B, 1, G*U, M] and [nU, B, 1, M, G*U].
  mask = jnp.tile(mask.reshape(nu, b, 1, u, m), (1, 1, 1, g, 1))
  mask_t = jnp.tile(mask_t.reshape(nu, b, 1, m, u), (1, 1, 1, 1, g))

  def attend(*args):
    if loop:
      return jax.lax.map(lambda a: chunk_attention(*a), args)
    return chunk_attention(*args)
  # The first num_prev chunks lie inside the first window, so the first of their key blocks is
  # all padding: they skip it (for 1 KiB rows and 256-byte chunks, a sixth of the scores).
  warm = attend(q[:num_prev], k[:num_prev, :, :, u:], v[:num_prev, :, :, u:],
                mask[:num_prev, ..., u:], mask_t[:num_prev, :, :, u:])
  rest = attend(q[num_prev:], k[num_prev:], v[num_prev:], mask[num_prev:], mask_t[num_prev:])
  out = jnp.concatenate([warm, rest])  # [nU, B, K, G*U, E]
  out = out.reshape(nu, b, num_kv, g, u, e).transpose(1, 0, 4, 2, 3, 5).reshape(b, nu * u, h, e)
  return out[:, :n].astype(q_BxNxHxE.dtype)


@jax.custom_vjp
def chunk_attention(q_XxQxE, k_XxMxE, v_XxMxE, mask_XxQxM, mask_XxMxQ):
  """softmax(q k^T) v over batch dims X (q pre-scaled; every query row sees at least one key).

  `mask_XxMxQ` is the same mask in the transposed layout (for the backward pass).
  A custom VJP in the style of flash attention: the backward keeps only q, k, v, the output and
  the row log-sum-exp (not the [Q, M] probabilities), recomputes the scores once, and orders
  every matmul so that XLA:CPU runs it in a fast layout (see `_chunk_attention_bwd`).
  """
  return _chunk_attention_fwd(q_XxQxE, k_XxMxE, v_XxMxE, mask_XxQxM, mask_XxMxQ)[0]


def _chunk_attention_fwd(q, k, v, mask, mask_t):
  s = jnp.einsum("...qe,...me->...qm", q, k, preferred_element_type=jnp.float32)
  s = jnp.where(mask, s, -1e30)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("...qm,...me->...qe", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = (o / denom).astype(q.dtype)  # normalising after PV touches [Q, E], not [Q, M]
  lse = (row_max + jnp.log(denom))[..., 0]  # [..., Q]
  return o, (q, k, v, mask_t, o, lse)


def _chunk_attention_bwd(res, do):
  """Gradients from transposed scores [.., M, Q]: every matmul is then NN or NT. XLA:CPU runs
  the TN products that plain autodiff produces (contracting the left operand's major axis)
  about 3x slower, and slower than transposing dS once (the barrier keeps XLA from folding
  that transpose back into the dq product)."""
  q, k, v, mask_t, o, lse = res
  f32 = jnp.float32
  st = jnp.einsum("...me,...qe->...mq", k, q, preferred_element_type=f32)
  pt = jnp.where(mask_t, jnp.exp(st - lse[..., None, :]), 0.0)
  dv = jnp.einsum("...mq,...qe->...me", pt.astype(do.dtype), do, preferred_element_type=f32)
  dpt = jnp.einsum("...me,...qe->...mq", v, do, preferred_element_type=f32)
  delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)[..., None, :]  # rowsum(dO * O)
  dst = (pt * (dpt - delta)).astype(q.dtype)
  dk = jnp.einsum("...mq,...qe->...me", dst, q, preferred_element_type=f32)
  ds = jax.lax.optimization_barrier(jnp.swapaxes(dst, -1, -2))
  dq = jnp.einsum("...qm,...me->...qe", ds, k, preferred_element_type=f32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


chunk_attention.defvjp(_chunk_attention_fwd, _chunk_attention_bwd)


def sorted_take(x_PxF, ids_N):
  """x[ids] along axis 0 for ids that never decrease along the row (patch ids: they come from
  `patching.patch_ids_from_lengths`), which XLA's gather and its scatter-add transpose are told
  (sorted indices: no sort, contiguous segments). Ids past the end read NaN (jnp.take's "fill");
  the segment reductions drop them."""
  return x_PxF.at[ids_N].get(mode="fill", indices_are_sorted=True)


def patch_pooling_attention(q_BxPxkxHxE, k_BxNxHxE, v_BxNxHxE, patch_ids_BxN):
  """Encoder cross-attention: sub-query (p, j) attends only to the bytes t with patch_ids[t] == p
  (patch ids never decrease along a row: the gathers and segment sums are told so).

  Computed as a segment softmax over bytes (each byte meets only its own patch's k sub-queries),
  O(N·k·H·E) work and memory. Empty patches get a zero output. Returns [B, P, k, H, E].
  """
  num_patches = q_BxPxkxHxE.shape[1]
  e = q_BxPxkxHxE.shape[-1]

  def one_row(q_PxkxHxE, k_NxHxE, v_NxHxE, ids_N):
    q_n = sorted_take(q_PxkxHxE, ids_N)  # [N, k, H, E]: each byte's own patch's sub-queries
    s = jnp.einsum("njhe,nhe->njh", q_n * (e**-0.5), k_NxHxE,
                   preferred_element_type=jnp.float32)
    segments = dict(num_segments=num_patches, indices_are_sorted=True)
    s_max = jax.ops.segment_max(s, ids_N, **segments)  # [P, k, H]; -inf if empty
    s_max = jnp.where(jnp.isfinite(s_max), s_max, 0.0)
    p = jnp.exp(s - sorted_take(s_max, ids_N))  # [N, k, H]
    denom = jax.ops.segment_sum(p, ids_N, **segments)
    num = jax.ops.segment_sum(p[..., None] * v_NxHxE[:, None].astype(jnp.float32), ids_N,
                              **segments)  # [P, k, H, E]
    return num / jnp.where(denom == 0, 1.0, denom)[..., None]

  out = jax.vmap(one_row)(q_BxPxkxHxE, k_BxNxHxE, v_BxNxHxE, patch_ids_BxN)
  return out.astype(q_BxPxkxHxE.dtype)


def byte_to_patch_attention(q_BxNxHxE, k_BxPxkxHxE, v_BxPxkxHxE, patch_ids_BxN):
  """Decoder cross-attention: byte t attends to the k sub-vectors of patch `patch_ids[t]`.

  A gather of k keys per byte and a softmax over them: O(N·k·H·E). Returns [B, N, H, E].
  """
  e = q_BxNxHxE.shape[-1]
  gather = jax.vmap(sorted_take)
  k_n = gather(k_BxPxkxHxE, patch_ids_BxN)  # [B, N, k, H, E]
  v_n = gather(v_BxPxkxHxE, patch_ids_BxN)
  s = jnp.einsum("bnhe,bnjhe->bnjh", q_BxNxHxE * (e**-0.5), k_n,
                 preferred_element_type=jnp.float32)
  p = jax.nn.softmax(s, axis=2)
  out = jnp.einsum("bnjh,bnjhe->bnhe", p.astype(v_n.dtype), v_n,
                   preferred_element_type=jnp.float32)
  return out.astype(q_BxNxHxE.dtype)


def cached_attention(q_BxHxE, cache, q_pos_B, q_seg_B, *, window):
  """One query per row against a KV cache: {k, v: [B, C, K, E], pos, seg: [B, C]} (pos -1 =
  empty slot). Same visibility rule as `local_attention`. Returns [B, H, E]."""
  b, h, e = q_BxHxE.shape
  num_kv = cache["k"].shape[2]
  q = q_BxHxE.reshape(b, num_kv, h // num_kv, e) * (e**-0.5)
  scores = jnp.einsum("bkge,bcke->bkgc", q, cache["k"], preferred_element_type=jnp.float32)
  pos = cache["pos"]
  mask = (pos >= 0) & (pos <= q_pos_B[:, None]) & (cache["seg"] == q_seg_B[:, None])
  if window is not None:
    mask &= q_pos_B[:, None] - pos < window
  probs = _masked_softmax(scores, mask[:, None, None, :], rows_may_be_empty=False)
  out = jnp.einsum("bkgc,bcke->bkge", probs.astype(cache["v"].dtype), cache["v"],
                   preferred_element_type=jnp.float32)
  return out.reshape(b, h, e).astype(q_BxHxE.dtype)


def empty_kv_cache(batch, size, num_kv_heads, head_dim, dtype, layers=None):
  """A KV cache of C = `size` slots, every slot empty: {k, v: [B, C, K, E], pos, seg: [B, C]};
  `layers` adds a leading layer axis (scanned stacks)."""
  lead = (batch, size) if layers is None else (layers, batch, size)
  return dict(k=jnp.zeros(lead + (num_kv_heads, head_dim), dtype),
              v=jnp.zeros(lead + (num_kv_heads, head_dim), dtype),
              pos=jnp.full(lead, -1, jnp.int32), seg=jnp.zeros(lead, jnp.int32))


def write_kv_cache(cache, k_BxKxE, v_BxKxE, pos_B, seg_B, slot_B, write_B):
  """Writes one entry per row at `slot` (rows with write False keep their cache)."""
  size = cache["pos"].shape[1]
  hit = (jnp.arange(size)[None, :] == slot_B[:, None]) & write_B[:, None]  # [B, C]
  sel = hit[:, :, None, None]
  return dict(k=jnp.where(sel, k_BxKxE[:, None].astype(cache["k"].dtype), cache["k"]),
              v=jnp.where(sel, v_BxKxE[:, None].astype(cache["v"].dtype), cache["v"]),
              pos=jnp.where(hit, pos_B[:, None], cache["pos"]),
              seg=jnp.where(hit, seg_B[:, None], cache["seg"]))
