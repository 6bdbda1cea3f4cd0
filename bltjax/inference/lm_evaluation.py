"""Runs EleutherAI's lm-evaluation-harness tasks on a BLT (`python -m bltjax.evaluate`): checks
what the user named before the model loads, evaluates through `harness.BLTLM`, prints lm-eval's
results table and writes its results JSON.

lm-eval is an optional extra (`pip install "bltjax[eval]"`): it is imported when an evaluation
starts, and its absence is one line that says what to install.
"""

import json
import os

from absl import logging
from etils import epath

from bltjax.runtime import storage

MISSING = 'lm-eval is not installed: pip install "bltjax[eval]"'


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
  """Where the results JSON goes: `output_path` itself if it names a .json file, else
  results.json in that directory."""
  path = epath.Path(output_path)
  if path.suffix != ".json" or path.is_dir():
    path = path / "results.json"
  return path


def evaluate(checkpoint: str, tasks: list[str], *, num_fewshot: int | None = None,
             limit: float | None = None, batch_size: int = 8, output_path: str | None = None,
             include_path: str | None = None, entropy_dir: str | None = None,
             max_length: int | None = None, truncate_context: bool = False,
             dtype: str = "float32", seed: int = 0) -> dict:
  """Evaluates the BLT at `checkpoint` (anything `BLT.load` reads) on lm-eval `tasks` (names of
  tasks, groups or tags, or YAML files; more under `include_path`); prints the results tables
  and writes the results JSON, with a `bltjax` entry, to `output_path` (see `results_file`).
  `limit`: documents per task (< 1: a fraction). `seed` seeds lm-eval's few-shot sampling and
  sampled generation. Returns lm-eval's results."""
  try:
    simple_evaluate, TaskManager, make_table = import_lm_eval()  # noqa: N806
  except ImportError as e:
    raise ValueError(str(e)) from e.__cause__  # one line (bltjax.runtime.cli)
  from bltjax.inference import harness  # pylint: disable=import-outside-toplevel (lm_eval)
  tasks = [t for t in tasks if t]
  if not tasks:
    raise ValueError("--tasks names no task")
  if include_path and not epath.Path(include_path).is_dir():
    raise ValueError(f"--include_path {include_path}: no such directory")
  if output_path:  # fail now, not after the evaluation
    storage.check_access(os.fspath(results_file(output_path).parent), write=True)
  task_manager = TaskManager(include_path=include_path)
  check_tasks(tasks, task_manager, include_path)
  lm = harness.BLTLM(checkpoint=checkpoint, batch_size=batch_size, max_length=max_length,
                     dtype=dtype, entropy_dir=entropy_dir, truncate_context=truncate_context,
                     seed=seed)
  if limit is not None and limit >= 1:
    limit = int(limit)
  results = simple_evaluate(
      model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
      task_manager=task_manager, log_samples=False, random_seed=seed, numpy_random_seed=seed,
      torch_random_seed=seed, fewshot_random_seed=seed)
  print(make_table(results))
  if "groups" in results:
    print(make_table(results, "groups"))
  if lm.truncated:
    logging.warning("%d request(s) had their context truncated to %d bytes", lm.truncated,
                    lm.max_length)
  if output_path:
    from lm_eval.utils import handle_non_serializable  # pylint: disable=import-outside-toplevel
    path = results_file(output_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = dict(results, bltjax=dict(checkpoint=checkpoint, max_length=lm.max_length,
                                        truncated_requests=lm.truncated))
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                               ensure_ascii=False))
    logging.info("Wrote %s", path)
  return results
