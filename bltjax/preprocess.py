"""Offline patching: `python -m bltjax.preprocess --config=experiments/... --out=DIR`.

Runs the online input pipeline once (entropy model included) and writes the patched rows of every
process's stream to ArrayRecord files, so a huge run can patch once and train many times. Train on
them with `--config.data.preprocessed_dir=DIR`: the batches are the same as the online path's,
row for row, for the `train.steps * train.batch_size` rows of the run (later rows repeat).

If the config trains its entropy model in stage 1, run `python -m bltjax.main` first or point
`patching.entropy_model_checkpoint` at a trained entropy model.
"""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from bltjax import xla_flags

if __name__ == "__main__":
  xla_flags.reexec_with_malloc_tuning()  # glibc malloc settings; see bltjax/xla_flags.py
xla_flags.set_defaults()

from bltjax import checkpoint, configs, logs  # noqa: E402
from bltjax.data import pipeline  # noqa: E402



def _define_flags():  # only when run as a program: importing this module defines no flags
  config_flags.DEFINE_config_file("config", None, "BLT experiment config.", lock_config=True)
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_string("workdir", None, "Workdir whose stage-1 entropy model is used when "
                      "patching.entropy_model_checkpoint is unset.")
  flags.DEFINE_integer("num_processes", 1, "Number of training processes (each reads its own "
                       "stream).")


def preprocess(config, out: str, *, workdir: str | None = None, num_processes: int = 1) -> dict:
  """Writes DIR/{train,eval}.process_{i}-of-{n}.arrayrecord and DIR/preprocessed.json."""
  from bltjax import train
  configs.validate(config, None)  # the training pod may have another device count
  if config.model_type != "blt":
    raise ValueError("preprocess writes patched rows: model_type must be 'blt'")
  if config.data.preprocessed_dir:
    raise ValueError("data.preprocessed_dir is set: this config already reads preprocessed rows")
  entropy_ckpt = None
  if config.patching.mode == "entropy":
    entropy_ckpt = config.patching.entropy_model_checkpoint or (
        workdir and os.path.join(workdir, train.ENTROPY_STAGE_DIR))
    if not entropy_ckpt:
      raise ValueError("entropy patching needs patching.entropy_model_checkpoint or --workdir "
                       "of a run whose stage 1 trained the entropy model")
  patch, meta = train.prepare_patching(config, entropy_ckpt, None)
  local_batch = config.train.batch_size // num_processes
  rows = dict(train=config.train.steps * local_batch,
              eval=config.train.eval_batches * local_batch)
  for split, num_rows in rows.items():
    if not num_rows:
      continue
    for p in range(num_processes):
      ds = pipeline.make_dataset(config, split, local_batch_size=local_batch, patch=patch,
                                 process_index=p, process_count=num_processes)
      written = pipeline.write_rows(out, split, iter(ds), process_index=p,
                                    process_count=num_processes, num_rows=num_rows)
      logging.info("preprocess: %s process %d/%d: %d rows", split, p, num_processes, written)
  meta = dict(meta, seq_len=config.data.seq_len, max_patches=config.patching.max_patches,
              process_count=num_processes, rows=rows, patching=config.patching.to_dict(),
              source=dict(kind=config.data.source, paths=list(config.data.paths or ())))
  pipeline.write_meta(out, meta)
  return meta


def main(argv):
  del argv
  logs.quiet_libraries()
  f = flags.FLAGS
  if not f.out:
    raise app.UsageError("--out is required")
  meta = preprocess(f.config, f.out, workdir=f.workdir, num_processes=f.num_processes)
  logging.info("preprocess: wrote %s (%s)", f.out, meta["rows"])


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("config")
  app.run(main)
