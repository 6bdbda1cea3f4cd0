"""Attention kernels as pure functions (no parameters).

Shapes: B batch, S/N sequence (bytes), P patches, H query heads, G = H / K query heads per KV head,
K KV heads (in `*_BxSxKxD` names K is the KV-head axis), D head dim, C chunk, k sub-queries.

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


def _heads_first(q_BxSxHxD, num_kv_heads):
  """[B, S, H, D] -> [B, K, G, S, D]. XLA:CPU runs batched matmuls several times faster when the
  batch dimensions (batch, KV heads) lead; `local_attention` likewise puts (chunk, batch, KV
  head) first."""
  b, s, h, d = q_BxSxHxD.shape
  return q_BxSxHxD.reshape(b, s, num_kv_heads, h // num_kv_heads, d).transpose(0, 2, 3, 1, 4)


def dense_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxQxS, *, rows_may_be_empty=True):
  """softmax(q k^T / sqrt(D)) v with a boolean mask (True = may attend). Returns [B, Q, H, D]."""
  b, q_len, h, d = q_BxQxHxD.shape
  num_kv = k_BxSxKxD.shape[2]
  g = h // num_kv
  q = _heads_first(q_BxQxHxD * (d**-0.5), num_kv).reshape(b, num_kv, g * q_len, d)
  k = k_BxSxKxD.transpose(0, 2, 1, 3)  # [B, K, S, D]
  v = v_BxSxKxD.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, num_kv, g, q_len, -1)
  probs = _masked_softmax(scores, mask_BxQxS[:, None, None, :, :],
                          rows_may_be_empty=rows_may_be_empty)
  probs = probs.reshape(b, num_kv, g * q_len, -1).astype(v.dtype)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v, preferred_element_type=jnp.float32)
  out = out.reshape(b, num_kv, g, q_len, d).transpose(0, 3, 1, 2, 4).reshape(b, q_len, h, d)
  return out.astype(q_BxQxHxD.dtype)


def causal_segment_mask(q_pos_BxQ, k_pos_BxS, q_seg_BxQ, k_seg_BxS, window=None,
                        transposed=False):
  """Key j is visible from query i iff same segment, j <= i and (window) i - j < window.

  Returns [B, Q, S], or [B, S, Q] with `transposed` (built in that layout, not transposed).
  """
  q_axis, k_axis = (2, 1) if transposed else (1, 2)
  qp, kp = jnp.expand_dims(q_pos_BxQ, k_axis), jnp.expand_dims(k_pos_BxS, q_axis)
  mask = (jnp.expand_dims(q_seg_BxQ, k_axis) == jnp.expand_dims(k_seg_BxS, q_axis)) & (kp <= qp)
  if window is not None:
    mask &= qp - kp < window
  return mask


def local_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, segment_ids_BxN, *, window, chunk=None,
                    loop=False):
  """Sliding-window causal self-attention within segments, blockwise in O(N·window).

  Query i sees key j iff seg[i] == seg[j] and i - window < j <= i (window keys including itself,
  the reference's xformers `make_local_attention(window)` semantics). Queries are cut into chunks
  of C positions (default C = window); a chunk attends to itself and the r = window / C chunks
  before it, which covers every visible key: N·(window + C) scores instead of N^2. With C = window
  half of the scores are masked; smaller chunks waste less (C = window/4: a fifth).

  `loop` computes the chunks one after another (`lax.map`) instead of as one batch, so that each
  chunk's [C, window + C] scores stay in cache: faster on CPUs, where attention is bound by memory
  traffic; accelerators prefer the single batched op.
  """
  b, n, h, d = q_BxNxHxD.shape
  num_kv = k_BxNxKxD.shape[2]
  g = h // num_kv
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  if window is None or n <= window:
    mask = causal_segment_mask(positions, positions, segment_ids_BxN, segment_ids_BxN, window)
    return dense_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, mask, rows_may_be_empty=False)

  c = window if chunk is None else chunk
  if window % c:
    raise ValueError(f"attention chunk {c} must divide the window {window}")
  r = window // c  # previous chunks each query chunk needs
  nc = -(-n // c)
  pad = nc * c - n

  def chunked(x_BxNx___, fill=0):
    """[B, N, ...] -> [nC, B, C, ...]: chunk-major, so chunks are the leading batch axis."""
    widths = [(0, 0)] * x_BxNx___.ndim
    widths[1] = (0, pad)
    x = jnp.pad(x_BxNx___, widths, constant_values=fill)
    return jnp.moveaxis(x.reshape(b, nc, c, *x.shape[2:]), 1, 0)

  def with_previous(x_nCxBxCx___, fill=0):
    """Rows (axis 2) of the r previous chunks, then the chunk's own: [nC, B, (r+1)C, ...]."""
    padded = jnp.pad(x_nCxBxCx___, [(r, 0)] + [(0, 0)] * (x_nCxBxCx___.ndim - 1),
                     constant_values=fill)
    return jnp.concatenate([padded[j:j + nc] for j in range(r + 1)], axis=2)

  # Queries [nC, B, K, G*C, D] (the G heads of a KV group one after another); keys and values
  # [nC, B, K, (r+1)C, D].
  q = chunked(q_BxNxHxD * (d**-0.5)).reshape(nc, b, c, num_kv, g, d)
  q = q.transpose(0, 1, 3, 4, 2, 5).reshape(nc, b, num_kv, g * c, d)
  k = with_previous(chunked(k_BxNxKxD)).transpose(0, 1, 3, 2, 4)
  v = with_previous(chunked(v_BxNxKxD)).transpose(0, 1, 3, 2, 4)

  q_pos, q_seg = chunked(positions, fill=-1), chunked(segment_ids_BxN, fill=-1)  # [nC, B, C]
  k_pos = with_previous(q_pos)
  k_seg = with_previous(q_seg, fill=-2)  # padding before the first chunk: no query's segment
  s = (r + 1) * c
  q_pos, q_seg = q_pos.reshape(nc * b, c), q_seg.reshape(nc * b, c)
  k_pos, k_seg = k_pos.reshape(nc * b, s), k_seg.reshape(nc * b, s)
  mask = causal_segment_mask(q_pos, k_pos, q_seg, k_seg, window)
  # The backward pass works on transposed scores; building that mask directly is cheaper than
  # transposing this one.
  mask_t = causal_segment_mask(q_pos, k_pos, q_seg, k_seg, window, transposed=True)
  # Every query head of a KV group shares the mask: [nC, B, 1, G*C, S] and [nC, B, 1, S, G*C].
  mask = jnp.tile(mask.reshape(nc, b, 1, c, s), (1, 1, 1, g, 1))
  mask_t = jnp.tile(mask_t.reshape(nc, b, 1, s, c), (1, 1, 1, 1, g))

  def attend(*args):
    if loop:
      return jax.lax.map(lambda a: chunk_attention(*a), args)
    return chunk_attention(*args)
  # The first r chunks lie inside the first window, so the first of their r + 1 key blocks is
  # all padding: they skip it (for 1 KiB rows and 256-byte chunks, a sixth of the scores).
  warm = attend(q[:r], k[:r, :, :, c:], v[:r, :, :, c:], mask[:r, ..., c:],
                mask_t[:r, :, :, c:])
  rest = attend(q[r:], k[r:], v[r:], mask[r:], mask_t[r:])
  out = jnp.concatenate([warm, rest])  # [nC, B, K, G*C, D]
  out = out.reshape(nc, b, num_kv, g, c, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, nc * c, h, d)
  return out[:, :n].astype(q_BxNxHxD.dtype)


@jax.custom_vjp
def chunk_attention(q_XxQxD, k_XxSxD, v_XxSxD, mask_XxQxS, mask_XxSxQ):
  """softmax(q k^T) v over batch dims X (q pre-scaled; every query row sees at least one key).

  `mask_XxSxQ` is the same mask in the transposed layout (for the backward pass).
  A custom VJP in the style of flash attention: the backward keeps only q, k, v, the output and
  the row log-sum-exp (not the [Q, S] probabilities), recomputes the scores once, and orders
  every matmul so that XLA:CPU runs it in a fast layout (see `_chunk_attention_bwd`).
  """
  return _chunk_attention_fwd(q_XxQxD, k_XxSxD, v_XxSxD, mask_XxQxS, mask_XxSxQ)[0]


def _chunk_attention_fwd(q, k, v, mask, mask_t):
  s = jnp.einsum("...qd,...sd->...qs", q, k, preferred_element_type=jnp.float32)
  s = jnp.where(mask, s, -1e30)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("...qs,...sd->...qd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = (o / denom).astype(q.dtype)  # normalising after PV touches [Q, D], not [Q, S]
  lse = (row_max + jnp.log(denom))[..., 0]  # [..., Q]
  return o, (q, k, v, mask_t, o, lse)


def _chunk_attention_bwd(res, do):
  """Gradients from transposed scores [.., S, Q]: every matmul is then NN or NT. XLA:CPU runs
  the TN products that plain autodiff produces (contracting the left operand's major axis)
  about 3x slower, and slower than transposing dS once (the barrier keeps XLA from folding
  that transpose back into the dq product)."""
  q, k, v, mask_t, o, lse = res
  f32 = jnp.float32
  st = jnp.einsum("...sd,...qd->...sq", k, q, preferred_element_type=f32)
  pt = jnp.where(mask_t, jnp.exp(st - lse[..., None, :]), 0.0)
  dv = jnp.einsum("...sq,...qd->...sd", pt.astype(do.dtype), do, preferred_element_type=f32)
  dpt = jnp.einsum("...sd,...qd->...sq", v, do, preferred_element_type=f32)
  delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)[..., None, :]  # rowsum(dO * O)
  dst = (pt * (dpt - delta)).astype(q.dtype)
  dk = jnp.einsum("...sq,...qd->...sd", dst, q, preferred_element_type=f32)
  ds = jax.lax.optimization_barrier(jnp.swapaxes(dst, -1, -2))
  dq = jnp.einsum("...qs,...sd->...qd", ds, k, preferred_element_type=f32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


chunk_attention.defvjp(_chunk_attention_fwd, _chunk_attention_bwd)


def patch_pooling_attention(q_BxPxkxHxD, k_BxNxHxD, v_BxNxHxD, patch_ids_BxN):
  """Encoder cross-attention: sub-query (p, j) attends only to the bytes t with patch_ids[t] == p.

  Computed as a segment softmax over bytes (each byte meets only its own patch's k sub-queries),
  O(N·k·H·D) work and memory. Empty patches get a zero output. Returns [B, P, k, H, D].
  """
  num_patches = q_BxPxkxHxD.shape[1]
  d = q_BxPxkxHxD.shape[-1]

  def one_row(q_Pxkxhxd, k_Nxhxd, v_Nxhxd, ids_N):
    q_t = jnp.take(q_Pxkxhxd, ids_N, axis=0)  # [N, k, H, D]: each byte's own patch's sub-queries
    s = jnp.einsum("tjhd,thd->tjh", q_t * (d**-0.5), k_Nxhxd,
                   preferred_element_type=jnp.float32)
    s_max = jax.ops.segment_max(s, ids_N, num_segments=num_patches)  # [P, k, H]; -inf if empty
    s_max = jnp.where(jnp.isfinite(s_max), s_max, 0.0)
    e = jnp.exp(s - jnp.take(s_max, ids_N, axis=0))  # [N, k, H]
    denom = jax.ops.segment_sum(e, ids_N, num_segments=num_patches)
    num = jax.ops.segment_sum(e[..., None] * v_Nxhxd[:, None].astype(jnp.float32), ids_N,
                              num_segments=num_patches)  # [P, k, H, D]
    return num / jnp.where(denom == 0, 1.0, denom)[..., None]

  out = jax.vmap(one_row)(q_BxPxkxHxD, k_BxNxHxD, v_BxNxHxD, patch_ids_BxN)
  return out.astype(q_BxPxkxHxD.dtype)


def byte_to_patch_attention(q_BxNxHxD, k_BxPxkxHxD, v_BxPxkxHxD, patch_ids_BxN):
  """Decoder cross-attention: byte t attends to the k sub-vectors of patch `patch_ids[t]`.

  A gather of k keys per byte and a softmax over them: O(N·k·H·D). Returns [B, N, H, D].
  """
  d = q_BxNxHxD.shape[-1]
  gather = jax.vmap(lambda x, ids: jnp.take(x, ids, axis=0))
  k_t = gather(k_BxPxkxHxD, patch_ids_BxN)  # [B, N, k, H, D]
  v_t = gather(v_BxPxkxHxD, patch_ids_BxN)
  s = jnp.einsum("bthd,btjhd->btjh", q_BxNxHxD * (d**-0.5), k_t,
                 preferred_element_type=jnp.float32)
  p = jax.nn.softmax(s, axis=2)
  out = jnp.einsum("btjh,btjhd->bthd", p.astype(v_t.dtype), v_t,
                   preferred_element_type=jnp.float32)
  return out.astype(q_BxNxHxD.dtype)


def cached_attention(q_BxHxD, cache, q_pos_B, q_seg_B, *, window):
  """One query per row against a KV cache: {k, v: [B, S, K, D], pos, seg: [B, S]} (pos -1 =
  empty slot). Same visibility rule as `local_attention`. Returns [B, H, D]."""
  b, h, d = q_BxHxD.shape
  num_kv = cache["k"].shape[2]
  q = q_BxHxD.reshape(b, num_kv, h // num_kv, d) * (d**-0.5)
  scores = jnp.einsum("bkgd,bskd->bkgs", q, cache["k"], preferred_element_type=jnp.float32)
  pos = cache["pos"]
  mask = (pos >= 0) & (pos <= q_pos_B[:, None]) & (cache["seg"] == q_seg_B[:, None])
  if window is not None:
    mask &= q_pos_B[:, None] - pos < window
  probs = _masked_softmax(scores, mask[:, None, None, :], rows_may_be_empty=False)
  out = jnp.einsum("bkgs,bskd->bkgd", probs.astype(cache["v"].dtype), cache["v"],
                   preferred_element_type=jnp.float32)
  return out.reshape(b, h, d).astype(q_BxHxD.dtype)


def empty_kv_cache(batch, size, num_kv_heads, head_dim, dtype, layers=None):
  """A KV cache with every slot empty; `layers` adds a leading layer axis (scanned stacks)."""
  lead = (batch, size) if layers is None else (layers, batch, size)
  return dict(k=jnp.zeros(lead + (num_kv_heads, head_dim), dtype),
              v=jnp.zeros(lead + (num_kv_heads, head_dim), dtype),
              pos=jnp.full(lead, -1, jnp.int32), seg=jnp.zeros(lead, jnp.int32))


def write_kv_cache(cache, k_BxKxD, v_BxKxD, pos_B, seg_B, slot_B, write_B):
  """Writes one entry per row at `slot` (rows with write False keep their cache)."""
  size = cache["pos"].shape[1]
  hit = (jnp.arange(size)[None, :] == slot_B[:, None]) & write_B[:, None]  # [B, S]
  sel = hit[:, :, None, None]
  return dict(k=jnp.where(sel, k_BxKxD[:, None].astype(cache["k"].dtype), cache["k"]),
              v=jnp.where(sel, v_BxKxD[:, None].astype(cache["v"].dtype), cache["v"]),
              pos=jnp.where(hit, pos_B[:, None], cache["pos"]),
              seg=jnp.where(hit, seg_B[:, None], cache["seg"]))
