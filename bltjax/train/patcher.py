"""Who cuts a run's patches, and where: the frozen entropy model (or stored entropies) on the host
or on the accelerators. The rule itself lives in `bltjax.model.patching` (`cut_rows`).

`setup(config, ...)` resolves everything once per run: the entropy model and its identity
(recorded in checkpoints), the calibrated threshold, the placement. Then either

* host patching (`patching.device = 'host'`, right on CPU): `PatchBatch`, a grain transform that
  runs in the input workers and adds patch_lengths to each local batch; or
* accelerator patching (`'accelerator'`, pods): `DevicePatcher`, a function compiled on the
  training mesh that the train loop calls on each global batch as soon as it arrives, so the
  patching of batch t+1 is queued behind step t and patch_lengths never leave the devices.

Both run the same jitted `patching.cut_rows` on the same fp32 entropies.
"""

import dataclasses
import functools
import logging
import multiprocessing

import grain
import jax
import jax.numpy as jnp
import numpy as np

from bltjax.data import pipeline, preprocessed
from bltjax.model import hashing, patching
from bltjax.model.config import LMConfig, PatchingConfig
from bltjax.model.lm import TransformerLM, entropies_from_logits
from bltjax.runtime import sharding, storage
from bltjax.train import batch as batch_lib, experiment

# Where a training workdir keeps its stage-1 entropy model (WORKDIR/entropy_model).
ENTROPY_STAGE_DIR = "entropy_model"
CALIBRATION_ROWS = 16  # held-out rows whose entropies set a calibrated threshold


@dataclasses.dataclass(frozen=True)
class EntropySpec:
  """Where the frozen entropy model comes from (picklable, loaded lazily in each worker)."""
  checkpoint: str
  model: dict  # LMConfig fields, from the entropy model's checkpoint


def load_entropy_model(spec: EntropySpec):
  """(TransformerLM, params as host numpy arrays) of the checkpoint `spec` names."""
  from bltjax.checkpoint import checkpointer  # Orbax import only where a model is loaded.
  params, _, _, _ = checkpointer.load_params(spec.checkpoint)
  return TransformerLM(LMConfig.from_dict(spec.model)), params


def entropies_fn(model: TransformerLM):
  """(params, tokens int32 [B, N]) -> next-byte entropies in nats, f32 [B, N] (jittable)."""
  def fn(params, tokens_BxN):
    return entropies_from_logits(model.apply({"params": params}, tokens_BxN))
  return fn


@dataclasses.dataclass(frozen=True)
class Patcher:
  """How one run cuts its patches (picklable: travels to grain workers)."""
  config: PatchingConfig        # threshold resolved (calibrated if it was None)
  max_patches: int
  placement: str                # 'host' | 'accelerator'
  entropy: EntropySpec | None   # the model to run; None without entropy mode or with stored
                                # entropies (rows come with them: no model is loaded)
  hash_cfg: dict | None         # hash n-gram ids computed on the host (data.host_hash_ids)
  metadata: dict                # recorded in checkpoints: entropy model identity, threshold

  def host_transform(self):
    """The grain transform the pipeline maps over local batches (None: nothing to do there)."""
    cut = self.placement == "host"
    if not cut and self.hash_cfg is None:
      return None
    return PatchBatch(self, cut=cut)


def setup(config, entropy_checkpoint: str | None, resumed_metadata: dict | None,
          stored: dict | None = None) -> Patcher | None:
  """Resolves the run's patching (None for the entropy model stage); `resumed_metadata` is that
  of the checkpoint the run resumes from, if any.

  `stored`: the manifest of preprocessed entropies the rows come with (`data/preprocessed.py`);
  it names the entropy model that computed them, and no model is loaded.
  """
  if config.model_type != "blt":
    return None
  from bltjax.checkpoint import checkpointer
  p = config.patching
  threshold, metadata, entropy = p.threshold, {}, None
  if p.mode == "entropy":
    if stored is not None:
      metadata["entropy_model"] = stored["entropy_model"]
      if p.entropy_model_checkpoint:  # the rows must come from the model this run names
        params, _, _, ent_step = checkpointer.load_params(str(p.entropy_model_checkpoint))
        preprocessed.check_entropy_model(stored, str(p.entropy_model_checkpoint),
                                         checkpointer.params_hash(params), ent_step)
    else:
      params, ent_config, _, ent_step = checkpointer.load_params(entropy_checkpoint)
      entropy = EntropySpec(storage.abspath(entropy_checkpoint), ent_config["model"])
      metadata["entropy_model"] = dict(path=entropy.checkpoint, step=ent_step,
                                       sha256=checkpointer.params_hash(params))
    if resumed_metadata and resumed_metadata.get("entropy_model") != metadata["entropy_model"]:
      raise ValueError(f"the checkpoint's patches were cut by entropy model "
                       f"{resumed_metadata.get('entropy_model')}, but this run would use "
                       f"{metadata['entropy_model']}")
    if threshold is None:
      threshold = (resumed_metadata or {}).get("patching_threshold")
    if threshold is None:
      if stored is not None:
        ent = preprocessed.sample_entropies(config, CALIBRATION_ROWS)
      else:
        ent = _held_out_entropies(config, entropy, params)
      threshold = patching.calibrate_threshold(ent[:, 1:], p.target_patch_size)
      logging.info("patching: calibrated global threshold %.4f nats for ~%.2f bytes per patch",
                   threshold, p.target_patch_size)
    metadata["patching_threshold"] = threshold
  hash_cfg = None
  if config.data.host_hash_ids:
    m = experiment.model_config(config)
    hash_cfg = dict(group_sizes=m.hash_group_sizes, num_functions=m.hash_functions,
                    vocab=m.hash_vocab)
  return Patcher(experiment.patching_config(config, threshold), p.max_patches, p.device, entropy,
                 hash_cfg, metadata)


def _held_out_entropies(config, spec: EntropySpec, params) -> np.ndarray:
  """Entropies of the first held-out rows (train rows without held-out data)."""
  split = "eval" if config.data.eval_fraction > 0 else "train"
  it = iter(pipeline.packed_rows(config.data, split, seed=config.seed, process_index=0,
                                 process_count=1, shuffle=False))
  tokens = np.stack([next(it)["tokens"] for _ in range(CALIBRATION_ROWS)])
  model = TransformerLM(LMConfig.from_dict(spec.model))
  return np.asarray(jax.jit(entropies_fn(model))(params, tokens))


def _in_worker() -> bool:
  return multiprocessing.current_process().name != "MainProcess"


class PatchBatch(grain.transforms.Map):
  """grain transform on local batches: adds `patch_lengths` [B, P] and `patch_overflow` [B]
  (`cut`), cut from the entropy model or the batch's stored `entropies`; and `hash_ids`."""

  def __init__(self, patcher: Patcher, cut: bool = True):
    self.patcher, self.cut = patcher, cut
    self._fn = None

  def __getstate__(self):  # The jitted function and params stay out of the pickle.
    return {k: v for k, v in self.__dict__.items() if k != "_fn"} | {"_fn": None}

  def _build(self):
    if _in_worker():
      # grain workers run on the host CPU; the accelerators belong to the training process.
      jax.config.update("jax_platforms", "cpu")
    p = self.patcher
    if p.config.mode == "entropy" and p.entropy is not None:
      model, params = load_entropy_model(p.entropy)
      params = jax.device_put(params)
      ent = entropies_fn(model)
      self._fn = jax.jit(lambda tokens, _: patching.cut_rows(
          tokens, ent(params, tokens), p.config, p.max_patches))
    else:  # stored entropies, or a mode that reads only the bytes
      self._fn = jax.jit(lambda tokens, entropies: patching.cut_rows(
          tokens, entropies, p.config, p.max_patches))
    logging.info("PatchBatch ready: mode=%s max_patches=%d", p.config.mode, p.max_patches)

  def map(self, batch):
    batch = dict(batch)
    if self.cut:
      if self._fn is None:
        self._build()
      stored = batch.get("entropies")
      stored = None if stored is None else jnp.asarray(stored, jnp.float32)
      lengths, overflow = self._fn(jnp.asarray(batch["tokens"]), stored)
      batch.update(patch_lengths=np.asarray(lengths), patch_overflow=np.asarray(overflow))
    if self.patcher.hash_cfg is not None:
      batch["hash_ids"] = hashing.hash_ids_numpy(batch["tokens"], **self.patcher.hash_cfg)
    return batch


class DevicePatcher:
  """patch_lengths cut on the training mesh: `(global batch) -> (batch + patch_lengths, stats)`.

  The entropy model's params are placed by the same logical-axis rules as the BLT's (FSDP on the
  paper configs), the batch stays sharded like the step's, and the outputs stay on the devices.
  `stats` are device scalars (bytes_per_patch, patch_overflow over the global batch) that the
  loop fetches with the step's metrics, one step late.
  """

  def __init__(self, patcher: Patcher, mesh, input_specs: dict, chunks: int = 1):
    p = patcher
    model, host_params = None, None
    if p.config.mode == "entropy" and p.entropy is not None:
      model, host_params = load_entropy_model(p.entropy)
    lowered, param_sh, self.input_shardings = lower(model, p.config, p.max_patches, mesh,
                                                    input_specs, chunks)
    self.compiled = lowered.compile()
    self.params = None if model is None else jax.tree.map(jax.device_put, host_params, param_sh)
    logging.info("DevicePatcher ready: mode=%s, %d rows x max_patches=%d on mesh %s",
                 p.config.mode, input_specs["tokens"].shape[0], p.max_patches, dict(mesh.shape))

  def __call__(self, device_batch: dict):
    inputs = {k: device_batch[k] for k in self.input_shardings}
    lengths, stats = self.compiled(self.params, inputs)
    out = {k: v for k, v in device_batch.items() if k != "entropies"}
    out["patch_lengths"] = lengths
    return out, stats


def lower(model: TransformerLM | None, pc: PatchingConfig, max_patches: int, mesh,
          input_specs: dict, chunks: int = 1):
  """The patching function lowered on abstract inputs (also what `bltjax.aot` compiles).

  Returns (lowered, param shardings or None, input shardings). `model` None: the rows' stored
  entropies (or the bytes alone) decide. The entropy model runs over the batch in `chunks`
  passes (the train step's microbatches): its activations are those of one microbatch.
  """
  input_sh = batch_lib.shardings(mesh, input_specs)
  param_sh = abstract_params = None
  if model is not None:
    tokens = jax.ShapeDtypeStruct((1, input_specs["tokens"].shape[1]), jnp.int32)
    with sharding.mesh_context(mesh):
      boxed = jax.eval_shape(model.init, jax.eval_shape(lambda: jax.random.key(0)), tokens)
      param_sh = sharding.logical_to_shardings(boxed, mesh)["params"]
    abstract_params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                      sharding=sh),
                                   sharding.unbox(boxed)["params"], param_sh)
  out_sh = (sharding.batch_sharding(mesh, 2),
            dict(bytes_per_patch=sharding.replicated(mesh),
                 patch_padding=sharding.replicated(mesh),
                 patch_overflow=sharding.replicated(mesh)))
  fn = functools.partial(_cut_on_device, model=model, pc=pc, max_patches=max_patches,
                         chunks=chunks)
  with sharding.mesh_context(mesh):
    lowered = jax.jit(fn, in_shardings=(param_sh, input_sh), out_shardings=out_sh).lower(
        abstract_params, input_specs)
  return lowered, param_sh, input_sh


def _cut_on_device(params, inputs, *, model, pc, max_patches, chunks=1):
  tokens = inputs["tokens"]
  if model is not None:
    fn = functools.partial(entropies_fn(model), params)
    entropies = (fn(tokens) if chunks == 1 else batch_lib.merge_microbatches(
        jax.lax.map(fn, batch_lib.split_microbatches(tokens, chunks)), chunks))
  else:
    entropies = inputs.get("entropies")
  lengths, overflow = patching.cut_rows(tokens, entropies, pc, max_patches)
  stats = dict(bytes_per_patch=batch_lib.bytes_per_patch(inputs["mask"], lengths),
               patch_padding=batch_lib.patch_padding(lengths), patch_overflow=jnp.sum(overflow))
  return lengths, stats
