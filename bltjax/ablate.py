"""FLOP-matched ablations in one command: the paper's comparisons (§6-7), in small.

    python -m bltjax.ablate --config=experiments/ablation.py [--root=DIR] [--budget=FLOPS]
                            [--only=name,name]

Every run of the config's `runs` table trains for the same training-FLOP budget on the same data,
each in its own resumable workdir ROOT/<name> (a re-run skips finished runs); the results go to
ROOT/results.md, ROOT/results.csv and ROOT/curves.png. How runs are planned and counted:
`bltjax.train.ablation`.
"""

import logging

from absl import flags
from ml_collections import config_flags

from bltjax.runtime import cli, storage
from bltjax.train import ablation

_CONFIG = config_flags.DEFINE_config_file("config", None, "The ablation config, e.g. "
                                          "experiments/ablation.py (override with --config.a.b=c).")
_ROOT = flags.DEFINE_string("root", None, "Where the runs' workdirs and the results go "
                            "(default: workdir/ablation). Re-running on it skips finished runs.")
_BUDGET = flags.DEFINE_float("budget", None,
                             "Training FLOPs per run (default: the config's budget).")
_ONLY = flags.DEFINE_string("only", None, "Comma-separated run names to train (default: all).")
flags.mark_flag_as_required("config")


def main(argv):
  cli.no_arguments(argv)
  root = _ROOT.value or storage.join("workdir", "ablation")
  logging.info("ablation root: %s", storage.abspath(root))
  ablation.run(_CONFIG.value, root, budget=_BUDGET.value,
               only=[n for n in (_ONLY.value or "").split(",") if n])


if __name__ == "__main__":
  cli.run(main, malloc_tuning=True)
