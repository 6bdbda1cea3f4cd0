"""Small random `transformers` BLT models written with `save_pretrained`, the peer for parity tests."""

import numpy as np


def make_hf_blt(directory, *, seed=0, dim=32, heads=2, global_dim=48, global_heads=3, k=2,
                enc_layers=1, enc_all_layers=False, dec_layers=2, dec_all_layers=True,
                hash_sizes=(3, 4), hash_vocab=101, hash_functions=2, window=512,
                patcher_window=512, patcher_layers=2, threshold=None, calib_tokens=None,
                max_patch_length=None):
  """Builds a random BltForCausalLM, saves it to `directory` and returns the torch model.

  Every weight (norm scales included) is drawn at random so that no parameter is a no-op. If
  `threshold` is None it is set to the median entropy the patcher assigns to `calib_tokens`, so
  that entropy patching cuts a mix of short and long patches.
  """
  import torch
  from transformers import BltConfig, BltForCausalLM

  torch.manual_seed(seed)
  local = dict(hidden_size=dim, num_attention_heads=heads, intermediate_size=2 * dim,
               hidden_size_global=global_dim, cross_attn_k=k)
  cfg = BltConfig(
      vocab_size=260, cross_attn_k=k, encoder_hash_byte_group_size=list(hash_sizes),
      encoder_hash_byte_group_vocab=hash_vocab, encoder_hash_byte_group_nb_functions=hash_functions,
      patch_size=4, patching_threshold=0.0, local_attention_window_len=window,
      max_patch_length=max_patch_length,
      patcher_config=dict(hidden_size=32, num_hidden_layers=patcher_layers, num_attention_heads=2,
                          intermediate_size=64, sliding_window=patcher_window),
      encoder_config=dict(local, num_hidden_layers=enc_layers, cross_attn_all_layers=enc_all_layers),
      decoder_config=dict(local, num_hidden_layers=dec_layers, cross_attn_all_layers=dec_all_layers),
      global_config=dict(hidden_size=global_dim, num_hidden_layers=2,
                         num_attention_heads=global_heads, intermediate_size=2 * global_dim))
  model = randomize(BltForCausalLM(cfg).eval())
  with torch.no_grad():
    if threshold is None:
      ent, _, _ = model.model.patcher(torch.tensor(np.asarray(calib_tokens)))
      threshold = float(np.median(ent.numpy()[:, 1:]))
  model.config.patching_threshold = threshold
  model.save_pretrained(directory)
  return model


def randomize(model):
  """Draws every weight at random (norm scales near 1), so that no parameter is a no-op."""
  import torch
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
  return model


def random_tokens(rng, batch, length):
  """BOS followed by random bytes (no EOS inside: the port has no document masking)."""
  body = rng.integers(4, 260, size=(batch, length - 1))
  return np.concatenate([np.ones((batch, 1), np.int64), body], axis=1)
