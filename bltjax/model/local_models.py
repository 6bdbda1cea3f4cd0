"""Local encoder (bytes -> patch representations) and local decoder (patches -> next-byte logits).

Both work on whole rows (training) and, for generation, one byte at a time with KV caches.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.model.config import BLTConfig
from bltjax.model.layers import Dense, RMSNorm, constrain
from bltjax.model.transformer import (ACT, BLOCK_IN_AXES, Block, ByteCrossAttention,
                                      PatchCrossAttention, Stack, dtypes, ring_slot, scan_stack)


def max_pool_patches(h_BxNxD, patch_ids_BxN, num_patches):
  """Per-patch max over its bytes' states; empty patches are exactly 0 (the reference scatters
  `amax` into zeros with include_self=False). Ids outside [0, num_patches) are ignored; ids never
  decrease along a row (patching.patch_ids_from_lengths)."""
  pooled = jax.vmap(lambda h, ids: jax.ops.segment_max(h, ids, num_segments=num_patches,
                                                       indices_are_sorted=True))(
      h_BxNxD, patch_ids_BxN)
  return jnp.where(jnp.isfinite(pooled), pooled, 0).astype(h_BxNxD.dtype)


class LocalEncoder(nn.Module):
  """Byte transformer (windowed, document-masked) followed by cross-attention pooling into patches.

  Follows the reference: patch queries are max-pooled from the hidden states after the first layer
  that has a cross-attention (after layer 0 with `cross_attn_all_layers_encoder`, else after the
  last layer), once; then every cross-attention layer refines them. (The HF port re-pools at every
  layer; the two agree for one-layer encoders such as the released models.)
  """
  cfg: BLTConfig

  def setup(self):
    c = self.cfg
    d, k = c.encoder.dim, c.cross_attn_k
    self.all_layers = c.cross_attn_all_layers_encoder
    self.stack = Stack(c.encoder, c.runtime, collect=self.all_layers)
    self.patch_embedding_projection = Dense(k * d, d**-0.5, ("embed", "mlp"), **dtypes(c.runtime))
    self.cross_attn = scan_stack(
        PatchCrossAttention, length=c.encoder.n_layers if self.all_layers else 1, rt=c.runtime,
        in_axes=(0, nn.broadcast))(d, c.cross_attn_nheads, c.encoder.norm_eps, c.runtime)

  def pool(self, kv_LxBxNxD, patch_ids_BxN, num_patches):
    """Patch representations [B, P, k, D] from the byte states of the cross-attention layers
    (L = the encoder's layers with `cross_attn_all_layers_encoder`, else 1: the last)."""
    b, d = kv_LxBxNxD.shape[1], kv_LxBxNxD.shape[-1]
    pooled = max_pool_patches(kv_LxBxNxD[0], patch_ids_BxN, num_patches)
    pe = self.patch_embedding_projection(pooled).reshape(b, num_patches, self.cfg.cross_attn_k, d)
    # The self-attention path never reads the patch states, so the cross-attention layers can run
    # after the whole stack, each on the byte states of its own layer.
    pe, _ = self.cross_attn(pe, kv_LxBxNxD, patch_ids_BxN)
    return pe

  def __call__(self, x_BxNxD, positions_BxN, segment_ids_BxN, patch_ids_BxN, num_patches):
    h, (_, h_LxBxNxD) = self.stack(x_BxNxD, positions_BxN, segment_ids_BxN)
    kv = h_LxBxNxD if self.all_layers else h[None]
    return h, self.pool(kv, patch_ids_BxN, num_patches)

  def step(self, x_Bx1xD, pos_B, seg_B, cache):
    """One byte per row: (h [B, 1, D], its states for pooling [L, B, 1, D], new cache)."""
    slot = ring_slot(pos_B, cache)
    write = jnp.ones_like(pos_B, bool)
    h, (cache, h_LxBx1xD) = self.stack(x_Bx1xD, pos_B[:, None], seg_B[:, None], cache, slot,
                                       write)
    return h, (h_LxBx1xD if self.all_layers else h[None]), cache


class DecoderLayer(nn.Module):
  """Cross-attention to the previous patch's latent state, then a transformer block."""
  cfg: BLTConfig

  @nn.compact
  def __call__(self, h_BxNxD, pe_BxPxkxD, patch_ids_BxN, positions_BxN, segment_ids_BxN,
               cache=None, slot_B=None, write_B=None):
    c = self.cfg
    h = ByteCrossAttention(c.decoder.dim, c.cross_attn_nheads, c.decoder.norm_eps, c.runtime,
                           name="cross_attn")(h_BxNxD, pe_BxPxkxD, patch_ids_BxN)
    return Block(c.decoder, c.runtime, name="block")(h, positions_BxN, segment_ids_BxN, cache,
                                                     slot_B, write_B)


class LocalDecoder(nn.Module):
  """Byte transformer whose bytes cross-attend to latent patch states, then RMSNorm -> 260 logits.

  Byte t reads patch `decoder_patch_ids[t] = patch_id(t+1) - 1`: the last patch the latent model
  has fully seen before byte t+1, so no byte sees its own future.
  """
  cfg: BLTConfig

  def setup(self):
    c = self.cfg
    dec, k = c.decoder, c.cross_attn_k
    kw = dtypes(c.runtime)
    self.patch_embedding_projection = Dense(k * dec.dim, c.latent.dim**-0.5, ("embed", "mlp"),
                                            **kw)
    if c.cross_attn_all_layers_decoder:
      self.layers = scan_stack(DecoderLayer, length=dec.n_layers, rt=c.runtime,
                               in_axes=(nn.broadcast, nn.broadcast) + BLOCK_IN_AXES)(c)
    else:  # Cross-attention before the first layer only.
      self.cross_attn = ByteCrossAttention(dec.dim, c.cross_attn_nheads, dec.norm_eps, c.runtime)
      self.stack = Stack(dec, c.runtime)
    self.norm = RMSNorm(dec.norm_eps, **kw)
    # fp32 logits from bf16 activations: the loss and softmax must not run in bf16.
    self.output = Dense(c.vocab_size, dec.dim**-0.5, ("embed", "vocab"), out_dtype=jnp.float32,
                        **kw)

  def patch_states(self, latent_BxPxD):
    """Latent outputs (D the latent's width) -> the k sub-vectors per patch that bytes attend to:
    [B, P, k, D] (D the decoder's width)."""
    b, p, _ = latent_BxPxD.shape
    dim = self.cfg.decoder.dim
    return self.patch_embedding_projection(latent_BxPxD).reshape(b, p, self.cfg.cross_attn_k, dim)

  def bytes_to_logits(self, h_BxNxD, pe_BxPxkxD, dec_patch_ids_BxN, positions_BxN,
                      segment_ids_BxN, cache=None, slot_B=None, write_B=None):
    if self.cfg.cross_attn_all_layers_decoder:
      h, (cache, _) = self.layers(h_BxNxD, pe_BxPxkxD, dec_patch_ids_BxN, positions_BxN,
                                  segment_ids_BxN, cache, slot_B, write_B)
    else:
      h = self.cross_attn(h_BxNxD, pe_BxPxkxD, dec_patch_ids_BxN)
      h, (cache, _) = self.stack(h, positions_BxN, segment_ids_BxN, cache, slot_B, write_B)
    return self.output(constrain(self.norm(h), ACT)), cache

  def __call__(self, h_BxNxD, latent_BxPxD, dec_patch_ids_BxN, positions_BxN, segment_ids_BxN):
    logits, _ = self.bytes_to_logits(h_BxNxD, self.patch_states(latent_BxPxD), dec_patch_ids_BxN,
                                     positions_BxN, segment_ids_BxN)
    return logits

  def step(self, h_Bx1xD, pe_Bx1xkxD, pos_B, seg_B, cache):
    """One byte per row reading one patch (its k sub-vectors): (logits [B, V], new cache)."""
    slot = ring_slot(pos_B, cache)
    zeros = jnp.zeros(pos_B.shape + (1,), jnp.int32)
    logits, cache = self.bytes_to_logits(h_Bx1xD, pe_Bx1xkxD, zeros, pos_B[:, None],
                                         seg_B[:, None], cache, slot, jnp.ones_like(pos_B, bool))
    return logits[:, 0], cache
