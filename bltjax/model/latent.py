"""Latent (global) transformer: runs once per patch, block-causal over patches."""

import flax.linen as nn
import jax.numpy as jnp

from bltjax.model.config import BLTConfig
from bltjax.model.layers import Dense, row_positions
from bltjax.model.transformer import Stack, dtypes


class LatentTransformer(nn.Module):
  """Optional input projection (I = k·D of the encoder -> D of the latent, only when the widths
  differ), then the layers, over the P patches of each row.

  No final norm: the local decoder normalises (reference). Attention is causal over patches and
  split into documents after every patch that contains an EOS byte (the reference's block_causal).
  """
  cfg: BLTConfig

  def setup(self):
    c = self.cfg
    in_dim = c.latent_input_dim
    if in_dim != c.latent.dim:
      self.token_embedding_projection = Dense(c.latent.dim, in_dim**-0.5, ("mlp", "embed"),
                                              **dtypes(c.runtime))
    self.stack = Stack(c.latent, c.runtime)

  def _project(self, x_BxPxI):
    """[B, P, I] -> [B, P, D] in the compute dtype."""
    if self.cfg.latent_input_dim != self.cfg.latent.dim:
      x_BxPxI = self.token_embedding_projection(x_BxPxI)
    return x_BxPxI.astype(jnp.dtype(self.cfg.runtime.dtype))

  def __call__(self, x_BxPxI, segment_ids_BxP):
    b, p, _ = x_BxPxI.shape
    positions_BxP = row_positions(b, p)  # patch index in the row
    h, _ = self.stack(self._project(x_BxPxI), positions_BxP, segment_ids_BxP)
    return h

  def step(self, x_Bx1xI, patch_index_B, doc_B, write_B, cache):
    """One new patch per row (rows with write False leave the cache unchanged); the latent cache
    has a slot per patch, so patch p writes slot p."""
    h, (cache, _) = self.stack(self._project(x_Bx1xI), patch_index_B[:, None], doc_B[:, None],
                               cache, patch_index_B, write_B)
    return h, cache
