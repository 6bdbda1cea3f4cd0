"""Latent (global) transformer: runs once per patch, block-causal over patches."""

import flax.linen as nn
import jax.numpy as jnp

from bltjax.model.config import BLTConfig
from bltjax.model.layers import Dense
from bltjax.model.transformer import Stack, dtypes


class LatentTransformer(nn.Module):
  """Optional input projection (k·D_E -> D_G, only when the widths differ), then the layers.

  No final norm: the local decoder normalises (reference). Attention is causal over patches and
  split into documents after every patch that contains an EOS byte (the reference's block_causal).
  """
  cfg: BLTConfig

  @nn.compact
  def __call__(self, x_BxPxE, segment_ids_BxP):
    c = self.cfg
    b, p, e = x_BxPxE.shape
    x = x_BxPxE
    if e != c.latent.dim:
      x = Dense(c.latent.dim, e**-0.5, ("mlp", "embed"), name="token_embedding_projection",
                **dtypes(c.runtime))(x)
    x = x.astype(jnp.dtype(c.runtime.dtype))
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))  # patch index in row
    h, _ = Stack(c.latent, c.runtime, name="stack")(x, positions, segment_ids_BxP)
    return h
