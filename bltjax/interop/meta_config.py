"""Meta's BLT args (facebookresearch/blt) -> bltjax configs.

Meta's pydantic args (`ByteLatentTransformerArgs`, `LMTransformerArgs`: extra="forbid") are read
field by field. Each field is either translated, ignored (init, recompute, parallelism, logging,
fields no code reads) or unsupported: an unsupported field must hold the one value bltjax
implements, else loading fails naming the file, field and value. Missing fields take Meta's
defaults (the tables below are Meta's class defaults), so a stripped config loads as Meta would.
"""

from absl import logging

from bltjax.model.config import (BLTConfig, LMConfig, PatchingConfig, RuntimeConfig,
                                 TransformerConfig, swiglu_hidden_dim)

_BASE = dict(  # BaseTransformerArgs (bytelatent/base_transformer.py)
    dim=512, n_layers=8, head_dim=None, n_heads=None, n_kv_heads=None, ffn_dim_multiplier=None,
    multiple_of=256, norm_eps=1e-5, rope_theta=10000.0, rope_use_fp32_in_outer_product=False,
    init_base_std=None, init_std_factor="disabled", max_seqlen=1024, attn_impl="sdpa",
    attn_bias_type=None, eos_id=2)

BLT_DEFAULTS = dict(_BASE, **dict(  # ByteLatentTransformerArgs (bytelatent/model/blt.py)
    seed=42, vocab_size=-1, dim=512, n_layers=8, n_heads=8, weight_tying=False,
    patch_in_forward=False, dim_token=None, dim_global=512, dim_local_decoder=512,
    dim_local_encoder=512, n_layers_global=8, n_layers_local_decoder=8, n_layers_local_encoder=8,
    patch_size=None, patching_mode=None, patching_threshold=None, patching_threshold_add=None,
    monotonicity=False, patching_batch_size=1, patching_device="cuda", max_patch_length=None,
    tie_local_encoder_decoder_logits=False, use_local_encoder_transformer=False,
    encoder_lm_loss=False, max_encoder_seq_length=None, pad_to_max_length=False,
    encoder_enable_byte_ngrams=False, encoder_enable_byte_group_hash=False, ngram_vocab_sizes=None,
    cross_attn_encoder=False, cross_attn_decoder=False, cross_attn_window_encoder=None,
    cross_attn_window_decoder=None, cross_attn_k=None, cross_attn_nheads=None,
    cross_attn_all_layers_decoder=False, cross_attn_all_layers_encoder=False,
    cross_attn_use_flex_attention=True, cross_attn_init_by_pooling=False,
    encoder_hash_byte_group_size=None, encoder_hash_byte_group_vocab=30000,
    encoder_hash_byte_group_nb_functions=3, log_patch_lengths=False, non_linearity="swiglu",
    use_rope=True, recompute_fc1_out=False, recompute_fc3_out=False, recompute_attn=True,
    custom_bwd=False, layer_ckpt="all", init_use_gaussian=True, init_use_depth="current",
    attn_bias_type="causal", alpha_depth="disabled", max_length=2048, norm_eps=1e-5,
    norm_affine=True, pre_norm=True, norm_type="rmsnorm", multiple_of=256, ffn_dim_multiplier=1.0,
    dropout=0, output_size=-1, architecture="vanilla", share_encoder_decoder_emb=True,
    global_local_decoder_residual_layer=None, tokenize_with_bpe_delimiter=False,
    patching_thresholds_str=None, tie_local_encoder_decoder=False,
    encoder_preds_low_entropy_toks=None, encoder_preds_random_toks=None, dim_token_emb=None,
    dim_patch_emb=None, encoder_ngram_table_dir=None, encoder_ngram_to_size_str=None,
    entropy_model_checkpoint_dir=None, entropy_model_is_ngram_model=False,
    downsampling_by_pooling=None, n_heads_global=8, n_heads_local_decoder=8,
    n_heads_local_encoder=8, n_kv_heads=None, n_kv_heads_global=None, conv_kernel_size=None,
    local_attention_window_len=None, sequence_parallel=False, loss_parallel=False,
    fuse_sequence_parallel=False, use_fsdp=True, attn_to_keep="all", pm_size=0,
    full_logging_n_layers=4))

LM_DEFAULTS = dict(_BASE, seed=42, vocab_size=-1, weight_tying=False, sliding_window=None)

PATCHER_DEFAULTS = dict(  # PatcherArgs (bytelatent/data/patcher.py)
    patching_mode="entropy", patching_device="cuda", entropy_model_checkpoint_dir=None,
    realtime_patching=False, threshold=1.335442066192627, threshold_add=None,
    max_patch_length=None, patch_size=4.5, patching_batch_size=1, device="cuda",
    monotonicity=False, log_time=False)

# The only value bltjax implements for these BLT fields (the released models use it). The
# cross-attention architecture needs all of them: encoder pooling + cross-attention into k
# sub-queries per patch, decoder cross-attention, local transformers with RoPE.
_BLT_REQUIRED = dict(
    cross_attn_encoder=True, cross_attn_decoder=True, cross_attn_init_by_pooling=True,
    cross_attn_use_flex_attention=True,  # False makes Meta's CrossAttention assert
    cross_attn_window_encoder=None, cross_attn_window_decoder=None,  # own patch only
    downsampling_by_pooling="max", use_local_encoder_transformer=True, use_rope=True,
    share_encoder_decoder_emb=True, encoder_enable_byte_ngrams=False, ngram_vocab_sizes=None,
    encoder_ngram_to_size_str=None,  # frequency n-gram tables
    pm_size=0,  # parameter mixing rows appended to the byte vocab
    eos_id=2)
# Read by no model code (legacy), or only by training/initialisation/parallelism/logging, or only
# by Meta's in-model patcher (patch_in_forward, which ignores its threshold: data.patcher_args
# decides the patches), or overwritten before use (dim_token_emb, dim_patch_emb), or the RoPE table
# sizes (bltjax computes RoPE for any position). dim/n_layers/n_heads only feed Meta's FLOP log.
_BLT_IGNORED = {
    "seed", "dim", "n_layers", "n_heads", "weight_tying", "patch_in_forward", "patch_size",
    "patching_threshold", "patching_threshold_add", "monotonicity", "patching_batch_size",
    "patching_device", "max_patch_length", "tie_local_encoder_decoder_logits", "encoder_lm_loss",
    "pad_to_max_length", "encoder_enable_byte_group_hash", "log_patch_lengths", "non_linearity",
    "recompute_fc1_out", "recompute_fc3_out", "recompute_attn", "custom_bwd", "layer_ckpt",
    "init_use_gaussian", "init_use_depth", "alpha_depth", "max_length", "norm_affine",
    "pre_norm", "norm_type", "output_size", "architecture", "global_local_decoder_residual_layer",
    "tokenize_with_bpe_delimiter", "patching_thresholds_str", "tie_local_encoder_decoder",
    "encoder_preds_low_entropy_toks", "encoder_preds_random_toks", "dim_token_emb",
    "dim_patch_emb", "encoder_ngram_table_dir", "entropy_model_checkpoint_dir",
    "entropy_model_is_ngram_model", "conv_kernel_size", "sequence_parallel", "loss_parallel",
    "fuse_sequence_parallel", "use_fsdp", "attn_to_keep", "full_logging_n_layers",
    "rope_use_fp32_in_outer_product", "init_base_std", "init_std_factor", "max_seqlen",
    "dropout"}
# Patching fields that only change how Meta batches or places the entropy computation (chunks of
# 8192 bytes are the same whatever their number per call) or where it finds the model: the
# patches do not depend on them.
_PATCHER_IGNORED = {"patching_device", "entropy_model_checkpoint_dir", "realtime_patching",
                    "patching_batch_size", "device", "log_time"}


def _complete(args, defaults: dict, where: str, kind: str) -> dict:
  if not isinstance(args, dict):
    raise ValueError(f"{where}: {kind} must be a JSON object, got {type(args).__name__}")
  unknown = sorted(set(args) - set(defaults))
  if unknown:  # Meta's args are extra="forbid": its own loader would refuse them too.
    raise ValueError(f"{where}: unknown {kind} field(s) {unknown}")
  return {**defaults, **args}


def _unsupported(where: str, field: str, value, why: str):
  raise ValueError(f"{where}: {field}={value!r} is not supported by bltjax ({why})")


def ffn_dim(dim: int, multiplier, multiple_of: int) -> int:
  """Meta's FeedForward width (llama rule on 4*dim); None multiplier = 1."""
  return swiglu_hidden_dim(dim, 1.0 if multiplier is None else float(multiplier), int(multiple_of))


def _stack(a: dict, dim: int, n_layers: int, n_heads, n_kv_heads, window, where: str,
           name: str) -> TransformerConfig:
  if not n_heads and a["head_dim"]:
    n_heads = dim // a["head_dim"]  # Meta: n_heads = n_heads or dim // head_dim
  if not n_heads or n_heads < 1:
    _unsupported(where, f"n_heads ({name})", n_heads, "need a positive head count")
  if a["head_dim"] is not None and a["head_dim"] * n_heads != dim:
    _unsupported(where, "head_dim", a["head_dim"], f"the {name} stack uses dim // n_heads = "
                 f"{dim} // {n_heads}; heads of another width are not implemented")
  return TransformerConfig(
      dim=int(dim), n_layers=int(n_layers), n_heads=int(n_heads),
      n_kv_heads=int(n_kv_heads or n_heads),
      ffn_dim=ffn_dim(dim, a["ffn_dim_multiplier"], a["multiple_of"]),
      rope_theta=float(a["rope_theta"]), norm_eps=float(a["norm_eps"]),
      attn_window=None if window is None else int(window))


def _check_attn_impl(a: dict, where: str):
  """attn_impl picks Meta's kernel, not the model: only xformers computes the masks the released
  weights were trained with (sliding window, documents); Meta's sdpa/flex paths raise or drop
  them. bltjax always computes those masks, so other values load, with a warning."""
  if a["attn_impl"] not in ("xformers", "sdpa", "flex_attention"):
    _unsupported(where, "attn_impl", a["attn_impl"], "Meta's kernels are xformers, sdpa and "
                 "flex_attention")
  if a["attn_impl"] != "xformers":
    logging.warning("%s: attn_impl=%r: bltjax computes the xformers masks (sliding window, "
                    "documents split at EOS) that Meta's %s path would raise for or drop", where,
                    a["attn_impl"], a["attn_impl"])


def blt_config(args: dict, where: str, runtime: RuntimeConfig) -> tuple[BLTConfig, int | None]:
  """ByteLatentTransformerArgs dict -> (BLTConfig, max_encoder_seq_length or None)."""
  a = _complete(args, BLT_DEFAULTS, where, "ByteLatentTransformerArgs")
  for field, want in _BLT_REQUIRED.items():
    if a[field] != want:
      _unsupported(where, field, a[field], f"only {want!r} is implemented")
  _check_attn_impl(a, where)
  if a["attn_bias_type"] == "causal":
    # The latent attention then crosses documents; ours splits it after each patch that holds an
    # EOS. The two agree on any input without an EOS inside it, so this loads, with a warning.
    logging.warning("%s: attn_bias_type='causal': bltjax's latent transformer is block-causal "
                    "(documents split at EOS); logits differ only for inputs with an EOS inside",
                    where)
  elif a["attn_bias_type"] != "block_causal":
    _unsupported(where, "attn_bias_type", a["attn_bias_type"],
                 "only 'block_causal' (or 'causal', equal without EOS inside) is implemented")
  if a["patching_mode"] == "":
    _unsupported(where, "patching_mode", "", "prepends patch_size - 1 BOE bytes (MegaByte)")
  if a["dim_token"] is not None and a["dim_token"] != a["dim_local_encoder"]:
    _unsupported(where, "dim_token", a["dim_token"],
                 f"byte embeddings must be dim_local_encoder={a['dim_local_encoder']} wide")
  if a["dim_local_encoder"] != a["dim_local_decoder"]:
    _unsupported(where, "dim_local_decoder", a["dim_local_decoder"],
                 f"must equal dim_local_encoder={a['dim_local_encoder']}")
  if a["dim_global"] == a["dim_local_decoder"]:
    # Meta then has no decoder patch projection and no split into k sub-patches.
    _unsupported(where, "dim_global", a["dim_global"], "must differ from dim_local_decoder")
  for field in ("cross_attn_k", "cross_attn_nheads"):
    if not isinstance(a[field], int) or a[field] < 1:
      _unsupported(where, field, a[field], "must be a positive integer")
  if a["vocab_size"] is None or a["vocab_size"] < 1:
    _unsupported(where, "vocab_size", a["vocab_size"], "must be positive (260 for bytes)")
  if a["local_attention_window_len"] is None:
    _unsupported(where, "local_attention_window_len", None,
                 "Meta's xformers local_block_causal mask needs a window")
  if a["dropout"]:
    logging.warning("%s: dropout=%s is ignored (bltjax trains without dropout)", where,
                    a["dropout"])
  sizes = a["encoder_hash_byte_group_size"] or []
  if isinstance(sizes, str):  # Meta's validator accepts "3,4,5"
    sizes = [int(x) for x in sizes.split(",") if x]
  window = a["local_attention_window_len"]
  cfg = BLTConfig.from_dict(dict(
      encoder=_stack(a, a["dim_local_encoder"], a["n_layers_local_encoder"],
                     a["n_heads_local_encoder"], a["n_kv_heads"], window, where, "encoder"),
      latent=_stack(a, a["dim_global"], a["n_layers_global"], a["n_heads_global"],
                    a["n_kv_heads_global"], None, where, "global"),
      decoder=_stack(a, a["dim_local_decoder"], a["n_layers_local_decoder"],
                     a["n_heads_local_decoder"], a["n_kv_heads"], window, where, "decoder"),
      cross_attn_k=a["cross_attn_k"], cross_attn_nheads=a["cross_attn_nheads"],
      cross_attn_all_layers_encoder=bool(a["cross_attn_all_layers_encoder"]),
      cross_attn_all_layers_decoder=bool(a["cross_attn_all_layers_decoder"]),
      hash_group_sizes=tuple(int(n) for n in sizes),
      hash_vocab=int(a["encoder_hash_byte_group_vocab"]),
      hash_functions=int(a["encoder_hash_byte_group_nb_functions"]) if sizes else 0,
      runtime=runtime, vocab_size=int(a["vocab_size"])))
  return cfg, a["max_encoder_seq_length"]


def _entropy(a: dict, window, where: str, runtime: RuntimeConfig) -> LMConfig:
  if a["vocab_size"] is None or a["vocab_size"] < 1:
    _unsupported(where, "vocab_size", a["vocab_size"], "must be positive (260 for bytes)")
  if a["eos_id"] != 2:
    _unsupported(where, "eos_id", a["eos_id"], "documents are split at EOS = 2")
  return LMConfig.from_dict(dict(
      transformer=_stack(a, a["dim"], a["n_layers"], a["n_heads"], a["n_kv_heads"], window,
                         where, "entropy model"),
      runtime=runtime, vocab_size=int(a["vocab_size"])))


def entropy_config_hub(args: dict, where: str, runtime: RuntimeConfig) -> LMConfig:
  """LMTransformerArgs of a hub-format entropy model (config.json "args"), as
  `LMTransformer.from_pretrained` builds it."""
  a = _complete(args, LM_DEFAULTS, where, "LMTransformerArgs")
  if a["weight_tying"]:
    _unsupported(where, "weight_tying", True, "tied output embeddings are not implemented")
  _check_attn_impl(a, where)
  bias, window = a["attn_bias_type"], a["sliding_window"]
  if bias == "local_block_causal":
    if window is None:
      _unsupported(where, "sliding_window", None, "local_block_causal needs a window")
  elif bias == "block_causal":
    window = None  # Meta's block_causal mask has no window (it asserts sliding_window is None)
  else:
    _unsupported(where, "attn_bias_type", bias, "only local_block_causal or block_causal "
                 "(documents split at EOS) are implemented")
  return _entropy(a, window, where, runtime)


# What Meta's load_entropy_model (bytelatent/entropy_model.py) reads from params.json; the rest of
# the entropy args are not read: it hard-codes xformers local_block_causal attention with a
# 512-byte window (what the released entropy model was trained with, configs/entropy_model.yaml).
_CONSOLIDATED_READ = ("dim", "n_layers", "n_heads", "max_seqlen", "ffn_dim_multiplier",
                      "vocab_size")
ENTROPY_WINDOW = 512


def entropy_config_consolidated(params: dict, where: str,
                                runtime: RuntimeConfig) -> LMConfig:
  """The `entropy_model` section of a consolidated params.json, as load_entropy_model reads it."""
  got = _complete(params, LM_DEFAULTS, where, "entropy_model")
  missing = [k for k in _CONSOLIDATED_READ if k not in params]
  if missing:
    raise ValueError(f"{where}: entropy_model has no field(s) {missing} (Meta's "
                     "load_entropy_model requires them)")
  a = dict(LM_DEFAULTS, **{k: params[k] for k in _CONSOLIDATED_READ})
  differ = sorted(k for k in got if k not in _CONSOLIDATED_READ and k in (
      "head_dim", "n_kv_heads", "multiple_of", "norm_eps", "rope_theta", "sliding_window")
      and got[k] != (ENTROPY_WINDOW if k == "sliding_window" else LM_DEFAULTS[k]))
  if differ:
    logging.warning("%s: entropy_model field(s) %s are not read by Meta's load_entropy_model; "
                    "following it (defaults, window %d)", where, differ, ENTROPY_WINDOW)
  return _entropy(a, ENTROPY_WINDOW, where, runtime)


def patching_config(patcher_args: dict | None, where: str,
                    fallback_threshold: float | None = None) -> PatchingConfig:
  """`data.patcher_args` (PatcherArgs) -> PatchingConfig. A missing threshold is taken from
  `fallback_threshold` (the entropy model's own patcher args, as the transformers converter
  does), else PatcherArgs' default."""
  given = dict(patcher_args or {})
  unknown = sorted(set(given) - set(PATCHER_DEFAULTS))
  if unknown:  # PatcherArgs does not forbid extra fields: Meta ignores them, so do we.
    logging.warning("%s: ignoring unknown data.patcher_args field(s) %s", where, unknown)
  a = {**PATCHER_DEFAULTS, **{k: v for k, v in given.items() if k in PATCHER_DEFAULTS}}
  if "threshold" not in given and fallback_threshold is not None:
    a["threshold"] = fallback_threshold
  mode = a["patching_mode"]
  if mode not in ("entropy", "space", "static", "byte"):
    _unsupported(where, "data.patcher_args.patching_mode", mode,
                 "implemented: entropy, space, static, byte")
  if mode == "entropy" and a["threshold"] is None:
    _unsupported(where, "data.patcher_args.threshold", None, "top-k entropy patching")
  size = a["patch_size"]
  if mode == "static" and (size is None or float(size) != int(size)):
    # Meta fills an integer tensor with it; a fractional size breaks its length check.
    _unsupported(where, "data.patcher_args.patch_size", size, "static patches need an integer")
  return PatchingConfig.from_dict(dict(
      mode=mode, threshold=None if a["threshold"] is None else float(a["threshold"]),
      threshold_add=None if a["threshold_add"] is None else float(a["threshold_add"]),
      monotonic=bool(a["monotonicity"]),
      patch_size=int(size) if mode == "static" else None,
      max_patch_length=a["max_patch_length"]))
