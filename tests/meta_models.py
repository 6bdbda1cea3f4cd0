"""Meta-format BLT checkpoints (hub and consolidated) built from small random `transformers` models.

The HF model is the numerical peer; its weights are renamed back to Meta's state-dict names (the
inverse of the transformers converter; the fused hash table split into one tensor per table) and
written the way Meta publishes them. FFN widths follow Meta's llama rule, so that the Meta args
(multiple_of, ffn_dim_multiplier) describe the same model.
"""

import json
import math
import os

import numpy as np

from tests.hf_models import randomize

# HF component -> Meta component (written out here, independently of bltjax.interop.meta).
_TO_META = {"self_attn": "attention", "mlp": "feed_forward", "input_layernorm": "attention_norm",
            "post_attention_layernorm": "ffn_norm", "embed_tokens": "tok_embeddings",
            "q_norm": "cross_attn_norm_q", "k_norm": "cross_attn_norm_kv", "gate_proj": "w1",
            "down_proj": "w2", "up_proj": "w3", "q_proj": "wq", "k_proj": "wk", "v_proj": "wv",
            "o_proj": "wo", "lm_head": "output"}


def meta_ffn(dim, multiple_of, multiplier):
  hidden = int(2 * (4 * dim) / 3)
  if multiplier is not None:
    hidden = int(multiplier * hidden)
  return multiple_of * math.ceil(hidden / multiple_of)


def make_case(*, seed=0, dim=32, heads=2, global_dim=48, global_heads=3, k=2, enc_layers=1,
              dec_layers=2, enc_all=False, dec_all=True, hash_sizes=(3, 4), hash_vocab=101,
              hash_functions=2, window=8, multiple_of=32, ffn_mult=1.0, ent_window=512,
              ent_mult=1.0, ent_multiple_of=256, calib_tokens=None):
  """Random BltForCausalLM -> (model, blt_args, entropy_args, blt_tensors, entropy_tensors).

  Tensors are float32 numpy arrays under Meta's names; args are Meta's ByteLatentTransformerArgs /
  LMTransformerArgs (non-default fields only, plus a few defaults spelt out)."""
  import torch
  from transformers import BltConfig, BltForCausalLM

  torch.manual_seed(seed)
  local = dict(hidden_size=dim, num_attention_heads=heads, hidden_size_global=global_dim,
               cross_attn_k=k, intermediate_size=meta_ffn(dim, multiple_of, ffn_mult))
  cfg = BltConfig(
      vocab_size=260, cross_attn_k=k, encoder_hash_byte_group_size=list(hash_sizes),
      encoder_hash_byte_group_vocab=hash_vocab, encoder_hash_byte_group_nb_functions=hash_functions,
      patch_size=4, patching_threshold=0.0, local_attention_window_len=window,
      patcher_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=meta_ffn(32, ent_multiple_of, ent_mult),
                          sliding_window=ent_window),
      encoder_config=dict(local, num_hidden_layers=enc_layers, cross_attn_all_layers=enc_all),
      decoder_config=dict(local, num_hidden_layers=dec_layers, cross_attn_all_layers=dec_all),
      global_config=dict(hidden_size=global_dim, num_hidden_layers=2,
                         num_attention_heads=global_heads,
                         intermediate_size=meta_ffn(global_dim, multiple_of, ffn_mult)))
  model = randomize(BltForCausalLM(cfg).eval())
  with torch.no_grad():
    ent, _, _ = model.model.patcher(torch.tensor(np.asarray(calib_tokens)))
  model.config.patching_threshold = float(np.median(ent.numpy()[:, 1:]))
  thetas = {c.rope_parameters["rope_theta"] for c in (cfg.encoder_config, cfg.decoder_config,
                                                      cfg.global_config)}
  assert len(thetas) == 1, thetas  # Meta has one rope_theta for the three stacks

  blt, ent_t = {}, {}
  for name, p in model.named_parameters():
    arr = p.detach().numpy().astype(np.float32)
    if name == "lm_head.weight":
      blt["local_decoder.output.weight"] = arr
      continue
    parts = [_TO_META.get(c, c) for c in name.removeprefix("model.").split(".")]
    if parts[0] == "patcher":
      ent_t[".".join(parts[1:])] = arr
    elif name == "model.encoder_hash_tok_embedding.weight":
      for i, table in enumerate(np.split(arr, len(hash_sizes) * hash_functions)):
        blt[f"encoder_hash_tok_embedding.{i}.weight"] = np.ascontiguousarray(table)
    else:
      blt[".".join(parts)] = arr

  args = dict(
      vocab_size=260, dim=global_dim, n_layers=2, n_heads=global_heads, dim_global=global_dim,
      dim_local_encoder=dim, dim_local_decoder=dim, n_layers_global=2,
      n_layers_local_encoder=enc_layers, n_layers_local_decoder=dec_layers,
      n_heads_global=global_heads, n_heads_local_encoder=heads, n_heads_local_decoder=heads,
      patch_size=4.5, patching_mode="entropy", max_encoder_seq_length=1024, max_seqlen=256,
      use_local_encoder_transformer=True, cross_attn_encoder=True, cross_attn_decoder=True,
      cross_attn_k=k, cross_attn_nheads=heads, cross_attn_all_layers_encoder=enc_all,
      cross_attn_all_layers_decoder=dec_all, cross_attn_init_by_pooling=True,
      cross_attn_use_flex_attention=True, encoder_hash_byte_group_size=list(hash_sizes),
      encoder_hash_byte_group_vocab=hash_vocab, encoder_hash_byte_group_nb_functions=hash_functions,
      downsampling_by_pooling="max", attn_impl="xformers", attn_bias_type="block_causal",
      local_attention_window_len=window, rope_theta=float(thetas.pop()), norm_eps=1e-5,
      multiple_of=multiple_of, ffn_dim_multiplier=ffn_mult, share_encoder_decoder_emb=True,
      init_std_factor="current_depth", recompute_attn=False, eos_id=2)
  ent_args = dict(dim=32, n_layers=2, n_heads=2, max_seqlen=8192, vocab_size=260,
                  ffn_dim_multiplier=ent_mult, multiple_of=ent_multiple_of,
                  attn_impl="xformers", attn_bias_type="local_block_causal",
                  sliding_window=ent_window,
                  rope_theta=float(cfg.patcher_config.rope_parameters["rope_theta"]))
  return model, args, ent_args, blt, ent_t


def train_args(model_args, *, threshold, entropy_args=None, patch_size=4.5):
  """Meta's TrainArgs dump (params.json / train_args.json), trimmed to what matters."""
  return dict(
      name="test", seed=777, model=model_args, entropy_model=entropy_args,
      train_entropy_model=entropy_args is not None and model_args is None,
      distributed=dict(model_dtype="bf16"),
      data=dict(seq_len=4096, max_encoder_seq_length=1024, tokenizer_args=dict(name="blt"),
                patcher_args=dict(patching_mode="entropy" if model_args else "byte",
                                  patching_device="cuda", realtime_patching=True,
                                  entropy_model_checkpoint_dir=None, threshold=threshold,
                                  threshold_add=None, max_patch_length=None,
                                  patch_size=patch_size, patching_batch_size=1, device="cuda",
                                  monotonicity=False, log_time=False)))


def _json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)


def write_hub(directory, args, tensors, train=None):
  """PyTorchModelHubMixin layout: config.json {"args": ...} + model.safetensors (+ train_args)."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  _json(os.path.join(directory, "config.json"), {"args": args})
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  if train is not None:
    _json(os.path.join(directory, "train_args.json"), train)
  return str(directory)


def write_consolidated(directory, train, tensors):
  """facebook/blt layout: params.json + consolidated.pth ({"model": state_dict}, bf16 as Meta
  ships it would lose precision, so float32 here)."""
  import torch
  os.makedirs(directory, exist_ok=True)
  _json(os.path.join(directory, "params.json"), train)
  torch.save({"model": {k: torch.from_numpy(v) for k, v in tensors.items()}},
             os.path.join(directory, "consolidated.pth"))
  return str(directory)
