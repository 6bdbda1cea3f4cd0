"""Shared building blocks: init, RMSNorm, RoPE, dense layers and SwiGLU, all with logical axes.

Parameters are fp32 (`param_dtype`) and cast to the compute dtype at use; norm statistics and
RoPE angles are computed in fp32.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name


def trunc_normal(std: float):
  """The reference's init: normal(0, std) truncated at ±3 std (std of the *untruncated* normal).

  JAX's default truncation is ±2; the reference uses `trunc_normal_(std, a=-3std, b=3std)`.
  """
  return jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def param_with_axes(init_fn, axes):
  return nn.with_logical_partitioning(init_fn, axes)


def constrain(x, axes):
  """Activation sharding constraint at block boundaries (no-op outside a mesh + rules context)."""
  return nn.with_logical_constraint(x, axes)


class Layer(nn.Module, kw_only=True):
  """A layer that keeps its parameters in `param_dtype` and computes in `dtype` (keyword-only:
  they follow each layer's own fields, as `transformer.dtypes(runtime)` passes them)."""
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32


class Dense(Layer):
  """Bias-free linear layer `y = x @ W`, W [I, O] (the transpose of a PyTorch Linear weight)."""
  features: int
  std: float
  axes: tuple[str | None, str | None]
  out_dtype: jnp.dtype | None = None  # e.g. fp32 logits from bf16 inputs.

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", param_with_axes(trunc_normal(self.std), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    x = x.astype(self.dtype)
    if self.out_dtype is None or jnp.dtype(self.out_dtype) == x.dtype:
      return matmul(x, kernel)
    return jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype),
                      preferred_element_type=jnp.float32).astype(self.out_dtype)


@jax.custom_vjp
def matmul(x_XxI, w_IxO):
  """x @ w in x's dtype (w is cast to it), accumulated in fp32: bf16 x bf16 -> fp32 is also the
  fast path of CPUs with AVX512-BF16 (bf16 -> bf16 is not). Returns x's dtype.

  The custom VJP keeps the backward matmuls in the compute dtype. Plain autodiff hands them the
  fp32 cotangent of the fp32 accumulator, and XLA then runs both backward products in fp32
  (2-3x slower on CPU). Nothing is lost: that cotangent holds the bf16 values of the output's
  cotangent, and products of bf16 numbers are exact in the fp32 accumulator. The weight gradient
  comes back in w's own dtype (fp32 params: not rounded to bf16 on the way, unlike autodiff).
  """
  return _matmul_fwd(x_XxI, w_IxO)[0]


def _matmul_fwd(x, w):
  y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  return y.astype(x.dtype), (x, w)


def _matmul_bwd(res, g):
  x, w = res  # g comes in x's dtype, the output's
  dx = jnp.einsum("...o,io->...i", g, w.astype(x.dtype), preferred_element_type=jnp.float32)
  dw = jnp.einsum("...i,...o->io", x, g, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Embed(nn.Module):
  """Lookup table [num_embeddings, features]; lookups return the compute dtype."""
  num_embeddings: int
  features: int
  std: float
  axes: tuple[str | None, str | None]
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", param_with_axes(trunc_normal(self.std), self.axes),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids):
    return jnp.take(self.embedding, ids, axis=0)


class RMSNorm(Layer):
  """x * rsqrt(mean(x^2) + eps) * w, statistics in fp32, weight initialised to 1."""
  eps: float

  @nn.compact
  def __call__(self, x):
    w = self.param("scale", param_with_axes(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                   self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * w.astype(jnp.float32)).astype(self.dtype)


@functools.lru_cache(maxsize=None)
def _inv_freq(head_dim: int, theta: float) -> np.ndarray:
  # Same formula and precision as the reference: 1 / theta^(2i/d) in fp32.
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def apply_rope(x_BxNxHxE, positions_BxN, theta: float):
  """Rotary embedding on *interleaved adjacent pairs* (x[2i], x[2i+1]) — Meta's convention.

  HF-Llama's "rotate_half" pairs (x[i], x[i+E/2]) instead; released BLT weights need this one.
  """
  head_dim = x_BxNxHxE.shape[-1]
  inv_freq = jnp.asarray(_inv_freq(head_dim, float(theta)))
  angles = positions_BxN.astype(jnp.float32)[..., None] * inv_freq  # [B, N, E/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BxNxHxE.astype(jnp.float32).reshape(*x_BxNxHxE.shape[:-1], head_dim // 2, 2)
  x0, x1 = x[..., 0], x[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x_BxNxHxE.shape).astype(x_BxNxHxE.dtype)


def row_positions(batch: int, length: int):
  """[B, N] int32: positions 0..N-1 in every row (not reset per document)."""
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


class SwiGLU(Layer):
  """W2(silu(W1 x) * W3 x), hidden width F; W1/W3 init std D^-0.5, W2 std F^-0.5 (reference)."""
  hidden: int

  @nn.compact
  def __call__(self, x_BxNxD):
    dim = x_BxNxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate_BxNxF = checkpoint_name(
        Dense(self.hidden, dim**-0.5, ("embed", "mlp"), name="w1", **kw)(x_BxNxD), "mlp_gate")
    up_BxNxF = checkpoint_name(
        Dense(self.hidden, dim**-0.5, ("embed", "mlp"), name="w3", **kw)(x_BxNxD), "mlp_up")
    h_BxNxF = constrain(nn.silu(gate_BxNxF) * up_BxNxF, ("batch", "length", "act_mlp"))
    return checkpoint_name(
        Dense(dim, self.hidden**-0.5, ("mlp", "embed"), name="w2", **kw)(h_BxNxF), "mlp_out")
