"""What a batch holds: the one definition of its keys, shapes, dtypes and shardings.

The input pipeline yields host numpy dicts (one process's rows); `to_global` turns the keys the
devices read into sharded global arrays. Keys (shape letters as in `bltjax.model`: B rows,
N = data.seq_len bytes, P = patching.max_patches, T = hash tables):

  tokens         int32 [B, N]    input ids (BOS/EOS mark documents in a packed row)
  targets        int32 [B, N]    the next ids
  mask           f32   [B, N]    1 for real targets, 0 for padding at the end of a finite stream
  target_bytes   f32   [B, N]    token_lm only (N = data.seq_len BPE tokens): the text bytes each
                                 target token covers (EOS counts 1; 0 where mask is 0): the loss
                                 is nats per byte (bltjax.data.bpe)
  patch_lengths  int32 [B, P]    BLT only; rows sum to N + 1. Cut on the host (host patching) or
                                 on the devices from tokens/entropies (accelerator patching)
  hash_ids       int32 [B, N, T] BLT with data.host_hash_ids only
  entropies      f32   [B, N]    rows read from preprocessed entropies: what the patching reads
                                 instead of running the entropy model (not a step input)

Host-only statistics (never sent to the devices): doc_flag_counts int32 [B, len(FLAG_NAMES)]
(documents flagged per row, column i named `FLAG_NAMES[i]`: the table in `bltjax.data.flag_table`)
and patch_overflow int32 [B] (host patching).
"""

import jax
import jax.numpy as jnp
import numpy as np

from bltjax.data import flag_table
from bltjax.model.layers import constrain
from bltjax.runtime import sharding
from bltjax.train import experiment

FLAG_NAMES = flag_table.NAMES  # metric names of the doc_flag_counts columns


def device_patching(config) -> bool:
  """Whether patch_lengths are cut on the devices (patching.device == 'accelerator')."""
  return config.model_type == "blt" and config.patching.device == "accelerator"


def spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the train step reads (patch_lengths included, however they are cut)."""
  n = config.data.seq_len
  out = dict(tokens=jax.ShapeDtypeStruct((batch_size, n), jnp.int32),
             targets=jax.ShapeDtypeStruct((batch_size, n), jnp.int32),
             mask=jax.ShapeDtypeStruct((batch_size, n), jnp.float32))
  if config.model_type == "token_lm":
    out["target_bytes"] = jax.ShapeDtypeStruct((batch_size, n), jnp.float32)
  if config.model_type == "blt":
    out["patch_lengths"] = jax.ShapeDtypeStruct((batch_size, config.patching.max_patches),
                                                jnp.int32)
    if config.data.host_hash_ids:
      cfg = experiment.model_config(config)
      out["hash_ids"] = jax.ShapeDtypeStruct((batch_size, n, cfg.num_hash_tables), jnp.int32)
  return out


def input_spec(config, batch_size: int, *, with_entropies: bool) -> dict:
  """The global arrays sent to the devices: `spec` without patch_lengths when the devices cut
  them, plus the stored entropies when the rows come with them."""
  out = spec(config, batch_size)
  if device_patching(config):
    del out["patch_lengths"]
    if with_entropies:
      out["entropies"] = jax.ShapeDtypeStruct((batch_size, config.data.seq_len), jnp.float32)
  return out


def shardings(mesh, specs: dict) -> dict:
  """Batch-major arrays: rows over ('data', 'fsdp'), the rest replicated."""
  return {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in specs.items()}


def to_global(local: dict, batch_shardings: dict) -> dict:
  """Local numpy batch -> global jax.Arrays for the keys in `batch_shardings`."""
  return {k: jax.make_array_from_process_local_data(batch_shardings[k], _as(local[k], k))
          for k in batch_shardings if k in local}


def _as(x, key):
  return np.asarray(x, np.float32) if key == "entropies" else x


def model_inputs(config, batch) -> tuple:
  if config.model_type == "blt":
    return batch["tokens"], batch["patch_lengths"], batch.get("hash_ids")
  return (batch["tokens"],)


def example_inputs(config):
  """Model inputs of one row of ones (for init)."""
  dummy = {k: jnp.ones(v.shape, v.dtype) for k, v in spec(config, 1).items()}
  return model_inputs(config, dummy)


def host_stats(local) -> dict:
  """Statistics of one local batch computed on the host: flagged documents and, when the host
  cut the patches, bytes per patch and merged (overflow) patches."""
  stats = {name: int(c) for name, c in zip(FLAG_NAMES, local["doc_flag_counts"].sum(axis=0))}
  if "patch_lengths" in local:
    stats["bytes_per_patch"] = float(bytes_per_patch(local["mask"], local["patch_lengths"]))
    stats["patch_padding"] = float(patch_padding(local["patch_lengths"]))
    stats["patch_overflow"] = int(local["patch_overflow"].sum())
  return stats


def split_microbatches(batch, num):
  """[B, ...] -> [num, B/num, ...]; microbatch m takes rows m, m+num, ... so that every device
  keeps its own rows (the sharded batch axis stays sharded, no communication)."""
  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
    x = constrain(x, ("batch",) + (None,) * (x.ndim - 1))
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def merge_microbatches(batch, num):
  """The inverse of `split_microbatches`: [num, B/num, ...] -> [B, ...]."""
  def merge(x):
    x = jnp.swapaxes(x, 0, 1)
    return constrain(x.reshape(-1, *x.shape[2:]), ("batch",) + (None,) * (x.ndim - 2))
  return jax.tree.map(merge, batch)


def patch_padding(lengths_BxP):
  """Share of the latent's patch slots (B x max_patches) that hold no patch: computed, but no
  model FLOPs; numpy or jax."""
  xp = jnp if isinstance(lengths_BxP, jax.Array) else np
  return 1 - xp.count_nonzero(lengths_BxP) / lengths_BxP.size


def bytes_per_patch(mask_BxN, lengths_BxP):
  """Real bytes (+ the next byte per row) per non-empty patch; numpy or jax."""
  xp = jnp if isinstance(lengths_BxP, jax.Array) else np
  real = mask_BxN.sum() + mask_BxN.shape[0]
  return real / xp.maximum(xp.count_nonzero(lengths_BxP), 1)
