"""Transformer blocks shared by the local encoder, latent transformer, local decoder and entropy model.

`Block` is the reference's pre-norm Llama block (no biases):
  h = x + Wo·Attn(RoPE(Wq·n(x)), RoPE(Wk·n(x)), Wv·n(x));  y = h + W2(silu(W1·n'(h)) * W3·n'(h)).
Layer stacks are `nn.scan`ned (parameters stacked on a leading 'layers' axis) with a configurable
remat policy, which keeps compile time and compiled memory independent of depth.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.model import attention
from bltjax.model.config import RuntimeConfig, TransformerConfig
from bltjax.model.layers import Dense, RMSNorm, SwiGLU, apply_rope, constrain

ACT = ("batch", "length", "act_embed")  # logical axes of [B, S, D] activations.


def dtypes(rt: RuntimeConfig):
  return dict(dtype=jnp.dtype(rt.dtype), param_dtype=jnp.dtype(rt.param_dtype))


class SelfAttention(nn.Module):
  """Causal self-attention with RoPE, grouped KV heads, segment masking and optional window."""
  cfg: TransformerConfig
  rt: RuntimeConfig

  def setup(self):
    c, kw = self.cfg, dtypes(self.rt)
    std = c.dim**-0.5  # the reference uses dim^-0.5 for all four projections (wo included).
    self.wq = Dense(c.n_heads * c.head_dim, std, ("embed", "heads"), **kw)
    self.wk = Dense(c.n_kv_heads * c.head_dim, std, ("embed", "kv_heads"), **kw)
    self.wv = Dense(c.n_kv_heads * c.head_dim, std, ("embed", "kv_heads"), **kw)
    self.wo = Dense(c.dim, std, ("heads", "embed"), **kw)

  def qkv(self, x_BxSxD, positions_BxS):
    c = self.cfg
    b, s, _ = x_BxSxD.shape
    q = self.wq(x_BxSxD).reshape(b, s, c.n_heads, c.head_dim)
    k = self.wk(x_BxSxD).reshape(b, s, c.n_kv_heads, c.head_dim)
    v = self.wv(x_BxSxD).reshape(b, s, c.n_kv_heads, c.head_dim)
    q = apply_rope(q, positions_BxS, c.rope_theta)
    k = apply_rope(k, positions_BxS, c.rope_theta)
    return q, k, v

  def out(self, o_BxSxHxD):
    b, s, h, d = o_BxSxHxD.shape
    return self.wo(constrain(o_BxSxHxD, ("batch", "length", "act_heads", None)).reshape(b, s, h * d))

  def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
    q, k, v = self.qkv(x_BxSxD, positions_BxS)
    # Positions are row positions 0..S-1 here, so blockwise local attention applies.
    o = attention.local_attention(q, k, v, segment_ids_BxS, window=self.cfg.attn_window)
    return self.out(o)


class Block(nn.Module):
  """Pre-norm transformer block; `collect=True` also emits its output as a scan output."""
  cfg: TransformerConfig
  rt: RuntimeConfig
  collect: bool = False

  def setup(self):
    c, kw = self.cfg, dtypes(self.rt)
    self.attention_norm = RMSNorm(c.norm_eps, **kw)
    self.attention = SelfAttention(c, self.rt)
    self.ffn_norm = RMSNorm(c.norm_eps, **kw)
    self.feed_forward = SwiGLU(c.ffn_dim, **kw)

  def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
    x = constrain(x_BxSxD, ACT)
    h = x + self.attention(self.attention_norm(x), positions_BxS, segment_ids_BxS)
    y = constrain(h + self.feed_forward(self.ffn_norm(h)), ACT)
    return y, (y if self.collect else None)


def scan_stack(block_cls, *, length: int, rt: RuntimeConfig, in_axes):
  """`nn.scan` over `length` copies of `block_cls` with the configured remat policy.

  The block's __call__ must be (carry, *xs) -> (carry, y). `in_axes` says per non-carry argument
  whether it is broadcast (`nn.broadcast`) or scanned over (0).
  """
  if rt.remat_policy != "none":
    policy = None if rt.remat_policy == "full" else getattr(jax.checkpoint_policies,
                                                           rt.remat_policy)
    block_cls = nn.remat(block_cls, policy=policy, prevent_cse=False)
  return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})


class Stack(nn.Module):
  """`cfg.n_layers` scanned Blocks. Returns (y, per-layer outputs [L, B, S, D] or None)."""
  cfg: TransformerConfig
  rt: RuntimeConfig
  collect: bool = False

  @nn.compact
  def __call__(self, x_BxSxD, positions_BxS, segment_ids_BxS):
    layers = scan_stack(Block, length=self.cfg.n_layers, rt=self.rt,
                        in_axes=(nn.broadcast, nn.broadcast))
    return layers(self.cfg, self.rt, self.collect, name="layers")(
        x_BxSxD, positions_BxS, segment_ids_BxS)


class CrossAttention(nn.Module):
  """The reference's cross-attention: RMSNorm on queries, one RMSNorm shared by keys and values,
  no RoPE, and it returns `x + Wo·attn` (callers add x again: the double residual, see below)."""
  dim: int
  n_heads: int
  norm_eps: float
  rt: RuntimeConfig

  def setup(self):
    kw, std = dtypes(self.rt), self.dim**-0.5
    self.cross_attn_norm_q = RMSNorm(self.norm_eps, **kw)
    self.cross_attn_norm_kv = RMSNorm(self.norm_eps, **kw)
    self.wq = Dense(self.dim, std, ("embed", "heads"), **kw)
    self.wk = Dense(self.dim, std, ("embed", "heads"), **kw)
    self.wv = Dense(self.dim, std, ("embed", "heads"), **kw)
    self.wo = Dense(self.dim, std, ("heads", "embed"), **kw)

  def heads(self, x):
    return x.reshape(*x.shape[:-1], self.n_heads, self.dim // self.n_heads)

  def merge(self, o):
    return self.wo(o.reshape(*o.shape[:-2], self.dim))


class PatchCrossAttention(CrossAttention):
  """Encoder side: patch sub-queries [B, P, k, D] pool the bytes [B, N, D] of their own patch."""

  def __call__(self, pe_BxPxkxD, h_BxNxD, patch_ids_BxN):
    q = self.heads(self.wq(self.cross_attn_norm_q(pe_BxPxkxD)))
    kv = self.cross_attn_norm_kv(h_BxNxD)
    o = attention.patch_pooling_attention(q, self.heads(self.wk(kv)), self.heads(self.wv(kv)),
                                          patch_ids_BxN)
    # Reference quirk kept for released weights: CA returns x + out and the caller adds x again,
    # so one layer maps pe -> 2*pe + out.
    pe = pe_BxPxkxD + (pe_BxPxkxD + self.merge(o))
    return pe, None


class ByteCrossAttention(CrossAttention):
  """Decoder side: bytes [B, N, D] read the k sub-vectors [B, P, k, D] of patch `patch_ids[t]`."""

  def __call__(self, h_BxNxD, pe_BxPxkxD, patch_ids_BxN):
    q = self.heads(self.wq(self.cross_attn_norm_q(h_BxNxD)))
    kv = self.cross_attn_norm_kv(pe_BxPxkxD)
    o = attention.byte_to_patch_attention(q, self.heads(self.wk(kv)), self.heads(self.wv(kv)),
                                          patch_ids_BxN)
    return h_BxNxD + (h_BxNxD + self.merge(o))  # double residual, as in the reference.
