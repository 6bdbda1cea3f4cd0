"""What a training stage feeds its steps (bltjax.train.trainer): the stage's patcher
(bltjax.train.patcher), the batch layouts (bltjax.train.batch) and `Feed`, which turns a local
host batch into the global batch the steps read, cutting patch_lengths on the devices under
accelerator patching.
"""

from typing import Any, NamedTuple

from bltjax.data import preprocessed
from bltjax.model.config import LMConfig
from bltjax.train import batch as batch_lib, experiment, patcher as patcher_lib


class Feed:
  """Local host batch -> the global batch the step reads: sharded arrays, then (accelerator
  patching) patch_lengths cut on the devices. Patch statistics come back as device scalars,
  fetched with the step's metrics one step late."""

  def __init__(self, input_shardings, device_patcher):
    self.input_shardings, self.device_patcher = input_shardings, device_patcher

  def __call__(self, local) -> tuple[dict, dict]:
    device = batch_lib.to_global(local, self.input_shardings)
    if self.device_patcher is None:
      return device, {}
    return self.device_patcher(device)


class StageInputs(NamedTuple):
  """What `setup` gives a stage."""
  patcher: Any  # a patcher.Patcher, or None (models without patches)
  metadata: dict  # its metadata, saved with every checkpoint
  host_patch: Any  # its transform for the host input pipeline, or None
  step_spec: dict  # the global batch the steps read (batch.spec) ...
  batch_shardings: dict  # ... and its shardings
  feed: Feed
  entropy_cfg: LMConfig | None  # the entropy model when it runs on the accelerators


def setup(config, mesh, entropy_checkpoint: str | None,
          resumed_metadata: dict | None) -> StageInputs:
  """Patching from the entropy model at `entropy_checkpoint` or the stored entropies of
  data.preprocessed_dir, with the patching metadata of the checkpoint resumed from (if any)."""
  stored = None  # rows that come with their entropies (python -m bltjax.preprocess)
  if config.model_type == "blt" and config.data.preprocessed_dir:
    stored = preprocessed.read_manifest(config.data.preprocessed_dir)
  patcher = patcher_lib.setup(config, entropy_checkpoint, resumed_metadata, stored=stored)
  batch_size = config.train.batch_size
  step_spec = batch_lib.spec(config, batch_size)
  # What the host sends: without patch_lengths when the devices cut them.
  input_spec = batch_lib.input_spec(config, batch_size, with_entropies=stored is not None)
  device_patcher = entropy_cfg = None
  if batch_lib.device_patching(config):
    device_patcher = patcher_lib.DevicePatcher(
        patcher, mesh, input_spec, chunks=experiment.microbatches(config, mesh.size))
    if patcher.entropy is not None:
      # The entropy model's forward pass runs on the same chips: MFU counts it (bltjax.train.flops).
      entropy_cfg = LMConfig.from_dict(patcher.entropy.model)
  return StageInputs(patcher, patcher.metadata if patcher else {},
                     patcher.host_transform() if patcher else None, step_spec,
                     batch_lib.shardings(mesh, step_spec),
                     Feed(batch_lib.shardings(mesh, input_spec), device_patcher), entropy_cfg)
