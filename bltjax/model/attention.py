"""Attention kernels as pure functions (no parameters).

Shapes: B batch, S/N sequence (bytes), P patches, H query heads, G = H / K query heads per KV head,
K KV heads (in `*_BxSxKxD` names K is the KV-head axis), D head dim, C chunk, k sub-queries.

- `local_attention`: sliding-window causal self-attention with document (segment) masking, computed
  blockwise: chunks of the window size attend to themselves and the previous chunk, so the cost is
  O(N·w), never O(N^2).
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


def _masked_softmax(scores, mask):
  """Softmax over the last axis where masked entries get 0; an all-masked row gives all zeros."""
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(scores - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(denom == 0, 1.0, denom)


def _group(q_BxSxHxD, num_kv_heads):
  b, s, h, d = q_BxSxHxD.shape
  return q_BxSxHxD.reshape(b, s, num_kv_heads, h // num_kv_heads, d)


def dense_attention(q_BxQxHxD, k_BxSxKxD, v_BxSxKxD, mask_BxQxS):
  """softmax(q k^T / sqrt(D)) v with a boolean mask (True = may attend). Returns [B, Q, H, D]."""
  num_kv = k_BxSxKxD.shape[2]
  q = _group(q_BxQxHxD * (q_BxQxHxD.shape[-1] ** -0.5), num_kv)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k_BxSxKxD, preferred_element_type=jnp.float32)
  probs = _masked_softmax(scores, mask_BxQxS[:, None, None, :, :])
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v_BxSxKxD.dtype), v_BxSxKxD,
                   preferred_element_type=jnp.float32)
  b, q_len, k, g, d = out.shape
  return out.reshape(b, q_len, k * g, d).astype(q_BxQxHxD.dtype)


def causal_segment_mask(q_pos_BxQ, k_pos_BxS, q_seg_BxQ, k_seg_BxS, window=None):
  """Key j is visible from query i iff same segment, j <= i and (window) i - j < window."""
  qp, kp = q_pos_BxQ[:, :, None], k_pos_BxS[:, None, :]
  mask = (q_seg_BxQ[:, :, None] == k_seg_BxS[:, None, :]) & (kp <= qp)
  if window is not None:
    mask &= qp - kp < window
  return mask


def local_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, segment_ids_BxN, *, window):
  """Sliding-window causal self-attention within segments, blockwise in O(N·window).

  Query i sees key j iff seg[i] == seg[j] and i - window < j <= i (window keys including itself,
  the reference's xformers `make_local_attention(window)` semantics). Chunks of C = window queries
  attend to their own chunk and the previous one, which covers every visible key.
  """
  b, n, h, d = q_BxNxHxD.shape
  num_kv = k_BxNxKxD.shape[2]
  positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  if window is None or n <= window:
    mask = causal_segment_mask(positions, positions, segment_ids_BxN, segment_ids_BxN, window)
    return dense_attention(q_BxNxHxD, k_BxNxKxD, v_BxNxKxD, mask)

  c = window
  num_chunks = -(-n // c)
  pad = num_chunks * c - n

  def chunk(x, fill=0):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return x.reshape(b, num_chunks, c, *x.shape[2:])

  def with_previous(x_BxCxT):  # [B, nC, C, ...] -> [B, nC, 2C, ...]: previous chunk, then own.
    prev = jnp.pad(x_BxCxT, [(0, 0), (1, 0)] + [(0, 0)] * (x_BxCxT.ndim - 2))[:, :-1]
    return jnp.concatenate([prev, x_BxCxT], axis=2)

  q = chunk(q_BxNxHxD * (d**-0.5)).reshape(b, num_chunks, c, num_kv, h // num_kv, d)
  k2 = with_previous(chunk(k_BxNxKxD))
  v2 = with_previous(chunk(v_BxNxKxD))
  q_pos = chunk(positions, fill=-1)
  q_seg = chunk(segment_ids_BxN, fill=-1)
  k_pos = with_previous(q_pos)
  # The first chunk has no previous chunk: its zero padding gets segment -2, which no query has.
  k_seg = jnp.concatenate(
      [jnp.pad(q_seg, [(0, 0), (1, 0), (0, 0)], constant_values=-2)[:, :-1], q_seg], axis=2)
  mask = causal_segment_mask(q_pos.reshape(b * num_chunks, c), k_pos.reshape(b * num_chunks, 2 * c),
                             q_seg.reshape(b * num_chunks, c), k_seg.reshape(b * num_chunks, 2 * c),
                             window)
  mask = mask.reshape(b, num_chunks, 1, 1, c, 2 * c)

  scores = jnp.einsum("bcqkgd,bcskd->bckgqs", q, k2, preferred_element_type=jnp.float32)
  probs = _masked_softmax(scores, mask)
  out = jnp.einsum("bckgqs,bcskd->bcqkgd", probs.astype(v2.dtype), v2,
                   preferred_element_type=jnp.float32)
  out = out.reshape(b, num_chunks * c, h, d)[:, :n]
  return out.astype(q_BxNxHxD.dtype)


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
