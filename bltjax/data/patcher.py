"""Host-side patching of packed rows, ahead of the train step (a grain transform on batches).

Each row holds N input bytes that may span several documents. Patches follow the configured mode
(entropy from the frozen entropy model, space, static or byte) over N + 1 positions (the last one
is the next byte, the reference's convention), plus one rule that makes a packed row patch like
the reference patches each document on its own: BOS and EOS each end a patch (so a document's BOS
is a patch of its own and its first byte starts one). Rows get exactly `max_patches` patches;
surplus patches are merged into the last one and counted (`patch_overflow`).
"""

import dataclasses
import logging
import multiprocessing

import grain
import jax
import jax.numpy as jnp
import numpy as np

from bltjax import patching, tokenizer
from bltjax.model import hashing
from bltjax.model.config import EntropyModelConfig, PatchingConfig


def document_starts(tokens_BxN):
  """bool [B, N+1]: the positions after a BOS or an EOS (a document's BOS always follows the
  previous document's EOS). Position p depends only on byte p-1, so generation can apply the same
  rule before byte p exists."""
  xp = jnp if isinstance(tokens_BxN, jax.Array) else np
  b, _ = tokens_BxN.shape
  ends = (tokens_BxN == tokenizer.BOS_ID) | (tokens_BxN == tokenizer.EOS_ID)
  return xp.concatenate([xp.zeros((b, 1), bool), ends], axis=1)


def start_mask(tokens_BxN, entropies_BxN, pc: PatchingConfig):
  """Patch starts over N + 1 positions for a packed row (jittable)."""
  mask = patching.start_mask(pc.mode, tokens=tokens_BxN, entropies=entropies_BxN,
                             threshold=pc.threshold, threshold_add=pc.threshold_add,
                             monotonic=pc.monotonic, patch_size=pc.patch_size)
  # Positions 0 and 1 always start (row-level BOS rule: the decoder needs a first patch of 1).
  first = jnp.arange(mask.shape[1]) < 2
  mask = mask | first | document_starts(tokens_BxN)
  return patching.apply_max_patch_length(mask, pc.max_patch_length)


@dataclasses.dataclass(frozen=True)
class EntropySpec:
  """Where the frozen entropy model comes from (picklable, loaded lazily in each worker)."""
  checkpoint: str
  model: dict  # EntropyModelConfig fields, from the entropy model's checkpoint


def load_entropy_model(spec: EntropySpec):
  from bltjax import checkpoint  # Orbax import only where a model is loaded.
  from bltjax.model.entropy_model import EntropyModel
  params, _, _, _ = checkpoint.load_params(spec.checkpoint)
  cfg = EntropyModelConfig.from_dict(spec.model)
  return EntropyModel(cfg), jax.device_put(params)


def _in_worker() -> bool:
  return multiprocessing.current_process().name != "MainProcess"


class PatchBatch(grain.transforms.Map):
  """grain transform: adds `patch_lengths` [B, P] and `patch_overflow` [B] (and `hash_ids`)."""

  def __init__(self, patching_cfg: PatchingConfig, max_patches: int,
               entropy: EntropySpec | None = None, hash_cfg: dict | None = None):
    if patching_cfg.mode == "entropy" and entropy is None:
      raise ValueError("entropy patching needs an entropy model (EntropySpec)")
    self.patching_cfg, self.max_patches = patching_cfg, max_patches
    self.entropy, self.hash_cfg = entropy, hash_cfg
    self._fn = None

  def __getstate__(self):  # The jitted function and params stay out of the pickle.
    return {k: v for k, v in self.__dict__.items() if k != "_fn"} | {"_fn": None}

  def _build(self):
    if _in_worker():
      # grain workers run on the host CPU; the accelerators belong to the training process.
      jax.config.update("jax_platforms", "cpu")
    pc, p = self.patching_cfg, self.max_patches
    if pc.mode == "entropy":
      model, params = load_entropy_model(self.entropy)
      from bltjax.model.entropy_model import entropies_from_logits

      def fn(tokens):
        ent = entropies_from_logits(model.apply({"params": params}, tokens))
        return patching.lengths_from_start_mask_fixed(start_mask(tokens, ent, pc), p)
    else:
      def fn(tokens):
        return patching.lengths_from_start_mask_fixed(start_mask(tokens, None, pc), p)
    self._fn = jax.jit(fn)
    logging.info("PatchBatch ready: mode=%s max_patches=%d", pc.mode, p)

  def map(self, batch):
    if self._fn is None:
      self._build()
    lengths, overflow = self._fn(jnp.asarray(batch["tokens"]))
    batch = dict(batch, patch_lengths=np.asarray(lengths), patch_overflow=np.asarray(overflow))
    if self.hash_cfg is not None:
      batch["hash_ids"] = hashing.hash_ids_numpy(batch["tokens"], **self.hash_cfg)
    return batch


def calibrate_threshold(entropies, target_patch_size: float) -> float:
  """Global threshold giving about `target_patch_size` bytes per patch on these entropies.

  The reference ships no tool for this (facebookresearch/blt#106): a patch starts where
  H[t-1] > threshold, so the threshold is the (1 - 1/target) quantile of the entropies.
  """
  values = np.asarray(entropies, np.float64).ravel()
  return float(np.quantile(values, 1.0 - 1.0 / target_patch_size))
