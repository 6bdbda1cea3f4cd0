"""Writing a model out in another format: `convert` imports a released BLT (Hugging Face or
Meta) into an Orbax checkpoint (`python -m bltjax.convert`), `export` writes a trained one as
Orbax params or for `transformers` (`python -m bltjax.export`).

Every path is checked before the model loads, so that a typo or a missing permission fails in
a second, not after minutes of loading. Errors name the commands' flags.
"""

from absl import logging

from bltjax.inference.api import BLT
from bltjax.runtime import storage


def convert(out: str, *, hf_dir: str | None = None, meta_dir: str | None = None,
            entropy_dir: str | None = None, dtype: str = "float32"):
  """Reads the BLT in exactly one of `hf_dir` (a `transformers` BLT) and `meta_dir` (Meta's hub
  or consolidated format; its entropy model from `entropy_dir`, else from an `entropy_model/`
  inside or beside it) and writes it to `out` as a params-only Orbax checkpoint with its entropy
  model under out/entropy_model, parameters in `dtype`."""
  if (hf_dir is None) == (meta_dir is None):
    raise ValueError("pass exactly one of --hf_dir and --meta_dir")
  if entropy_dir is not None and meta_dir is None:
    raise ValueError("--entropy_dir goes with --meta_dir (a --hf_dir checkpoint holds its "
                     "entropy model)")
  src = hf_dir or meta_dir
  for path in (src, entropy_dir):  # all fail here, before the model is loaded
    if path is not None:
      storage.check_access(path)
  storage.check_access(out, write=True)
  if hf_dir is not None:
    blt = BLT.from_hf(src)
  else:
    blt = BLT.from_meta(src, entropy_dir)
  blt.save(out, format="orbax", dtype=dtype)
  logging.info("converted %s -> %s", src, out)


def export(workdir: str, out: str, *, format: str = "orbax", dtype: str = "float32"):  # noqa: A002
  """Writes the model of `workdir` (a training workdir's latest checkpoint, or an exported or
  converted directory) to `out` in `format` ('orbax' or 'hf', see `BLT.save`), parameters in
  `dtype`."""
  storage.check_access(workdir)  # both fail here, before the model is loaded
  storage.check_access(out, write=True)
  blt = BLT.from_checkpoint(workdir)
  blt.save(out, format=format, dtype=dtype)
  logging.info("exported %s -> %s (%s, %s)", workdir, out, format, dtype)
