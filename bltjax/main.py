"""Entry point: `python -m bltjax.main --config=experiments/debug.py [--workdir=DIR]`.

Kept thin on purpose: flags, multi-host initialisation, then a library call (`bltjax.train.trainer.run`),
which Colab notebooks and tests call directly.
"""

import os

from bltjax.runtime import process_setup

if __name__ == "__main__":
  process_setup.reexec_with_malloc_tuning()  # glibc malloc settings; see bltjax/runtime/process_setup.py
process_setup.set_defaults()  # before JAX initialises a backend

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bltjax.runtime import cli, distributed, logs, storage  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/debug.py or experiments/1b.py:tiny; "
    "override fields with --config.section.field=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard events go, local or gs:// "
    "(default: workdir/<experiment name>). Re-running on the same workdir resumes.")
_FORCE_UNLOCK = flags.DEFINE_bool(
    "force_unlock", False, "Take over the workdir lock even if another run seems to hold it.")
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_libraries()
  distributed.initialize()
  if distributed.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # process 0 logs for everyone
  from bltjax.train import trainer  # after jax.distributed.initialize, before any other JAX use
  workdir = _WORKDIR.value or os.path.join(
      "workdir", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  logging.info("workdir: %s", storage.abspath(workdir))  # gs:// URLs stay URLs
  try:
    trainer.run(_CONFIG.value, workdir, force_unlock=_FORCE_UNLOCK.value)
  except trainer.Preempted as e:
    logging.warning("%s; re-run the same command to resume", e)


if __name__ == "__main__":
  cli.run(main)  # errors as one line (--verbose: traceback), exit 1
