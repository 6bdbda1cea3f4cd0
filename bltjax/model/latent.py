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

  def setup(self):
    c = self.cfg
    e = c.latent_input_dim
    if e != c.latent.dim:
      self.token_embedding_projection = Dense(c.latent.dim, e**-0.5, ("mlp", "embed"),
                                              **dtypes(c.runtime))
    self.stack = Stack(c.latent, c.runtime)

  def _project(self, x_BxPxE):
    if self.cfg.latent_input_dim != self.cfg.latent.dim:
      x_BxPxE = self.token_embedding_projection(x_BxPxE)
    return x_BxPxE.astype(jnp.dtype(self.cfg.runtime.dtype))

  def __call__(self, x_BxPxE, segment_ids_BxP):
    b, p, _ = x_BxPxE.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))  # patch index in row
    h, _ = self.stack(self._project(x_BxPxE), positions, segment_ids_BxP)
    return h

  def step(self, x_Bx1xE, patch_index_B, doc_B, write_B, cache):
    """One new patch per row (rows with write False leave the cache unchanged)."""
    h, (cache, _) = self.stack(self._project(x_Bx1xE), patch_index_B[:, None], doc_B[:, None],
                               cache, patch_index_B, write_B)
    return h, cache
