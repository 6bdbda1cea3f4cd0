"""Train: `python -m bltjax.main --config=experiments/debug.py [--workdir=DIR]`.

    python -m bltjax.main --config=experiments/debug.py [--workdir=DIR] [--config.a.b=value ...]
        [--force_unlock] [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Trains the entropy model if the config needs one, then the configured model, into --workdir
(default: workdir/<config file name>); re-running the same command resumes. A finished run ends
with a line saying where the model is and what to try next. Multi-host jobs start this command on
every host (launch/*). The library call is `bltjax.train.trainer.train`; Colab notebooks and tests
call `bltjax.train.trainer.run` directly.
"""

from absl import flags
from ml_collections import config_flags

# runtime.distributed defines --coordinator_address, --num_processes and --process_id.
from bltjax.runtime import cli, distributed
from bltjax.train import trainer

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
  cli.no_arguments(argv)
  distributed.initialize()  # before any other JAX use: it connects this host's process
  trainer.train(_CONFIG.value, _WORKDIR.value,
                config_file=flags.FLAGS[_CONFIG.name].config_filename,
                force_unlock=_FORCE_UNLOCK.value)


if __name__ == "__main__":
  cli.run(main, malloc_tuning=True)  # errors as one line (--verbose: traceback), exit 1
