"""Tiny model configs for unit tests (the experiments/ configs are exercised end to end elsewhere)."""

from bltjax.model.config import BLTConfig, LMConfig, RuntimeConfig, TransformerConfig


def transformer(dim=32, layers=2, heads=2, kv_heads=None, window=None, theta=500000.0):
  return TransformerConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads or heads,
                           ffn_dim=2 * dim, rope_theta=theta, norm_eps=1e-5, attn_window=window)


def runtime(dtype="float32", remat="none"):
  return RuntimeConfig(dtype=dtype, param_dtype="float32", remat_policy=remat, attention="xla",
                       attn_block=128, attn_chunk=None, attn_loop=False, scan_unroll=1)


def blt_config(*, window=8, k=2, enc_layers=1, all_enc=False, dec_layers=2, all_dec=True,
               dtype="float32", remat="none", latent_dim=48, latent_heads=3):
  return BLTConfig(
      encoder=transformer(layers=enc_layers, window=window),
      latent=transformer(dim=latent_dim, heads=latent_heads),
      decoder=transformer(layers=dec_layers, window=window),
      cross_attn_k=k, cross_attn_nheads=2, cross_attn_all_layers_encoder=all_enc,
      cross_attn_all_layers_decoder=all_dec, hash_group_sizes=(3, 4), hash_vocab=97,
      hash_functions=2, runtime=runtime(dtype, remat))


def entropy_config(*, window=8, layers=2, dtype="float32"):
  return LMConfig(transformer=transformer(layers=layers, window=window, theta=10000.0),
                            runtime=runtime(dtype))
