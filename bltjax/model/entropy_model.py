"""The entropy model: a small byte-level LM whose next-byte entropy decides patch boundaries."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bltjax import tokenizer
from bltjax.model.config import EntropyModelConfig
from bltjax.model.layers import Dense, Embed, RMSNorm
from bltjax.model.transformer import Stack, dtypes


def document_ids(tokens_BxN):
  """Per-position document index: the number of EOS *before* t (EOS ends its own document)."""
  is_eos = (tokens_BxN == tokenizer.EOS_ID).astype(jnp.int32)
  return jnp.cumsum(is_eos, axis=1) - is_eos


class EntropyModel(nn.Module):
  """Embedding -> sliding-window causal stack (documents split at EOS) -> RMSNorm -> 260 logits.

  Unlike the reference, which flattens the batch into 8192-long chunks (rows leak into each other,
  facebookresearch/blt#123), every row is computed on its own, with the window as the only context
  limit.
  """
  cfg: EntropyModelConfig

  @nn.compact
  def __call__(self, tokens_BxN):
    c, t = self.cfg, self.cfg.transformer
    kw = dtypes(c.runtime)
    b, n = tokens_BxN.shape
    x = Embed(c.vocab_size, t.dim, t.dim**-0.5, ("vocab", "embed"),
              param_dtype=kw["param_dtype"], name="tok_embeddings")(tokens_BxN)
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    h, _ = Stack(t, c.runtime, name="stack")(x.astype(kw["dtype"]), positions,
                                             document_ids(tokens_BxN))
    h = RMSNorm(t.norm_eps, **kw, name="norm")(h)
    return Dense(c.vocab_size, t.dim**-0.5, ("embed", "vocab"), out_dtype=jnp.float32,
                 name="output", **kw)(h)


def entropies_from_logits(logits_BxNxV):
  """Shannon entropy of the next-byte distribution in nats (fp32), [B, N]."""
  logp = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
