"""FLOPs per byte of a BLT (the paper's accounting, §4.5 and Appendix B) and peak FLOP/s tables.

Conventions (the paper's): a multiply-add is 2 FLOPs; embeddings and hash n-gram lookups are
free; training costs 3x the forward pass (backward = 2x forward), with no rematerialisation
counted; causal attention averages over the keys each query actually sees. Per byte:

  latent (per patch) x patches per byte     all l_G layers + the input projection, once per patch
  + local encoder (per byte)                l_E layers, sliding window w_E
  + encoder cross-attention                 K/V on bytes, Q/O and the k-way projection per patch,
                                            each sub-query attends to its patch's bytes
  + local decoder (per byte)                l_D layers, window w_D, and its cross-attention
                                            (Q/O on bytes, K/V on the k sub-vectors of a patch)
  + output (per byte)                       2 * D_D * 260
  + entropy model (forward only, when patching runs online in the step; 0 when it runs in the
    input pipeline, as in bltjax training)

One departure: the paper writes the FFN as 2 matrices of width 4h; we count the SwiGLU's three
matrices at their real width (for h = 4096, ffn = 11008: 6·h·ffn vs the paper's 16·h², 3% more).
MFU = training FLOPs per byte x bytes/s / (devices x peak FLOP/s). It uses the *actual* mean patch
size; the latent also runs on padding patches up to `max_patches`, which MFU does not credit.
"""

import time

import jax
import jax.numpy as jnp

from bltjax.model.config import BLTConfig, LMConfig, TransformerConfig

# Dense bf16 peak FLOP/s per device (chip for TPUs, GPU for GPUs), from vendor specs.
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5": 459e12,       # v5p
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "nvidia h100": 989e12,  # SXM, dense
    "nvidia h200": 989e12,
    "nvidia a100": 312e12,
}


def mean_keys(n: int, window: int | None) -> float:
  """Average number of keys a query sees in a causal row of n positions (window w)."""
  if window is None or window >= n:
    return (n + 1) / 2
  # positions 0..w-1 see t+1 keys, the rest see w.
  return (window * (window + 1) / 2 + (n - window) * window) / n


def layer_flops(t: TransformerConfig, keys: float) -> float:
  """Forward FLOPs of one transformer block for one token that attends to `keys` keys."""
  qo = 2 * 2 * t.dim * t.n_heads * t.head_dim
  kv = 2 * 2 * t.dim * t.n_kv_heads * t.head_dim
  attention = 2 * 2 * t.n_heads * t.head_dim * keys  # scores and weighted values
  ffn = 2 * 3 * t.dim * t.ffn_dim
  return qo + kv + attention + ffn


def blt_flops_per_byte(cfg: BLTConfig, seq_len: int, bytes_per_patch: float, *,
                       entropy: LMConfig | None = None,
                       training: bool = True) -> dict[str, float]:
  """FLOPs per byte by component (and 'total'); training (3x forward) unless training=False."""
  enc, lat, dec, k = cfg.encoder, cfg.latent, cfg.decoder, cfg.cross_attn_k
  patches = seq_len / bytes_per_patch
  per_patch_latent = lat.n_layers * layer_flops(lat, mean_keys(int(round(patches)), None))
  if cfg.latent_input_dim != lat.dim:
    per_patch_latent += 2 * cfg.latent_input_dim * lat.dim
  n_ca_enc = enc.n_layers if cfg.cross_attn_all_layers_encoder else 1
  n_ca_dec = dec.n_layers if cfg.cross_attn_all_layers_decoder else 1
  d, g = enc.dim, lat.dim
  encoder_ca = (n_ca_enc * (2 * 2 * d * d                  # K, V on every byte
                            + (2 * 2 * d * d * k) / bytes_per_patch  # Q, O on k sub-queries
                            + 2 * 2 * d * k)               # k sub-queries x the patch's bytes
                + 2 * d * k * d / bytes_per_patch)         # pooled -> k sub-queries projection
  decoder_ca = (n_ca_dec * (2 * 2 * dec.dim * dec.dim       # Q, O on bytes
                            + (2 * 2 * dec.dim * dec.dim * k) / bytes_per_patch  # K, V per patch
                            + 2 * 2 * dec.dim * k)         # each byte attends to k sub-vectors
                + 2 * g * k * dec.dim / bytes_per_patch)   # latent -> k sub-vectors
  parts = {
      "latent": per_patch_latent / bytes_per_patch,
      "local_encoder": enc.n_layers * layer_flops(enc, mean_keys(seq_len, enc.attn_window)),
      "encoder_cross_attention": encoder_ca,
      "local_decoder": dec.n_layers * layer_flops(dec, mean_keys(seq_len, dec.attn_window)),
      "decoder_cross_attention": decoder_ca,
      "output": 2 * dec.dim * cfg.vocab_size,
  }
  mult = 3.0 if training else 1.0
  parts = {name: v * mult for name, v in parts.items()}
  if entropy is not None:  # online patching: a forward pass only, whatever `training` says
    t = entropy.transformer
    parts["entropy_model"] = (t.n_layers * layer_flops(t, mean_keys(seq_len, t.attn_window))
                              + 2 * t.dim * entropy.vocab_size)
  parts["total"] = sum(parts.values())
  return parts


def lm_flops_per_byte(cfg: LMConfig, seq_len: int, training: bool = True) -> float:
  """The entropy model trained on its own (stage 1): a byte-level LM."""
  t = cfg.transformer
  fwd = t.n_layers * layer_flops(t, mean_keys(seq_len, t.attn_window)) + 2 * t.dim * cfg.vocab_size
  return fwd * (3.0 if training else 1.0)


def token_lm_flops_per_byte(cfg: LMConfig, seq_len_tokens: int, bytes_per_token: float,
                            training: bool = True) -> float:
  """The BPE baseline (token_lm): the same LM over tokens (attention over `seq_len_tokens`,
  output over the BPE vocabulary), per token, over the measured bytes per token."""
  return lm_flops_per_byte(cfg, seq_len_tokens, training) / bytes_per_token


def device_peak_flops(device, dtype: str = "bfloat16") -> float:
  """Peak FLOP/s of one device: the table for accelerators, measured for CPUs."""
  kind = device.device_kind.lower()
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name):
      return peak
  if device.platform == "cpu":
    return measured_cpu_peak(dtype)
  raise ValueError(f"no peak FLOP/s known for device kind {device.device_kind!r}; add it to "
                   "bltjax.train.flops.PEAK_FLOPS")


_CPU_PEAK: dict[str, float] = {}


def measured_cpu_peak(dtype: str = "bfloat16", n: int = 2048) -> float:
  """Best of a few n x n matmuls in `dtype` with fp32 accumulation (how the model computes)."""
  if dtype not in _CPU_PEAK:
    a = jnp.ones((n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
      t0 = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    _CPU_PEAK[dtype] = 2 * n**3 / best
  return _CPU_PEAK[dtype]
