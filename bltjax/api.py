"""`BLT`: the user-facing handle around a BLT, its entropy model and its patching settings.

    from bltjax import BLT
    blt = BLT.from_hf("path/to/blt-1b-hf")      # config.json + model.safetensors
    tokens = bltjax.tokenizer.encode("Hello")[None]   # int [B, N]
    blt.entropies(tokens)      # [B, N] nats
    blt.patch_lengths(tokens)  # [B, P], rows sum to N + 1 (reference convention), zero padded
    blt.logits(tokens)         # [B, N, 260] float32
"""

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bltjax import hf, patching, tokenizer
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.config import (BLTConfig, EntropyModelConfig, PatchingConfig, RuntimeConfig)
from bltjax.model.entropy_model import EntropyModel, entropies_from_logits


def param_shapes(module: nn.Module, *example_args) -> dict:
  """{param path: shape} of `module`, from abstract evaluation (nothing is allocated)."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args))
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract["params"]))[0]
  return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def _as_tokens(tokens) -> np.ndarray:
  arr = np.asarray(tokens)
  if arr.ndim != 2:
    raise ValueError(f"tokens must be a 2-D int array [B, N], got shape {arr.shape}")
  if arr.shape[1] == 0:
    raise ValueError("tokens has no bytes (N == 0)")
  tokenizer.validate_ids(arr, name="tokens")
  return arr.astype(np.int32)


class BLT:
  """A BLT with its entropy model and patching settings; all methods take and return numpy."""

  def __init__(self, model_cfg: BLTConfig, params, *, patching_cfg: PatchingConfig,
               entropy_cfg: EntropyModelConfig | None = None, entropy_params=None):
    if patching_cfg.mode == "entropy" and entropy_params is None:
      raise ValueError("patching.mode='entropy' needs an entropy model (entropy_params is None)")
    self.config, self.entropy_config, self.patching_config = model_cfg, entropy_cfg, patching_cfg
    self.model = ByteLatentTransformer(model_cfg)
    self.params = jax.device_put(params)
    self.entropy_model = EntropyModel(entropy_cfg) if entropy_cfg is not None else None
    self.entropy_params = None if entropy_params is None else jax.device_put(entropy_params)

  @classmethod
  def from_hf(cls, path: str, *, dtype: str = "float32") -> "BLT":
    """Loads a `transformers` BLT checkpoint directory, its entropy model ("patcher") included."""
    runtime = RuntimeConfig(dtype=dtype, param_dtype="float32", remat_policy="none")
    model_cfg, entropy_cfg, patching_cfg = hf.configs_from_hf(hf.read_config(path), runtime)
    reader = hf.SafetensorsReader(path)
    maps = [hf.blt_key_map(model_cfg)]
    if entropy_cfg is not None:
      maps.append(hf.entropy_key_map(entropy_cfg))
    hf.check_tensor_names(reader, *maps, where=path)
    tokens, lengths = np.ones((1, 4), np.int32), np.ones((1, 5), np.int32)
    params = hf.load_params(reader, maps[0],
                            param_shapes(ByteLatentTransformer(model_cfg), tokens, lengths),
                            where=path)
    entropy_params = None
    if entropy_cfg is not None:
      entropy_params = hf.load_params(reader, maps[1],
                                      param_shapes(EntropyModel(entropy_cfg), tokens), where=path)
    logging.info("Loaded BLT from %s (patching: %s)", path, patching_cfg)
    return cls(model_cfg, params, patching_cfg=patching_cfg, entropy_cfg=entropy_cfg,
               entropy_params=entropy_params)

  # -- entropy model and patching ------------------------------------------------------------------

  @functools.cached_property
  def _entropies_fn(self):
    def fn(params, tokens):
      return entropies_from_logits(self.entropy_model.apply({"params": params}, tokens))
    return jax.jit(fn)

  def entropies(self, tokens) -> np.ndarray:
    """Next-byte entropies [B, N] in nats; H[b, t] is the entropy of byte t+1 given bytes 0..t."""
    if self.entropy_model is None:
      raise ValueError("this BLT has no entropy model")
    return np.asarray(self._entropies_fn(self.entropy_params, _as_tokens(tokens)))

  def patch_lengths(self, tokens) -> np.ndarray:
    """Patch lengths [B, P] with the checkpoint's patching settings; rows sum to N + 1."""
    tokens = _as_tokens(tokens)
    pc = self.patching_config
    if pc.mode == "entropy":
      return patching.patch_lengths_from_entropies(
          self.entropies(tokens), pc.threshold, monotonic=pc.monotonic,
          threshold_add=pc.threshold_add, max_patch_length=pc.max_patch_length)
    mask = patching.start_mask(pc.mode, tokens=tokens, patch_size=pc.patch_size,
                               max_patch_length=pc.max_patch_length)
    return patching.lengths_from_start_mask(mask)

  # -- the BLT --------------------------------------------------------------------------------------

  @functools.cached_property
  def _logits_fn(self):
    return jax.jit(lambda params, tokens, lengths: self.model.apply({"params": params}, tokens,
                                                                    lengths))

  def logits(self, tokens, patch_lengths=None) -> np.ndarray:
    """Next-byte logits [B, N, 260] (float32). Patches with the entropy model when not given."""
    tokens = _as_tokens(tokens)
    if patch_lengths is None:
      patch_lengths = self.patch_lengths(tokens)
    patch_lengths = np.asarray(patch_lengths)
    if patch_lengths.ndim != 2 or patch_lengths.shape[0] != tokens.shape[0]:
      raise ValueError(f"patch_lengths must be [B, P] with B={tokens.shape[0]} (the batch of "
                       f"tokens), got shape {patch_lengths.shape}")
    patching.validate_patch_lengths(patch_lengths, tokens.shape[1])
    return np.asarray(self._logits_fn(self.params, tokens, jnp.asarray(patch_lengths, jnp.int32)))
