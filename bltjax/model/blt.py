"""The Byte Latent Transformer: embeddings -> local encoder -> latent transformer -> local
decoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.model import hashing, patching, tokenizer
from bltjax.model.config import BLTConfig
from bltjax.model.latent import LatentTransformer
from bltjax.model.layers import Embed, constrain, row_positions
from bltjax.model.lm import document_ids
from bltjax.model.local_models import LocalDecoder, LocalEncoder
from bltjax.model.transformer import ACT


def patch_document_ids(tokens_BxN, patch_ids_BxN, num_patches):
  """Document index per patch: the number of EOS-containing patches before it (block-causal)."""
  has_eos = jax.vmap(lambda t, ids: jax.ops.segment_max(
      (t == tokenizer.EOS_ID).astype(jnp.int32), ids, num_segments=num_patches,
      indices_are_sorted=True))(
          tokens_BxN, patch_ids_BxN)
  has_eos = jnp.maximum(has_eos, 0)  # empty patches: segment_max gives the dtype's minimum.
  return jnp.cumsum(has_eos, axis=1) - has_eos


def hash_lookup(table_VxD, ids_BxNxT, vocab: int):
  """Sum over the T tables of the fused table's rows: f32 [B, N, D].

  One [B, N] lookup per table, summed as they come: a single [B, N, T] lookup makes a
  [.., T]-minor intermediate that a TPU pads from T to 128 lanes (10 GiB per chip for 8B).
  """
  hashed = None
  for t in range(ids_BxNxT.shape[-1]):
    e = jnp.take(table_VxD, ids_BxNxT[:, :, t] + t * vocab, axis=0).astype(jnp.float32)
    hashed = e if hashed is None else hashed + e
  return hashed


class ByteEmbedding(nn.Module):
  """Byte embedding + the sum of all hash n-gram embeddings (no normalisation, as the reference)."""
  cfg: BLTConfig

  def setup(self):
    c = self.cfg
    d = c.encoder.dim
    pdt = jnp.dtype(c.runtime.param_dtype)
    self.tok_embeddings = Embed(c.vocab_size, d, d**-0.5, ("vocab", "embed"), param_dtype=pdt)
    if c.num_hash_tables:
      # One fused table, function-major (table i = f * len(group_sizes) + group), as the HF port.
      self.hash_embeddings = Embed(c.num_hash_tables * c.hash_vocab, d, d**-0.5,
                                   ("hash_vocab", "embed"), param_dtype=pdt)

  def __call__(self, tokens_BxN, hash_ids_BxNxT=None):
    c = self.cfg
    x = self.tok_embeddings(tokens_BxN).astype(jnp.float32)
    if c.num_hash_tables:
      if hash_ids_BxNxT is None:
        hash_ids_BxNxT = hashing.hash_ids(tokens_BxN, group_sizes=c.hash_group_sizes,
                                          num_functions=c.hash_functions, vocab=c.hash_vocab)
      x = x + hash_lookup(self.hash_embeddings.embedding, hash_ids_BxNxT, c.hash_vocab)
    return constrain(x.astype(jnp.dtype(c.runtime.dtype)), ACT)


class ByteLatentTransformer(nn.Module):
  """logits[b, t] predicts byte t+1 from bytes 0..t.

  Inputs: tokens [B, N] ids in [0, 260); patch_lengths [B, P] with patch_lengths[:, 0] == 1, right
  zero-padded, rows summing to N + 1 (the last patch covers the not-yet-seen next byte);
  optionally hash_ids [B, N, T] (per-table n-gram ids from `hashing.hash_ids_numpy`, when the data
  pipeline computes them on the host). Output: fp32 logits [B, N, 260].

  The other methods are the pieces of cached generation (bltjax.inference.generator).
  """
  cfg: BLTConfig

  def setup(self):
    self.embed = ByteEmbedding(self.cfg)
    self.local_encoder = LocalEncoder(self.cfg)
    self.latent = LatentTransformer(self.cfg)
    self.local_decoder = LocalDecoder(self.cfg)

  def __call__(self, tokens_BxN, patch_lengths_BxP, hash_ids_BxNxT=None):
    c = self.cfg
    b, n = tokens_BxN.shape
    p = patch_lengths_BxP.shape[1]
    patch_ids = patching.patch_ids_from_lengths(patch_lengths_BxP, n)
    dec_patch_ids = patching.decoder_patch_ids_from_lengths(patch_lengths_BxP, n)
    positions = row_positions(b, n)
    docs = document_ids(tokens_BxN)

    x = self.embed(tokens_BxN, hash_ids_BxNxT)
    h_enc, pe_BxPxkxD = self.local_encoder(x, positions, docs, patch_ids, p)
    latent_in_BxPxI = pe_BxPxkxD.reshape(b, p, c.cross_attn_k * c.encoder.dim)
    latent = self.latent(latent_in_BxPxI, patch_document_ids(tokens_BxN, patch_ids, p))
    return self.local_decoder(h_enc, latent, dec_patch_ids, positions, docs)

  # -- generation, one byte per row at a time ------------------------------------------------------

  def encode_byte(self, ngram_context_BxR, pos_B, doc_B, cache):
    """Byte `ngram_context[:, -1]` at row position `pos` (the context holds the last R bytes,
    zero-padded on the left, enough for the longest n-gram): (h [B, 1, D], states for pooling
    [L, B, 1, D], cache)."""
    x = self.embed(ngram_context_BxR)[:, -1:]
    return self.local_encoder.step(x, pos_B, doc_B, cache)

  def encode_patch(self, states_LxBxNxD, in_patch_BxN):
    """Latent input [B, 1, I] (I = k·D) of the patch made of the bytes where `in_patch` is True."""
    ids = jnp.where(in_patch_BxN, 0, 1)  # id 1 is outside the single segment: ignored
    pe = self.local_encoder.pool(states_LxBxNxD, ids, 1)
    return pe.reshape(pe.shape[0], 1, -1)

  def latent_step(self, x_Bx1xI, patch_index_B, doc_B, write_B, cache):
    """Latent output for each row's new patch, projected for the decoder: [B, 1, k, D]."""
    h, cache = self.latent.step(x_Bx1xI, patch_index_B, doc_B, write_B, cache)
    return self.local_decoder.patch_states(h), cache

  def decode_byte(self, h_Bx1xD, pe_Bx1xkxD, pos_B, doc_B, cache):
    return self.local_decoder.step(h_Bx1xD, pe_Bx1xkxD, pos_B, doc_B, cache)
