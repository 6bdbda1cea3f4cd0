"""The O(N·w) / O(N·k) attention kernels equal dense masked attention on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.model import attention
from tests.jaxprs import all_eqns


def dense_reference(q, k, v, mask):
  """Plain numpy softmax attention with a [B, Q, M] mask; all-masked rows give 0."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("bqhe,bmhe->bhqm", q, k) / np.sqrt(q.shape[-1])
  m = np.asarray(mask)[:, None]
  s = np.where(m, s, -np.inf)
  mx = np.max(s, axis=-1, keepdims=True)
  mx = np.where(np.isfinite(mx), mx, 0)
  p = np.where(m, np.exp(s - mx), 0)
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhqm,bmhe->bqhe", p, v)


def random_segments(rng, b, n, num_docs):
  cuts = np.sort(rng.integers(1, n, size=(b, num_docs - 1)), axis=1)
  seg = np.zeros((b, n), np.int32)
  for r in range(b):
    for c in cuts[r]:
      seg[r, c:] += 1
  return seg


@pytest.mark.parametrize("n,window,heads,kv_heads,docs,chunk", [
    (37, 8, 4, 4, 1, None),    # N not a multiple of the window
    (37, 8, 4, 4, 2, 2),       # chunks of a quarter window: four previous chunks per chunk
    (64, 16, 4, 2, 3, None),   # grouped KV heads, several documents
    (50, 7, 2, 1, 4, None),    # odd window, multi-query
    (12, 32, 2, 2, 2, None),   # window larger than N: one dense block
    (40, None, 2, 2, 3, None),  # no window: causal within documents
])
def test_local_attention_equals_dense_mask(n, window, heads, kv_heads, docs, chunk):
  rng = np.random.default_rng(n)
  b, e = 2, 8
  q = rng.normal(size=(b, n, heads, e)).astype(np.float32)
  k = rng.normal(size=(b, n, kv_heads, e)).astype(np.float32)
  v = rng.normal(size=(b, n, kv_heads, e)).astype(np.float32)
  seg = random_segments(rng, b, n, docs)
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  mask = (seg[:, :, None] == seg[:, None, :]) & (j <= i)
  if window is not None:
    mask &= (i - j) < window
  got = jax.jit(attention.local_attention, static_argnames=("window", "chunk"))(
      q, k, v, seg, window=window, chunk=chunk)
  np.testing.assert_allclose(np.asarray(got), dense_reference(q, k, v, mask), atol=2e-5)


@pytest.mark.parametrize("chunk", [None, 16])
def test_local_attention_never_builds_a_dense_mask(chunk):
  """Blockwise, forward and backward: the largest intermediate is O(N·2w), not O(N^2)."""
  b, n, h, e, w = 1, 4096, 1, 8, 64
  q = jnp.zeros((b, n, h, e))
  seg = jnp.zeros((b, n), jnp.int32)

  def loss(q):
    return attention.local_attention(q, q, q, seg, window=w, chunk=chunk).sum()
  for fn in (loss, jax.grad(loss)):
    eqns = list(all_eqns(jax.make_jaxpr(fn)(q).jaxpr))
    biggest = max(np.prod(v.aval.shape) for eqn in eqns for v in eqn.outvars)
    assert biggest <= b * n * 2 * w * h, biggest


@pytest.mark.parametrize("n,window,heads,kv_heads,docs,chunk", [
    (37, 8, 4, 4, 2, None),
    (64, 16, 4, 2, 3, 4),      # grouped KV heads, quarter-window chunks
    (50, 8, 2, 1, 4, 2),       # multi-query
])
@pytest.mark.parametrize("loop", [False, True])
def test_local_attention_gradients_equal_autodiff_of_dense(n, window, heads, kv_heads, docs,
                                                           chunk, loop):
  """The custom VJP (flash-style backward) equals autodiff through dense masked softmax, with the
  chunks batched or computed one at a time."""
  rng = np.random.default_rng(n + 1)
  b, e = 2, 8
  q = jnp.asarray(rng.normal(size=(b, n, heads, e)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, n, kv_heads, e)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, n, kv_heads, e)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(b, n, heads, e)), jnp.float32)
  seg = jnp.asarray(random_segments(rng, b, n, docs))
  pos = jnp.broadcast_to(jnp.arange(n), (b, n))
  mask = attention.causal_segment_mask(pos, pos, seg, seg, window)

  def blockwise(q, k, v):
    out = attention.local_attention(q, k, v, seg, window=window, chunk=chunk, loop=loop)
    return (out * cot).sum()

  def dense(q, k, v):
    return (attention.dense_attention(q, k, v, mask) * cot).sum()
  np.testing.assert_allclose(float(jax.jit(blockwise)(q, k, v)), float(dense(q, k, v)),
                             rtol=1e-5)
  got = jax.jit(jax.grad(blockwise, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(dense, argnums=(0, 1, 2)))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=f"d{name}")


def test_patch_pooling_attention_equals_dense_mask():
  rng = np.random.default_rng(0)
  b, n, p, k, h, e = 2, 30, 8, 3, 2, 4
  lengths = np.array([[1, 5, 3, 0 + 7, 4, 6, 5, 0], [1, 1, 2, 9, 9, 4, 4, 1]])  # empty patch 7
  ids = np.stack([np.repeat(np.arange(p), l)[:n] for l in lengths]).astype(np.int32)
  q = rng.normal(size=(b, p, k, h, e)).astype(np.float32)
  kk = rng.normal(size=(b, n, h, e)).astype(np.float32)
  v = rng.normal(size=(b, n, h, e)).astype(np.float32)
  got = np.asarray(jax.jit(attention.patch_pooling_attention)(q, kk, v, ids))
  mask = ids[:, None, :] == np.arange(p)[None, :, None]           # [B, P, N]
  mask = np.repeat(mask, k, axis=1)                                 # sub-query p*k+j -> patch p
  want = dense_reference(q.reshape(b, p * k, h, e), kk, v, mask).reshape(b, p, k, h, e)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert not np.any(got[0, 7]), "an empty patch must get a zero output"


def test_byte_to_patch_attention_equals_dense_mask():
  rng = np.random.default_rng(1)
  b, n, p, k, h, e = 2, 20, 6, 4, 2, 4
  ids = np.sort(rng.integers(0, p, size=(b, n)), axis=1).astype(np.int32)
  q = rng.normal(size=(b, n, h, e)).astype(np.float32)
  kk = rng.normal(size=(b, p, k, h, e)).astype(np.float32)
  v = rng.normal(size=(b, p, k, h, e)).astype(np.float32)
  got = np.asarray(jax.jit(attention.byte_to_patch_attention)(q, kk, v, ids))
  mask = np.repeat(ids[:, :, None] == np.arange(p)[None, None, :], k, axis=2)  # [B, N, P*k]
  want = dense_reference(q, kk.reshape(b, p * k, h, e), v.reshape(b, p * k, h, e), mask)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_fully_masked_rows_are_zero_not_nan():
  q = jnp.ones((1, 2, 1, 4))
  mask = jnp.array([[[True, False], [False, False]]])
  out = attention.dense_attention(q, q, q, mask)
  assert np.all(np.isfinite(out)) and not np.any(out[0, 1])
