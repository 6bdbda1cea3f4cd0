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
  batch dimensions (batch, KV heads) lead, so every kernel works in this layout."""
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


def causal_segment_mask(q_pos_BxQ, k_pos_BxS, q_seg_BxQ, k_seg_BxS, window=None):
  """Key j is visible from query i iff same segment, j <= i and (window) i - j < window."""
  qp, kp = q_pos_BxQ[:, :, None], k_pos_BxS[:, None, :]
  mask = (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :]) & (kp <= qp)
  if window is not None:
    mask &= qp - kp < window
  return mask


def local_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, segment_ids_BxN, *, window, chunk=None):
  """Sliding-window causal self-attention within segments, blockwise in O(N·window).

  Query i sees key j iff seg[i] == seg[j] and i - window < j <= i (window keys including itself,
  the reference's xformers `make_local_attention(window)` semantics). Queries are cut into chunks
  of C positions (default C = window); a chunk attends to itself and the r = window / C chunks
  before it, which covers every visible key: N·(window + C) scores instead of N^2. With C = window
  half of the scores are masked; smaller chunks waste less (C = window/4: a fifth).
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

  def pad_n(x, axis, fill=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=fill)

  def with_previous(x, axis, fill=0):
    """Chunk axis `axis`, rows axis+1 -> rows of the r previous chunks, then the chunk's own."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (r, 0)
    padded = jnp.pad(x, widths, constant_values=fill)
    parts = [jax.lax.slice_in_dim(padded, j, j + nc, axis=axis) for j in range(r + 1)]
    return jnp.concatenate(parts, axis=axis + 1)

  # [B, K, G, N, D] -> [B, K, nC, G*C, D]; keys/values [B, K, nC, (r+1)C, D].
  q = pad_n(_heads_first(q_BxNxHxD * (d**-0.5), num_kv), 3).reshape(b, num_kv, g, nc, c, d)
  q = q.transpose(0, 1, 3, 2, 4, 5).reshape(b, num_kv, nc, g * c, d)
  k = with_previous(pad_n(k_BxNxKxD.transpose(0, 2, 1, 3), 2).reshape(b, num_kv, nc, c, d), 2)
  v = with_previous(pad_n(v_BxNxKxD.transpose(0, 2, 1, 3), 2).reshape(b, num_kv, nc, c, d), 2)

  q_pos = pad_n(positions, 1, fill=-1).reshape(b, nc, c)
  q_seg = pad_n(segment_ids_BxN, 1, fill=-1).reshape(b, nc, c)
  k_pos = with_previous(q_pos, 1)
  k_seg = with_previous(q_seg, 1, fill=-2)  # padding before the first chunk: no query's segment
  s = (r + 1) * c
  mask = causal_segment_mask(q_pos.reshape(b * nc, c), k_pos.reshape(b * nc, s),
                             q_seg.reshape(b * nc, c), k_seg.reshape(b * nc, s), window)
  # Every query head of a KV group shares the mask: [B, 1, nC, G*C, S].
  mask = jnp.tile(mask.reshape(b, 1, nc, c, s), (1, 1, 1, g, 1))
  out = chunk_attention(q, k, v, mask)  # [B, K, nC, G*C, D]
  out = out.reshape(b, num_kv, nc, g, c, d).transpose(0, 2, 4, 1, 3, 5).reshape(b, nc * c, h, d)
  return out[:, :n].astype(q_BxNxHxD.dtype)


@jax.custom_vjp
def chunk_attention(q_XxQxD, k_XxSxD, v_XxSxD, mask_XxQxS):
  """softmax(q k^T) v over batch dims X (q pre-scaled; every query row sees at least one key).

  A custom VJP in the style of flash attention: the backward keeps only q, k, v, the output and
  the row log-sum-exp (not the [Q, S] probabilities), recomputes the scores once, and orders
  every matmul so that XLA:CPU runs it in a fast layout (see `_chunk_attention_bwd`).
  """
  return _chunk_attention_fwd(q_XxQxD, k_XxSxD, v_XxSxD, mask_XxQxS)[0]


def _chunk_attention_fwd(q, k, v, mask):
  s = jnp.einsum("...qd,...sd->...qs", q, k, preferred_element_type=jnp.float32)
  s = jnp.where(mask, s, -1e30)
  row_max = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("...qs,...sd->...qd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  o = (o / denom).astype(q.dtype)  # normalising after PV touches [Q, D], not [Q, S]
  lse = (row_max + jnp.log(denom))[..., 0]  # [..., Q]
  return o, (q, k, v, mask, o, lse)


def _chunk_attention_bwd(res, do):
  """Gradients from transposed scores [.., S, Q]: every matmul is then NN or NT. XLA:CPU runs
  the TN products that plain autodiff produces (contracting the left operand's major axis)
  about 3x slower."""
  q, k, v, mask, o, lse = res
  f32 = jnp.float32
  st = jnp.einsum("...sd,...qd->...sq", k, q, preferred_element_type=f32)
  pt = jnp.where(jnp.swapaxes(mask, -1, -2), jnp.exp(st - lse[..., None, :]), 0.0)
  dv = jnp.einsum("...sq,...qd->...sd", pt.astype(do.dtype), do, preferred_element_type=f32)
  dpt = jnp.einsum("...sd,...qd->...sq", v, do, preferred_element_type=f32)
  delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)[..., None, :]  # rowsum(dO * O)
  dst = (pt * (dpt - delta)).astype(q.dtype)
  dk = jnp.einsum("...sq,...qd->...sd", dst, q, preferred_element_type=f32)
  dq = jnp.einsum("...qs,...sd->...qd", jnp.swapaxes(dst, -1, -2), k, preferred_element_type=f32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


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
