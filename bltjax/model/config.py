"""Model configuration: frozen dataclasses built from the `model` and `entropy_model` config
sections.

Every field is required: defaults live in `experiments/*.py` (or in the checkpoint that is loaded),
never here. `from_dict` names unknown and missing fields instead of failing deep inside Flax.
"""

import dataclasses
import math
from typing import Any, Mapping

import jax

from bltjax.model.patching import PATCHING_MODES
from bltjax.model.tokenizer import VOCAB_SIZE  # 260: 256 bytes + BOE/pad, BOS, EOS, BPE.


def swiglu_hidden_dim(dim: int, multiplier: float = 1.0, multiple_of: int = 256) -> int:
  """The reference's SwiGLU width: int(2*4d/3), scaled, rounded *up* to a multiple (768->2048)."""
  hidden = int(2 * (4 * dim) / 3)
  hidden = int(multiplier * hidden)
  return multiple_of * math.ceil(hidden / multiple_of)


def _build(cls, d: Mapping[str, Any], where: str):
  """Constructs dataclass `cls` from a mapping, naming unknown and missing fields."""
  d = dict(d)
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  missing = sorted(f.name for f in dataclasses.fields(cls)
                   if f.name not in d and f.default is dataclasses.MISSING)
  if unknown:
    raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields are {sorted(names)}")
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}")
  return cls(**d)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """One pre-norm Llama-style stack (local encoder, latent, local decoder or entropy model)."""
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int          # grouped-query attention; == n_heads for MHA (all released models).
  ffn_dim: int             # SwiGLU hidden width (see `swiglu_hidden_dim`).
  rope_theta: float        # 500000 for BLT stacks, 10000 for the released entropy model.
  norm_eps: float
  attn_window: int | None  # sliding window in positions (keys incl. self); None = full causal.

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def validate(self, where: str):
    if self.dim % self.n_heads:
      raise ValueError(f"{where}.dim={self.dim} is not divisible by {where}.n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"{where}.n_heads={self.n_heads} is not a multiple of "
                       f"{where}.n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"{where}: head_dim={self.head_dim} must be even for RoPE")
    if self.attn_window is not None and self.attn_window < 1:
      raise ValueError(f"{where}.attn_window must be >= 1 or None, got {self.attn_window}")
    if self.n_layers < 1:
      raise ValueError(f"{where}.n_layers must be >= 1, got {self.n_layers}")


# Self-attention backends (bltjax.model.fused_attention): none changes what is computed.
ATTENTION_BACKENDS = ("auto", "xla", "splash", "cudnn")

# Remat policies by the names of the values a block tags with `checkpoint_name`
# (model/transformer.py, layers.SwiGLU): what the backward pass keeps; the rest is recomputed.
# Values are in the compute dtype (bf16 when training), never the matmuls' fp32 accumulators.
NAMED_REMAT_POLICIES = {
    # MaxText's minimal_with_context; Meta's selective checkpointing also keeps matmul and
    # attention outputs: every projection and the attention context. Recomputes norms, RoPE,
    # SiLU and the attention kernel's statistics.
    "minimal_with_context": ("query_proj", "key_proj", "value_proj", "context", "out_proj",
                             "mlp_gate", "mlp_up", "mlp_out"),
    # The attention side only: q, k, v and the context; the MLP's matmuls are recomputed.
    "qkv_and_context": ("query_proj", "key_proj", "value_proj", "context"),
    # The attention context only (the cheapest to keep per FLOP it saves).
    "context": ("context",),
}


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How the model is computed (not what it computes); shared by the BLT and the entropy model."""
  dtype: str         # compute dtype: 'bfloat16' for training, 'float32' for parity checks.
  param_dtype: str   # 'float32' master weights.
  remat_policy: str  # 'none' | 'full' | a NAMED_REMAT_POLICIES name | a jax.checkpoint_policies
                     # name.
  attention: str     # self-attention backend: one of ATTENTION_BACKENDS.
  attn_block: int    # splash attention's block of query and key rows (a multiple of 128).
  attn_chunk: int | None  # xla: query block of local attention, capped at the window (None =
                          # window).
  attn_loop: bool    # xla: local attention one query chunk at a time (CPU: cache-friendly).
  scan_unroll: int   # layers per iteration of the scanned layer loops (1 = rolled loop).

  @classmethod
  def for_inference(cls, dtype: str) -> "RuntimeConfig":
    """No rematerialisation; the device's fused attention where it has one; window-sized
    attention chunks for xla (valid for any window)."""
    return cls(dtype=dtype, param_dtype="float32", remat_policy="none", attention="auto",
               attn_block=512, attn_chunk=None, attn_loop=False, scan_unroll=1)

  def chunk_for(self, window: int | None) -> int | None:
    """The local-attention query chunk for a stack with this window."""
    if window is None or self.attn_chunk is None:
      return window
    return min(self.attn_chunk, window)


@dataclasses.dataclass(frozen=True)
class BLTConfig:
  """Byte Latent Transformer architecture (reference names in comments)."""
  encoder: TransformerConfig   # local encoder (dim_local_encoder, n_layers_local_encoder, ...)
  latent: TransformerConfig    # global transformer over patches (attn_window must be None)
  decoder: TransformerConfig   # local decoder
  cross_attn_k: int            # sub-queries per patch
  cross_attn_nheads: int       # heads of every cross-attention
  cross_attn_all_layers_encoder: bool  # CA after every encoder layer (else after the last only)
  cross_attn_all_layers_decoder: bool  # CA before every decoder layer (else before the first only)
  hash_group_sizes: tuple[int, ...]    # encoder_hash_byte_group_size, e.g. (3, 4, 5, 6, 7, 8)
  hash_vocab: int                      # encoder_hash_byte_group_vocab, rows per table
  hash_functions: int                  # encoder_hash_byte_group_nb_functions
  runtime: RuntimeConfig
  vocab_size: int = VOCAB_SIZE

  @property
  def num_hash_tables(self) -> int:
    return self.hash_functions * len(self.hash_group_sizes)

  @property
  def latent_input_dim(self) -> int:
    return self.cross_attn_k * self.encoder.dim

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "BLTConfig":
    d = dict(d)
    for key in ("encoder", "latent", "decoder"):
      if key in d and not isinstance(d[key], TransformerConfig):
        d[key] = _build(TransformerConfig, d[key], f"model.{key}")
    if "runtime" in d and not isinstance(d["runtime"], RuntimeConfig):
      d["runtime"] = _build(RuntimeConfig, d["runtime"], "model.runtime")
    if "hash_group_sizes" in d:
      d["hash_group_sizes"] = tuple(int(n) for n in d["hash_group_sizes"])
    cfg = _build(cls, d, "model")
    cfg.validate()
    return cfg

  def validate(self):
    for key in ("encoder", "latent", "decoder"):
      getattr(self, key).validate(f"model.{key}")
    if self.encoder.dim != self.decoder.dim:
      # The decoder consumes the encoder's byte states directly (the reference's reshapes
      # assume it).
      raise ValueError(f"model.encoder.dim={self.encoder.dim} must equal "
                       f"model.decoder.dim={self.decoder.dim}")
    if self.latent.attn_window is not None:
      raise ValueError("model.latent.attn_window must be None (the latent transformer is "
                       "block-causal over all patches)")
    for name, dim in (("encoder", self.encoder.dim), ("decoder", self.decoder.dim)):
      if dim % self.cross_attn_nheads:
        raise ValueError(f"model.cross_attn_nheads={self.cross_attn_nheads} does not divide "
                         f"model.{name}.dim={dim}")
    if self.cross_attn_k < 1:
      raise ValueError(f"model.cross_attn_k must be >= 1, got {self.cross_attn_k}")
    if self.hash_functions < 0 or self.hash_functions > 11:
      raise ValueError(f"model.hash_functions must be in [0, 11], got {self.hash_functions}")
    if any(n < 1 for n in self.hash_group_sizes):
      raise ValueError(f"model.hash_group_sizes must be >= 1, got {self.hash_group_sizes}")
    if self.num_hash_tables and not 1 <= self.hash_vocab < 2**24:
      raise ValueError(f"model.hash_vocab must be in [1, 2**24), got {self.hash_vocab}")
    _validate_runtime(self.runtime, "model.runtime", (self.encoder, self.decoder))


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The small byte LM whose next-byte entropy cuts patches (reference: LMTransformer)."""
  transformer: TransformerConfig
  runtime: RuntimeConfig
  vocab_size: int = VOCAB_SIZE

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "LMConfig":
    d = dict(d)
    if "transformer" in d and not isinstance(d["transformer"], TransformerConfig):
      d["transformer"] = _build(TransformerConfig, d["transformer"], "entropy_model.transformer")
    if "runtime" in d and not isinstance(d["runtime"], RuntimeConfig):
      d["runtime"] = _build(RuntimeConfig, d["runtime"], "entropy_model.runtime")
    cfg = _build(cls, d, "entropy_model")
    cfg.transformer.validate("entropy_model.transformer")
    _validate_runtime(cfg.runtime, "entropy_model.runtime", (cfg.transformer,))
    return cfg


_DTYPES = ("float32", "bfloat16", "float16")


def _validate_runtime(rt: RuntimeConfig, where: str, stacks=()):
  if rt.dtype not in _DTYPES:
    raise ValueError(f"{where}.dtype must be one of {_DTYPES}, got {rt.dtype!r}")
  if rt.param_dtype not in _DTYPES:
    raise ValueError(f"{where}.param_dtype must be one of {_DTYPES}, got {rt.param_dtype!r}")
  if (rt.remat_policy not in ("none", "full", *NAMED_REMAT_POLICIES)
      and not hasattr(jax.checkpoint_policies, rt.remat_policy)):
    raise ValueError(f"{where}.remat_policy={rt.remat_policy!r} is not 'none', 'full', one of "
                     f"{tuple(NAMED_REMAT_POLICIES)} or a jax.checkpoint_policies name")
  if rt.scan_unroll < 1:
    raise ValueError(f"{where}.scan_unroll must be >= 1, got {rt.scan_unroll}")
  if rt.attn_chunk is not None and rt.attn_chunk < 1:
    raise ValueError(f"{where}.attn_chunk must be >= 1 or None, got {rt.attn_chunk}")
  if not isinstance(rt.attn_loop, bool):
    raise ValueError(f"{where}.attn_loop must be True or False, got {rt.attn_loop!r}")
  if rt.attention not in ATTENTION_BACKENDS:
    raise ValueError(f"{where}.attention={rt.attention!r} must be one of {ATTENTION_BACKENDS}")
  if not isinstance(rt.attn_block, int) or rt.attn_block < 128 or rt.attn_block % 128:
    raise ValueError(f"{where}.attn_block={rt.attn_block!r} must be a multiple of 128 (the "
                     "TPU's lanes)")
  for t in stacks:
    chunk = rt.chunk_for(t.attn_window)
    if chunk is not None and t.attn_window % chunk:
      raise ValueError(f"{where}.attn_chunk={rt.attn_chunk} does not divide the attention window "
                       f"{t.attn_window}")


def to_dict(cfg) -> dict:
  """Plain nested dict (JSON-serialisable) of a config dataclass."""
  return dataclasses.asdict(cfg)


@dataclasses.dataclass(frozen=True)
class PatchingConfig:
  """How bytes are cut into patches (reference: PatcherArgs)."""
  mode: str                       # one of PATCHING_MODES
  threshold: float | None         # entropy: global threshold in nats (θ_r when monotonic)
  threshold_add: float | None     # entropy: global+monotonic mode (reference quirks kept)
  monotonic: bool                 # entropy: approximate monotonic constraint
  patch_size: int | None          # static: bytes per patch
  max_patch_length: int | None    # split longer patches into pieces of this length

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "PatchingConfig":
    cfg = _build(cls, d, "patching")
    cfg.validate()
    return cfg

  def validate(self):
    if self.mode not in PATCHING_MODES:
      raise ValueError(f"patching.mode={self.mode!r} is unknown; valid modes: {PATCHING_MODES}")
    if self.mode == "entropy" and self.threshold is None:
      raise ValueError("patching.threshold must be set for patching.mode='entropy'")
    if self.mode == "static" and (self.patch_size is None or int(self.patch_size) != self.patch_size
                                  or self.patch_size < 1):
      raise ValueError(f"patching.patch_size must be an integer >= 1 for static patching, "
                       f"got {self.patch_size!r}")
    if self.max_patch_length is not None and self.max_patch_length < 1:
      raise ValueError(f"patching.max_patch_length must be >= 1 or None, "
                       f"got {self.max_patch_length}")
