"""bltjax: Byte Latent Transformer pretraining in JAX/Flax.

    from bltjax import BLT, tokenizer

The commands sit at the top (`python -m bltjax.main`, `generate`, `convert`, `export`,
`evaluate`, `preprocess`, `plot`, `ablate`, `aot`, `bench`); the library is in role packages,
each importing only the ones below it (tests/test_layout.py keeps it so):

    runtime     cli, errors, logs, process set-up, distributed, sharding, storage
    model       the BLT and its parts, the byte tokenizer, the patch rule
    data        documents, sources, the grain pipeline, stored entropies, the BPE of token_lm
    checkpoint  Orbax checkpoints, the fallback past unreadable ones, the workdir lock
    interop     Hugging Face and Meta formats
    viz         pictures: entropy and patches, training curves
    train       experiment configs, the trainer, the step, patcher, metrics, FLOPs
    inference   the `BLT` handle, cached generation, the lm-eval model
"""

import importlib
import warnings

__all__ = ["BLT", "tokenizer"]

# Names of the flat layout before the role packages, kept for one release.
_MOVED = {"configs": "bltjax.train.experiment", "harness": "bltjax.inference.harness"}


def __getattr__(name):
  # Lazy, so that light modules (bltjax.model.tokenizer, bltjax.model.patching) import without
  # Flax/Orbax.
  if name == "BLT":
    from bltjax.inference.api import BLT  # noqa: PLC0415
    return BLT
  if name == "tokenizer":
    return importlib.import_module("bltjax.model.tokenizer")
  if name in _MOVED:
    warnings.warn(f"bltjax.{name} is now {_MOVED[name]}; the old name goes away in the next "
                  "release", DeprecationWarning, stacklevel=2)
    return importlib.import_module(_MOVED[name])
  raise AttributeError(f"module 'bltjax' has no attribute {name!r}")
