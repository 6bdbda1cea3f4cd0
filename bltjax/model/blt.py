"""The Byte Latent Transformer: embeddings -> local encoder -> latent transformer -> local decoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax import patching, tokenizer
from bltjax.model import hashing
from bltjax.model.config import BLTConfig
from bltjax.model.entropy_model import document_ids
from bltjax.model.latent import LatentTransformer
from bltjax.model.layers import Embed, constrain
from bltjax.model.local_models import LocalDecoder, LocalEncoder
from bltjax.model.transformer import ACT


def patch_document_ids(tokens_BxN, patch_ids_BxN, num_patches):
  """Document index per patch: the number of EOS-containing patches before it (block-causal)."""
  has_eos = jax.vmap(lambda t, ids: jax.ops.segment_max(
      (t == tokenizer.EOS_ID).astype(jnp.int32), ids, num_segments=num_patches))(
          tokens_BxN, patch_ids_BxN)
  has_eos = jnp.maximum(has_eos, 0)  # empty patches: segment_max gives the dtype's minimum.
  return jnp.cumsum(has_eos, axis=1) - has_eos


class ByteEmbedding(nn.Module):
  """Byte embedding + the sum of all hash n-gram embeddings (no normalisation, as the reference)."""
  cfg: BLTConfig

  @nn.compact
  def __call__(self, tokens_BxN, hash_ids_BxNxT=None):
    c = self.cfg
    d = c.encoder.dim
    pdt = jnp.dtype(c.runtime.param_dtype)
    x = Embed(c.vocab_size, d, d**-0.5, ("vocab", "embed"), param_dtype=pdt,
              name="tok_embeddings")(tokens_BxN).astype(jnp.float32)
    if c.num_hash_tables:
      if hash_ids_BxNxT is None:
        hash_ids_BxNxT = hashing.hash_ids(tokens_BxN, group_sizes=c.hash_group_sizes,
                                          num_functions=c.hash_functions, vocab=c.hash_vocab)
      # One fused table, function-major (table i = f * len(group_sizes) + group), as in the HF port.
      offsets = jnp.arange(c.num_hash_tables, dtype=jnp.int32) * c.hash_vocab
      table = Embed(c.num_hash_tables * c.hash_vocab, d, d**-0.5, ("hash_vocab", "embed"),
                    param_dtype=pdt, name="hash_embeddings")
      x = x + jnp.sum(table(hash_ids_BxNxT + offsets).astype(jnp.float32), axis=2)
    return constrain(x.astype(jnp.dtype(c.runtime.dtype)), ACT)


class ByteLatentTransformer(nn.Module):
  """logits[b, t] predicts byte t+1 from bytes 0..t.

  Inputs: tokens [B, N] ids in [0, 260); patch_lengths [B, P] with patch_lengths[:, 0] == 1, right
  zero-padded, rows summing to N + 1 (the last patch covers the not-yet-seen next byte);
  optionally hash_ids [B, N, T] (per-table n-gram ids from `hashing.hash_ids_numpy`, when the data
  pipeline computes them on the host). Output: fp32 logits [B, N, 260].
  """
  cfg: BLTConfig

  @nn.compact
  def __call__(self, tokens_BxN, patch_lengths_BxP, hash_ids_BxNxT=None):
    c = self.cfg
    b, n = tokens_BxN.shape
    p = patch_lengths_BxP.shape[1]
    patch_ids = patching.patch_ids_from_lengths(patch_lengths_BxP, n)
    dec_patch_ids = patching.decoder_patch_ids_from_lengths(patch_lengths_BxP, n)
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))  # not reset per document
    docs = document_ids(tokens_BxN)

    x = ByteEmbedding(c, name="embed")(tokens_BxN, hash_ids_BxNxT)
    h_enc, pe_BxPxkxD = LocalEncoder(c, name="local_encoder")(x, positions, docs, patch_ids, p)
    latent_in = pe_BxPxkxD.reshape(b, p, c.cross_attn_k * c.encoder.dim)
    latent = LatentTransformer(c, name="latent")(
        latent_in, patch_document_ids(tokens_BxN, patch_ids, p))
    return LocalDecoder(c, name="local_decoder")(h_enc, latent, dec_patch_ids, positions, docs)
