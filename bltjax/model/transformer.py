"""Transformer blocks shared by the local encoder, latent transformer, local decoder and entropy
model.

`Block` is the reference's pre-norm Llama block (no biases):
  h = x + Wo·Attn(RoPE(Wq·n(x)), RoPE(Wk·n(x)), Wv·n(x))
  y = h + W2(silu(W1·n'(h)) * W3·n'(h)).
Layer stacks are `nn.scan`ned (parameters stacked on a leading 'layers' axis) with a configurable
remat policy, which keeps compile time and compiled memory independent of depth.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from bltjax.model import attention, fused_attention
from bltjax.model.config import NAMED_REMAT_POLICIES, RuntimeConfig, TransformerConfig
from bltjax.model.layers import Dense, RMSNorm, SwiGLU, apply_rope, constrain

ACT = ("batch", "length", "act_embed")  # logical axes of [B, N, D] activations.


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

  def qkv(self, x_BxNxD, positions_BxN):
    """(q [B, N, H, E], k [B, N, K, E], v [B, N, K, E]), RoPE applied to q and k."""
    c = self.cfg
    b, n, _ = x_BxNxD.shape
    q = self.wq(x_BxNxD).reshape(b, n, c.n_heads, c.head_dim)
    k = self.wk(x_BxNxD).reshape(b, n, c.n_kv_heads, c.head_dim)
    v = self.wv(x_BxNxD).reshape(b, n, c.n_kv_heads, c.head_dim)
    q = checkpoint_name(apply_rope(q, positions_BxN, c.rope_theta), "query_proj")
    k = checkpoint_name(apply_rope(k, positions_BxN, c.rope_theta), "key_proj")
    return q, k, checkpoint_name(v, "value_proj")

  def out(self, o_BxNxHxE):
    b, n, h, e = o_BxNxHxE.shape
    o_BxNxHxE = constrain(o_BxNxHxE, ("batch", "length", "act_heads", None))
    return checkpoint_name(self.wo(o_BxNxHxE.reshape(b, n, h * e)), "out_proj")

  def __call__(self, x_BxNxD, positions_BxN, segment_ids_BxN, cache=None, slot_B=None,
               write_B=None):
    q, k, v = self.qkv(x_BxNxD, positions_BxN)
    if cache is None:  # positions are row positions 0..N-1 here
      o = fused_attention.self_attention(q, k, v, segment_ids_BxN, window=self.cfg.attn_window,
                                         rt=self.rt)
      return self.out(checkpoint_name(o, "context")), None
    # Decoding one position per row (N = 1) against a KV cache.
    pos, seg = positions_BxN[:, 0], segment_ids_BxN[:, 0]
    cache = attention.write_kv_cache(cache, k[:, 0], v[:, 0], pos, seg, slot_B, write_B)
    o = attention.cached_attention(q[:, 0], cache, pos, seg, window=self.cfg.attn_window)
    return self.out(o[:, None]), cache


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

  def __call__(self, x_BxNxD, positions_BxN, segment_ids_BxN, cache=None, slot_B=None,
               write_B=None):
    """(y, (new KV cache or None, y if `collect` else None)): the scan stacks the second part."""
    x = constrain(x_BxNxD, ACT)
    a, cache = self.attention(self.attention_norm(x), positions_BxN, segment_ids_BxN, cache,
                              slot_B, write_B)
    h = x + a
    y = constrain(h + self.feed_forward(self.ffn_norm(h)), ACT)
    return y, (cache, y if self.collect else None)


def scan_stack(block_cls, *, length: int, rt: RuntimeConfig, in_axes):
  """`nn.scan` over `length` copies of `block_cls` with the configured remat policy.

  The block's __call__ must be (carry, *xs) -> (carry, y). `in_axes` says per non-carry argument
  whether it is broadcast (`nn.broadcast`) or scanned over (0).
  """
  if rt.remat_policy != "none":
    block_cls = nn.remat(block_cls, policy=remat_policy(rt.remat_policy), prevent_cse=False)
  return nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=length, unroll=min(rt.scan_unroll, length),
                 metadata_params={nn.PARTITION_NAME: "layers"})


def remat_policy(name: str):
  """The `jax.checkpoint` policy called `name`: 'full' (save nothing), one of NAMED_REMAT_POLICIES
  (save the tagged values it lists) or a `jax.checkpoint_policies` name."""
  if name == "full":
    return None
  if name in NAMED_REMAT_POLICIES:
    return jax.checkpoint_policies.save_only_these_names(*NAMED_REMAT_POLICIES[name])
  return getattr(jax.checkpoint_policies, name)


# Block arguments after the carry: positions, segment ids (broadcast), per-layer KV cache (scanned
# over layers; None when training), cache slot and write mask (broadcast).
BLOCK_IN_AXES = (nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast)


class Stack(nn.Module):
  """`cfg.n_layers` scanned Blocks. Returns (y, (new KV caches [L, ...] when decoding with a
  `cache` else None, every layer's output [L, B, N, D] with `collect` else None))."""
  cfg: TransformerConfig
  rt: RuntimeConfig
  collect: bool = False

  def setup(self):
    self.layers = scan_stack(Block, length=self.cfg.n_layers, rt=self.rt,
                             in_axes=BLOCK_IN_AXES)(self.cfg, self.rt, self.collect)

  def __call__(self, x_BxNxD, positions_BxN, segment_ids_BxN, cache=None, slot_B=None,
               write_B=None):
    return self.layers(x_BxNxD, positions_BxN, segment_ids_BxN, cache, slot_B, write_B)


def empty_stack_cache(cfg: TransformerConfig, rt: RuntimeConfig, batch: int, size: int):
  """KV caches of C = `size` slots for every layer of a Stack: [L, B, C, ...]."""
  return attention.empty_kv_cache(batch, size, cfg.n_kv_heads, cfg.head_dim, jnp.dtype(rt.dtype),
                                  layers=cfg.n_layers)


def ring_slot(pos_B, cache):
  """The slot a ring KV cache of C slots (the attention window) gives position `pos`: pos % C."""
  return pos_B % cache["pos"].shape[-1]


class CrossAttention(nn.Module):
  """The reference's cross-attention: RMSNorm on queries, one RMSNorm shared by keys and values,
  no RoPE, and the double residual of `attend`. Subclasses choose the attention kernel."""
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

  def attend(self, x, context, patch_ids_BxN, kernel):
    """`x` attends to `context` through `kernel(q, k, v, patch_ids_BxN)` (an `attention` function
    over split heads); returns 2*x + Wo·attn. Reference quirk kept for released weights: its
    cross-attention returns x + out and the caller adds x again."""
    q = self.heads(self.wq(self.cross_attn_norm_q(x)))
    kv = self.cross_attn_norm_kv(context)
    o = kernel(q, self.heads(self.wk(kv)), self.heads(self.wv(kv)), patch_ids_BxN)
    return x + (x + self.wo(o.reshape(*o.shape[:-2], self.dim)))


class PatchCrossAttention(CrossAttention):
  """Encoder side: patch sub-queries [B, P, k, D] pool the bytes [B, N, D] of their own patch."""

  def __call__(self, pe_BxPxkxD, h_BxNxD, patch_ids_BxN):
    """(new pe, None): the carry and output of the scan over cross-attention layers."""
    return self.attend(pe_BxPxkxD, h_BxNxD, patch_ids_BxN,
                       attention.patch_pooling_attention), None


class ByteCrossAttention(CrossAttention):
  """Decoder side: bytes [B, N, D] read the k sub-vectors [B, P, k, D] of patch `patch_ids[t]`."""

  def __call__(self, h_BxNxD, pe_BxPxkxD, patch_ids_BxN):
    return self.attend(h_BxNxD, pe_BxPxkxD, patch_ids_BxN, attention.byte_to_patch_attention)
