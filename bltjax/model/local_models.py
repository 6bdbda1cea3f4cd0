"""Local encoder (bytes -> patch representations) and local decoder (patches -> next-byte logits)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.model.config import BLTConfig
from bltjax.model.layers import Dense, RMSNorm, constrain
from bltjax.model.transformer import (ACT, Block, ByteCrossAttention, PatchCrossAttention, Stack,
                                      dtypes, scan_stack)


def max_pool_patches(h_BxNxD, patch_ids_BxN, num_patches):
  """Per-patch max over its bytes' states; empty patches are exactly 0 (the reference scatters
  `amax` into zeros with include_self=False)."""
  pooled = jax.vmap(lambda h, ids: jax.ops.segment_max(h, ids, num_segments=num_patches))(
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

  @nn.compact
  def __call__(self, x_BxNxD, positions_BxN, segment_ids_BxN, patch_ids_BxN, num_patches):
    c = self.cfg
    enc, k = c.encoder, c.cross_attn_k
    b, n, d = x_BxNxD.shape
    all_layers = c.cross_attn_all_layers_encoder
    h, h_LxBxNxD = Stack(enc, c.runtime, collect=all_layers, name="stack")(
        x_BxNxD, positions_BxN, segment_ids_BxN)
    # The self-attention path never reads the patch states, so the cross-attention layers can run
    # after the whole stack, each on the byte states of its own layer.
    kv_LxBxNxD = h_LxBxNxD if all_layers else h[None]
    pooled = max_pool_patches(kv_LxBxNxD[0], patch_ids_BxN, num_patches)
    pe = Dense(k * d, d**-0.5, ("embed", "mlp"), name="patch_embedding_projection",
               **dtypes(c.runtime))(pooled).reshape(b, num_patches, k, d)
    cross = scan_stack(PatchCrossAttention, length=kv_LxBxNxD.shape[0], rt=c.runtime,
                       in_axes=(0, nn.broadcast))
    pe, _ = cross(d, c.cross_attn_nheads, enc.norm_eps, c.runtime, name="cross_attn")(
        pe, kv_LxBxNxD, patch_ids_BxN)
    return h, pe


class DecoderLayer(nn.Module):
  """Cross-attention to the previous patch's latent state, then a transformer block."""
  cfg: BLTConfig

  @nn.compact
  def __call__(self, h_BxNxD, pe_BxPxkxD, patch_ids_BxN, positions_BxN, segment_ids_BxN):
    c = self.cfg
    h = ByteCrossAttention(c.decoder.dim, c.cross_attn_nheads, c.decoder.norm_eps, c.runtime,
                           name="cross_attn")(h_BxNxD, pe_BxPxkxD, patch_ids_BxN)
    h, _ = Block(c.decoder, c.runtime, name="block")(h, positions_BxN, segment_ids_BxN)
    return h, None


class LocalDecoder(nn.Module):
  """Byte transformer whose bytes cross-attend to latent patch states, then RMSNorm -> 260 logits.

  Byte t reads patch `decoder_patch_ids[t] = patch_id(t+1) - 1`: the last patch the latent model
  has fully seen before byte t+1, so no byte sees its own future.
  """
  cfg: BLTConfig

  @nn.compact
  def __call__(self, h_BxNxD, latent_BxPxG, dec_patch_ids_BxN, positions_BxN, segment_ids_BxN):
    c = self.cfg
    dec, k = c.decoder, c.cross_attn_k
    b, p, g = latent_BxPxG.shape
    kw = dtypes(c.runtime)
    pe = Dense(k * dec.dim, g**-0.5, ("embed", "mlp"), name="patch_embedding_projection",
               **kw)(latent_BxPxG).reshape(b, p, k, dec.dim)
    if c.cross_attn_all_layers_decoder:
      layers = scan_stack(DecoderLayer, length=dec.n_layers, rt=c.runtime,
                          in_axes=(nn.broadcast,) * 4)
      h, _ = layers(c, name="layers")(h_BxNxD, pe, dec_patch_ids_BxN, positions_BxN,
                                      segment_ids_BxN)
    else:  # Cross-attention before the first layer only.
      h = ByteCrossAttention(dec.dim, c.cross_attn_nheads, dec.norm_eps, c.runtime,
                             name="cross_attn")(h_BxNxD, pe, dec_patch_ids_BxN)
      h, _ = Stack(dec, c.runtime, name="stack")(h, positions_BxN, segment_ids_BxN)
    h = constrain(RMSNorm(dec.norm_eps, **kw, name="norm")(h), ACT)
    # fp32 logits from bf16 activations: the loss and softmax must not run in bf16.
    return Dense(c.vocab_size, dec.dim**-0.5, ("embed", "vocab"), out_dtype=jnp.float32,
                 name="output", **kw)(h)
