"""The entropy model: a small byte-level LM whose next-byte entropy decides patch boundaries."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax.model import tokenizer
from bltjax.model.config import LMConfig
from bltjax.model.layers import Dense, Embed, RMSNorm, row_positions
from bltjax.model.transformer import Stack, dtypes, ring_slot


def document_ids(tokens_BxN):
  """Per-position document index: the number of EOS *before* t (EOS ends its own document)."""
  is_eos = (tokens_BxN == tokenizer.EOS_ID).astype(jnp.int32)
  return jnp.cumsum(is_eos, axis=1) - is_eos


class TransformerLM(nn.Module):
  """Embedding -> sliding-window causal stack (documents split at EOS) -> RMSNorm -> 260 logits.

  Unlike the reference, which flattens the batch into 8192-long chunks (rows leak into each other,
  facebookresearch/blt#123), every row is computed on its own, with the window as the only context
  limit.
  """
  cfg: LMConfig

  def setup(self):
    c, t = self.cfg, self.cfg.transformer
    kw = dtypes(c.runtime)
    self.tok_embeddings = Embed(c.vocab_size, t.dim, t.dim**-0.5, ("vocab", "embed"),
                                param_dtype=kw["param_dtype"])
    self.stack = Stack(t, c.runtime)
    self.norm = RMSNorm(t.norm_eps, **kw)
    self.output = Dense(c.vocab_size, t.dim**-0.5, ("embed", "vocab"), out_dtype=jnp.float32,
                        **kw)

  def _embed(self, tokens):
    return self.tok_embeddings(tokens).astype(jnp.dtype(self.cfg.runtime.dtype))

  def __call__(self, tokens_BxN):
    positions_BxN = row_positions(*tokens_BxN.shape)
    h, _ = self.stack(self._embed(tokens_BxN), positions_BxN, document_ids(tokens_BxN))
    return self.output(self.norm(h))

  def step(self, token_B, pos_B, doc_B, cache):
    """One byte per row against a ring KV cache: (logits [B, V] for the next byte, cache)."""
    slot = ring_slot(pos_B, cache)
    h, (cache, _) = self.stack(self._embed(token_B[:, None]), pos_B[:, None], doc_B[:, None],
                               cache, slot, jnp.ones_like(pos_B, bool))
    return self.output(self.norm(h))[:, 0], cache


def entropies_from_logits(logits_BxNxV):
  """Shannon entropy of the next-byte distribution in nats (fp32), [B, N]."""
  logp = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
