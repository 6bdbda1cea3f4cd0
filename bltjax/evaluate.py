"""Evaluates a BLT on EleutherAI's lm-evaluation-harness tasks (needs `pip install "bltjax[eval]"`).

    python -m bltjax.evaluate --checkpoint=DIR --tasks=hellaswag,piqa,arc_easy \
        [--num_fewshot=0] [--limit=N] [--batch_size=8] [--output_path=results.json] \
        [--include_path=MY_TASKS_DIR] [--entropy_dir=DIR] [--max_length=N] \
        [--truncate_context] [--seed=0]

--checkpoint: a training workdir, an exported model or a Hugging Face BLT directory (local or
gs://). Tasks are lm-eval's (their datasets are downloaded from the Hugging Face hub by lm-eval
when first used) or YAML tasks under --include_path. Prints lm-eval's results table and writes
the results JSON to --output_path (a file, or a directory for results.json; local or gs://).
Lengths are in bytes: max_gen_toks of generation tasks counts bytes, and a request longer than
the model's context is an error unless --truncate_context (see bltjax.inference.harness). The
evaluation itself is `bltjax.inference.lm_evaluation`.
"""

from absl import flags

from bltjax.inference import lm_evaluation
from bltjax.runtime import cli

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A training workdir, an exported model (python -m bltjax.export) or a "
    "Hugging Face BLT directory; local or gs://.", required=True)
_TASKS = flags.DEFINE_list("tasks", None, "lm-eval task (or group) names, comma separated.",
                           required=True)
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt "
                                    "(default: the task's).")
_LIMIT = flags.DEFINE_float("limit", None, "Documents per task (< 1: a fraction); for quick "
                            "checks.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Rows per model call.")
_OUTPUT_PATH = flags.DEFINE_string(
    "output_path", None, "Where to write the results JSON (a .json file, or a directory for "
    "results.json); local or gs://.")
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "A directory of extra lm-eval task "
                                    "YAML files.")
_ENTROPY_DIR = flags.DEFINE_string(
    "entropy_dir", None, "For a Meta-format checkpoint: its entropy model's directory (e.g. "
    "facebook/blt-entropy), as in BLT.load.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", None, "Context in bytes (default and maximum: "
                                   "the model's).")
_TRUNCATE_CONTEXT = flags.DEFINE_bool(
    "truncate_context", False, "Keep the last bytes of a request's context that does not fit, "
    "instead of stopping with an error.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for lm-eval's few-shot sampling and for sampled "
                             "generation.")


def main(argv):
  cli.no_arguments(argv)
  lm_evaluation.evaluate(
      _CHECKPOINT.value, _TASKS.value, num_fewshot=_NUM_FEWSHOT.value, limit=_LIMIT.value,
      batch_size=_BATCH_SIZE.value, output_path=_OUTPUT_PATH.value,
      include_path=_INCLUDE_PATH.value, entropy_dir=_ENTROPY_DIR.value,
      max_length=_MAX_LENGTH.value, truncate_context=_TRUNCATE_CONTEXT.value, dtype=_DTYPE.value,
      seed=_SEED.value)


if __name__ == "__main__":
  cli.run(main)
