"""Offline entropies: `python -m bltjax.preprocess --config=experiments/... --out=DIR`.

Runs the frozen entropy model once over the rows a training run will read and stores each row's
bytes with its per-byte next-byte entropies; train on them with
`--config.data.preprocessed_dir=DIR`. Re-running the same command finishes an interrupted run.
The writer is `bltjax.train.preprocess`, the reader `bltjax.data.preprocessed`.

An accelerator job on one or many hosts, started like training (launch/*: MODULE=bltjax.preprocess;
jax.distributed flags --coordinator_address/--num_processes/--process_id or a SLURM / TPU pod
environment). The data layout is T data shards (T = data.shards, else --num_training_processes),
fixed independently of the preprocessing processes, each of which writes its own shards.

The entropy model: patching.entropy_model_checkpoint, else the one recorded in init_from, else
WORKDIR/entropy_model (stage 1 of `python -m bltjax.main --workdir=WORKDIR`).
"""

from absl import app, flags
from ml_collections import config_flags

from bltjax.data import preprocessed as pre
# runtime.distributed defines --coordinator_address, --num_processes and --process_id.
from bltjax.runtime import cli, distributed
from bltjax.train import preprocess

_CONFIG = config_flags.DEFINE_config_file("config", None, "BLT experiment config.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir whose stage-1 entropy model is used when "
    "patching.entropy_model_checkpoint is unset.")
_NUM_TRAINING_PROCESSES = flags.DEFINE_integer(
    "num_training_processes", 1, "Processes of the training run (sets the number of data shards "
    "when data.shards is 0).")
_ENTROPY_DTYPE = flags.DEFINE_enum("entropy_dtype", "float16", list(pre.ENTROPY_DTYPES),
                                   "Stored entropies.")
_ROWS_PER_DEVICE = flags.DEFINE_integer("rows_per_device", preprocess.ROWS_PER_DEVICE,
                                        "Rows per local device per call.")
_FORCE_UNLOCK = flags.DEFINE_bool(
    "force_unlock", False, "Take over the output directory's lock even if another run seems to "
    "hold it.")
flags.mark_flag_as_required("config")


def main(argv):
  cli.no_arguments(argv)
  distributed.initialize()
  if not _OUT.value:
    raise app.UsageError("--out is required")
  preprocess.preprocess(
      _CONFIG.value, _OUT.value, workdir=_WORKDIR.value,
      num_training_processes=_NUM_TRAINING_PROCESSES.value, entropy_dtype=_ENTROPY_DTYPE.value,
      rows_per_device=_ROWS_PER_DEVICE.value, force_unlock=_FORCE_UNLOCK.value)


if __name__ == "__main__":
  cli.run(main, malloc_tuning=True)
