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
the model's context is an error unless --truncate_context (see bltjax.inference.harness).
"""

import json
import os

from absl import flags, logging
from etils import epath

FLAGS = flags.FLAGS
MISSING = 'lm-eval is not installed: pip install "bltjax[eval]"'


def define_flags():
  flags.DEFINE_string("checkpoint", None, "A training workdir, an exported model (python -m "
                      "bltjax.export) or a Hugging Face BLT directory; local or gs://.")
  flags.DEFINE_list("tasks", None, "lm-eval task (or group) names, comma separated.")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: the task's).")
  flags.DEFINE_float("limit", None, "Documents per task (< 1: a fraction); for quick checks.")
  flags.DEFINE_integer("batch_size", 8, "Rows per model call.")
  flags.DEFINE_string("output_path", None, "Where to write the results JSON (a .json file, or a "
                      "directory for results.json); local or gs://.")
  flags.DEFINE_string("include_path", None, "A directory of extra lm-eval task YAML files.")
  flags.DEFINE_string("entropy_dir", None, "For a Meta-format checkpoint: its entropy model's "
                      "directory (e.g. facebook/blt-entropy), as in BLT.load.")
  flags.DEFINE_integer("max_length", None, "Context in bytes (default and maximum: the model's).")
  flags.DEFINE_bool("truncate_context", False, "Keep the last bytes of a request's context that "
                    "does not fit, instead of stopping with an error.")
  flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")
  flags.DEFINE_integer("seed", 0, "Seed for lm-eval's few-shot sampling and for sampled "
                       "generation.")
  flags.mark_flags_as_required(["checkpoint", "tasks"])


def import_lm_eval():
  """lm_eval's simple_evaluate, TaskManager and make_table; one-line error when missing."""
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel
    from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
    from lm_eval.utils import make_table  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(MISSING) from e
  return lm_eval.simple_evaluate, TaskManager, make_table


def check_tasks(names, task_manager, include_path=None):
  """Every name is a task, group or tag lm-eval knows (or a YAML file); names the first not."""
  known = set(task_manager.all_tasks)
  for name in names:
    if name in known or task_manager.match_tasks([name]) or (
        name.endswith((".yaml", ".yml")) and epath.Path(name).exists()):
      continue
    raise ValueError(f"unknown lm-eval task {name!r} (not among lm-eval's tasks"
                     f"{' or under ' + str(include_path) if include_path else ''}; "
                     "`lm-eval ls tasks` lists them)")


def results_file(output_path: str) -> epath.Path:
  path = epath.Path(output_path)
  if path.suffix != ".json" or path.is_dir():
    path = path / "results.json"
  return path


def main(argv):
  del argv
  from bltjax.runtime import logs, storage  # pylint: disable=import-outside-toplevel
  logs.quiet_libraries()
  try:
    simple_evaluate, TaskManager, make_table = import_lm_eval()  # noqa: N806
  except ImportError as e:
    raise ValueError(str(e)) from e.__cause__  # one line (bltjax.runtime.cli)
  from bltjax.inference import harness  # pylint: disable=import-outside-toplevel
  tasks = [t for t in FLAGS.tasks if t]
  if not tasks:
    raise ValueError("--tasks names no task")
  if FLAGS.include_path and not epath.Path(FLAGS.include_path).is_dir():
    raise ValueError(f"--include_path {FLAGS.include_path}: no such directory")
  if FLAGS.output_path:  # fail now, not after the evaluation
    storage.check_access(os.fspath(results_file(FLAGS.output_path).parent), write=True)
  task_manager = TaskManager(include_path=FLAGS.include_path)
  check_tasks(tasks, task_manager, FLAGS.include_path)
  lm = harness.BLTLM(checkpoint=FLAGS.checkpoint, batch_size=FLAGS.batch_size,
                     max_length=FLAGS.max_length, dtype=FLAGS.dtype,
                     entropy_dir=FLAGS.entropy_dir, truncate_context=FLAGS.truncate_context,
                     seed=FLAGS.seed)
  limit = FLAGS.limit
  if limit is not None and limit >= 1:
    limit = int(limit)
  results = simple_evaluate(
      model=lm, tasks=tasks, num_fewshot=FLAGS.num_fewshot, limit=limit,
      batch_size=FLAGS.batch_size, task_manager=task_manager, log_samples=False,
      random_seed=FLAGS.seed, numpy_random_seed=FLAGS.seed, torch_random_seed=FLAGS.seed,
      fewshot_random_seed=FLAGS.seed)
  print(make_table(results))
  if "groups" in results:
    print(make_table(results, "groups"))
  if lm.truncated:
    logging.warning("%d request(s) had their context truncated to %d bytes", lm.truncated,
                    lm.max_length)
  if FLAGS.output_path:
    from lm_eval.utils import handle_non_serializable  # pylint: disable=import-outside-toplevel
    path = results_file(FLAGS.output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = dict(results, bltjax=dict(checkpoint=FLAGS.checkpoint, max_length=lm.max_length,
                                        truncated_requests=lm.truncated))
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                               ensure_ascii=False))
    logging.info("Wrote %s", path)


if __name__ == "__main__":
  from bltjax.runtime import cli, process_setup  # pylint: disable=ungrouped-imports
  process_setup.set_defaults()
  define_flags()
  cli.run(main)  # errors as one line (--verbose: traceback), exit 1
