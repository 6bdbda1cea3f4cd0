"""`transformers` BLT `config.json` <-> bltjax's model, entropy model and patching configs.

Reading follows the port exactly: a key the file leaves out takes `BltConfig`'s default, and what
the port cannot express is refused when writing. The tensors are in `bltjax.interop.hf`.
"""

import json
import logging
from typing import Any

from etils import epath

from bltjax.model.config import (BLTConfig, LMConfig, PatchingConfig, RuntimeConfig,
                                 TransformerConfig)

# transformers' defaults (BltConfig and its sub-configs, transformers 5.x) for every key that a
# config.json may leave out: a missing key must mean what it means to `BltConfig.from_pretrained`.
# intermediate_size None -> int(8 * hidden / 3), as the port computes it.
_SUB_DEFAULTS = {
    "encoder_config": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=1,
                           intermediate_size=None, rope_theta=500000.0, cross_attn_all_layers=False,
                           cross_attn_k=2, hidden_size_global=2048, max_position_embeddings=24576),
    "decoder_config": dict(hidden_size=1024, num_attention_heads=16, num_hidden_layers=9,
                           intermediate_size=2816, rope_theta=500000.0, cross_attn_all_layers=True,
                           cross_attn_k=2, hidden_size_global=2048, max_position_embeddings=24576),
    "global_config": dict(hidden_size=2048, num_attention_heads=16, num_hidden_layers=25,
                          intermediate_size=5632, rope_theta=500000.0),
    "patcher_config": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=14,
                           intermediate_size=2048, rope_theta=10000.0, vocab_size=260,
                           sliding_window=512),
}
_DEFAULTS = dict(vocab_size=260, patch_in_forward=True, patch_size=4, patching_mode="entropy",
                 patching_threshold=1.335442066192627, max_patch_length=None,
                 local_attention_window_len=512, cross_attn_k=2,
                 encoder_hash_byte_group_size=(3, 4, 5, 6, 7, 8),
                 encoder_hash_byte_group_vocab=500002, encoder_hash_byte_group_nb_functions=1)


def _sub(hf: dict, name: str) -> dict:
  """A sub-config with the port's defaults filled in (a missing or null sub-config is all
  defaults, as in BltConfig)."""
  sub = hf.get(name) or {}
  if not isinstance(sub, dict):
    raise ValueError(f"config.json: {name} must be an object, got {type(sub).__name__}")
  return {**_SUB_DEFAULTS[name], **sub}


def _top(hf: dict, key: str):
  return hf.get(key, _DEFAULTS[key])


def _theta(sub: dict, default: float) -> float:
  rope = sub.get("rope_parameters") or {}
  return float(rope.get("rope_theta", sub.get("rope_theta", default)))


def _norm_eps(sub: dict, where: str) -> float:
  # The port reads rms_norm_eps only. Meta's name is norm_eps, and transformers' converter writes
  # Meta's value under it: we honour it when rms_norm_eps is absent (every release uses 1e-5).
  if "rms_norm_eps" in sub:
    return float(sub["rms_norm_eps"])
  if "norm_eps" in sub:
    eps = float(sub["norm_eps"])
    if eps != 1e-5:
      logging.warning("config.json: %s.norm_eps=%g is Meta's value; transformers ignores it and "
                      "uses 1e-5, so its logits will differ from bltjax's", where, eps)
    return eps
  return 1e-5


def _transformer(sub: dict, window, where: str) -> TransformerConfig:
  hidden, heads = int(sub["hidden_size"]), int(sub["num_attention_heads"])
  return TransformerConfig(
      dim=hidden, n_layers=int(sub["num_hidden_layers"]), n_heads=heads,
      n_kv_heads=int(sub.get("num_key_value_heads") or heads),
      ffn_dim=int(sub.get("intermediate_size") or int(8 * hidden / 3)),
      rope_theta=_theta(sub, _SUB_DEFAULTS[where]["rope_theta"]), norm_eps=_norm_eps(sub, where),
      attn_window=None if window is None else int(window))


def configs_from_hf(hf: dict[str, Any], runtime: RuntimeConfig):
  """config.json dict -> (BLTConfig, LMConfig | None, PatchingConfig).

  Keys the file leaves out take `transformers`' BltConfig defaults (`_DEFAULTS`, `_SUB_DEFAULTS`),
  so a minimal config.json means the same model here as in `BltForCausalLM.from_pretrained`."""
  if hf.get("model_type") != "blt":
    raise ValueError(f"config.json: model_type is {hf.get('model_type')!r}, expected 'blt'")
  enc, dec, glb = (_sub(hf, n) for n in ("encoder_config", "decoder_config", "global_config"))
  # The port gives the encoder's and decoder's self-attention one window, the top-level
  # local_attention_window_len (it overwrites encoder_config.sliding_window); null = no window.
  window = _top(hf, "local_attention_window_len")
  k = int(_top(hf, "cross_attn_k"))
  for name, sub in (("encoder_config", enc), ("decoder_config", dec)):
    if int(sub["cross_attn_k"]) != k:  # the port sizes projections by one, masks by the other
      raise ValueError(f"config.json: {name}.cross_attn_k ({sub['cross_attn_k']}) != cross_attn_k "
                       f"({k}) is not supported")
  if enc["num_attention_heads"] != dec["num_attention_heads"]:
    # The port gives each cross-attention its side's head count; the reference has one
    # cross_attn_nheads. Every released model has equal counts.
    raise ValueError("config.json: encoder_config.num_attention_heads "
                     f"({enc['num_attention_heads']}) != decoder_config.num_attention_heads "
                     f"({dec['num_attention_heads']}) is not supported")
  if int(dec["hidden_size_global"]) != int(glb["hidden_size"]):
    raise ValueError(f"config.json: decoder_config.hidden_size_global "
                     f"({dec['hidden_size_global']}) != global_config.hidden_size "
                     f"({glb['hidden_size']})")
  if enc["cross_attn_all_layers"] and int(enc["num_hidden_layers"]) > 1:
    logging.warning("config.json: multi-layer encoder with cross-attention in every layer; bltjax "
                    "pools patch queries once as Meta's reference does, the HF port re-pools per "
                    "layer, so logits will differ from transformers for this checkpoint.")
  model = BLTConfig.from_dict(dict(
      encoder=_transformer(enc, window, "encoder_config"),
      latent=_transformer(glb, None, "global_config"),
      decoder=_transformer(dec, window, "decoder_config"),
      cross_attn_k=k, cross_attn_nheads=int(enc["num_attention_heads"]),
      cross_attn_all_layers_encoder=bool(enc["cross_attn_all_layers"]),
      cross_attn_all_layers_decoder=bool(dec["cross_attn_all_layers"]),
      hash_group_sizes=tuple(_top(hf, "encoder_hash_byte_group_size")
                             or _DEFAULTS["encoder_hash_byte_group_size"]),
      hash_vocab=int(_top(hf, "encoder_hash_byte_group_vocab")),
      hash_functions=int(_top(hf, "encoder_hash_byte_group_nb_functions")),
      runtime=runtime, vocab_size=int(_top(hf, "vocab_size"))))
  entropy = None
  if _top(hf, "patch_in_forward"):  # the port builds its patcher (default-sized if not given)
    pat = _sub(hf, "patcher_config")
    entropy = LMConfig.from_dict(dict(
        transformer=_transformer(pat, pat["sliding_window"], "patcher_config"),
        runtime=runtime, vocab_size=int(pat["vocab_size"])))
  # The port patches by entropy only with patching_mode 'entropy', a patcher and a patch_size; in
  # every other case each byte is a patch (it has no static or space patching).
  mode = _top(hf, "patching_mode")
  if mode not in ("entropy", None, "byte"):
    logging.warning("config.json: patching_mode=%r: transformers cuts 1-byte patches for it, and "
                    "so does bltjax", mode)
  entropy_mode = mode == "entropy" and entropy is not None and _top(hf, "patch_size") is not None
  for key in ("monotonicity", "patching_threshold_add"):
    if hf.get(key):  # written by transformers' converter from Meta's patcher args; the port ignores
      logging.warning("config.json: %s=%r is ignored, as transformers ignores it", key, hf[key])
  threshold = _top(hf, "patching_threshold")
  if entropy_mode and threshold is None:
    raise ValueError("config.json: patching_threshold is null, but patching_mode is 'entropy'")
  patching = PatchingConfig.from_dict(dict(
      mode="entropy" if entropy_mode else "byte", threshold=threshold if entropy_mode else None,
      threshold_add=None, monotonic=False, patch_size=None,
      max_patch_length=_top(hf, "max_patch_length")))
  return model, entropy, patching


def max_context(hf: dict) -> int:
  """Bytes per row the local models were built for (their RoPE table length)."""
  return int(_sub(hf, "encoder_config")["max_position_embeddings"])


def read_config(directory: str) -> dict:
  path = epath.Path(directory) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{directory}: no config.json (expected a Hugging Face BLT checkpoint "
                            "directory written by BltForCausalLM.save_pretrained)")
  return json.loads(path.read_text())



def _hf_transformer(t: TransformerConfig, **extra) -> dict:
  return dict(hidden_size=t.dim, num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
              num_key_value_heads=t.n_kv_heads, intermediate_size=t.ffn_dim,
              rms_norm_eps=t.norm_eps, hidden_act="silu",
              rope_parameters=dict(rope_theta=t.rope_theta, rope_type="default"), **extra)


def config_to_hf(model: BLTConfig, entropy: LMConfig | None,
                 patching: PatchingConfig) -> dict:
  """The `config.json` a `transformers` BltConfig reads for this model (inverse of
  `configs_from_hf`). Raises for what the port cannot express."""
  enc, dec, lat = model.encoder, model.decoder, model.latent
  if enc.attn_window != dec.attn_window:
    raise ValueError("the HF port has one local_attention_window_len for encoder and decoder")
  if model.cross_attn_nheads != enc.n_heads or model.cross_attn_nheads != dec.n_heads:
    raise ValueError("the HF port uses the local head count for cross-attention: "
                     "cross_attn_nheads must equal encoder.n_heads and decoder.n_heads")
  if patching.mode not in ("entropy", "byte") or patching.monotonic or patching.threshold_add:
    raise ValueError(f"the HF port patches with a global entropy threshold only, not {patching}")
  local = dict(cross_attn_k=model.cross_attn_k, hidden_size_global=lat.dim)
  cfg = dict(
      model_type="blt", architectures=["BltForCausalLM"], vocab_size=model.vocab_size,
      cross_attn_k=model.cross_attn_k, local_attention_window_len=enc.attn_window,
      encoder_hash_byte_group_size=list(model.hash_group_sizes),
      encoder_hash_byte_group_vocab=model.hash_vocab,
      encoder_hash_byte_group_nb_functions=model.hash_functions,
      patch_in_forward=entropy is not None and patching.mode == "entropy",
      patching_mode="entropy" if patching.mode == "entropy" else None,
      patching_threshold=patching.threshold, patch_size=4 if patching.mode == "entropy" else None,
      max_patch_length=patching.max_patch_length, tie_word_embeddings=False,
      rope_parameters=dict(rope_theta=lat.rope_theta, rope_type="default"),
      encoder_config=_hf_transformer(enc, cross_attn_all_layers=model.cross_attn_all_layers_encoder,
                                     vocab_size=model.vocab_size, sliding_window=enc.attn_window,
                                     **local),
      decoder_config=_hf_transformer(dec, cross_attn_all_layers=model.cross_attn_all_layers_decoder,
                                     vocab_size=model.vocab_size, **local),
      global_config=_hf_transformer(lat))
  if entropy is not None:
    t = entropy.transformer
    cfg["patcher_config"] = _hf_transformer(t, vocab_size=entropy.vocab_size,
                                            sliding_window=t.attn_window)
  return cfg
