"""bltjax: Byte Latent Transformer pretraining in JAX/Flax."""

__all__ = ["BLT"]


def __getattr__(name):
  # Lazy, so that light modules (bltjax.tokenizer, bltjax.patching) import without Flax/Orbax.
  if name == "BLT":
    from bltjax.api import BLT
    return BLT
  raise AttributeError(f"module 'bltjax' has no attribute {name!r}")
