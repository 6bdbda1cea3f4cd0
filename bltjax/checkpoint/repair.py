"""What a failed checkpoint read means, how it is reported, and the fallback to the newest
checkpoint that reads (`newest_readable`, behind bltjax/checkpoint/checkpointer.py's Checkpointer).

A read can fail because the checkpoint's files are damaged (truncated, missing, bad metadata): the
checkpoint is then moved aside and an older one restored. Or it can fail because the storage or
the machine is unavailable (no network, no permission, no memory): then nothing is moved, since
the files may be fine. Either way the error is reported as one line, and the noise that Orbax
and TensorStore print for each abandoned array read is dropped. All processes agree on each step.
"""

import gc
import logging
import os
import sys
import traceback

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from bltjax.runtime import errors, storage

COMMIT_FILE = "commit_success.txt"  # what marks a finished save on gs:// (Orbax's commit file)
# Status codes (as TensorStore reports them) and exception types that blame the storage or the
# machine, not the checkpoint: never a reason to move a checkpoint aside.
NOT_DAMAGE_CODES = ("UNAVAILABLE", "PERMISSION_DENIED", "UNAUTHENTICATED", "DEADLINE_EXCEEDED",
                    "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED")
NOT_DAMAGE_ERRORS = (PermissionError, ConnectionError, TimeoutError, MemoryError)
OK, UNREADABLE, FATAL = 0, 1, 2  # per-process outcome of one try; processes take the max


def chain(e: BaseException):
  """`e` and its causes, outermost first."""
  seen = []
  while e is not None and e not in seen:
    seen.append(e)
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
  return seen


def let_go(e: BaseException) -> BaseException:
  """After a failed read: frees what it had read (the frames of `e` hold the abandoned reads and
  their arrays) before an older step is read, and quiets what that prints (quiet_read_noise).
  Returns `e`, tracebacks intact."""
  quiet_read_noise()
  for x in chain(e):
    traceback.clear_frames(x.__traceback__)
  gc.collect()
  return e


def quiet_read_noise():
  """Once a restore has failed, Orbax turns the GeneratorExit of every abandoned array read into
  an Exception, and reads finishing after their event loop closed raise RuntimeError; Python
  prints each ("Exception ignored in ..."), with a page of TensorStore spec, once per array. The
  failure itself is reported: drop exactly those from then on."""
  previous = sys.unraisablehook
  if getattr(previous, "bltjax_quiet", False):
    return

  def hook(unraisable):
    message = str(unraisable.exc_value)
    if not (message.startswith("Encountered error while reading array index") or
            (isinstance(unraisable.exc_value, RuntimeError) and message == "Event loop is closed")):
      previous(unraisable)
  hook.bltjax_quiet = True
  sys.unraisablehook = hook


def describe(e: BaseException) -> str:
  """One line: the innermost cause (TensorStore's outer message is a page of JSON spec)."""
  inner = chain(e)[-1]
  return f"{type(inner).__name__}: {' '.join(str(inner).split())[:400]}"


def not_damage(e: BaseException) -> bool:
  """Whether an error blames the storage or the machine rather than the checkpoint's files."""
  return any(isinstance(x, NOT_DAMAGE_ERRORS) or
             any(f"{c}:" in str(x)[:200] for c in NOT_DAMAGE_CODES) for x in chain(e))


def move_dir(src: epath.Path, dest: epath.Path):
  """Local: one atomic rename. In a bucket there are no directories (and gcsfs's rename may
  retry a move API for long): each object is copied, then the commit file is deleted first, so
  that an interrupted move leaves an unfinished step (ignored, then cleaned up), never a
  half-deleted one that looks finished."""
  if not storage.is_remote(os.fspath(src)):
    src.rename(dest)
    return
  def bare(p):  # fsspec's walk drops the gs:// of the paths it yields
    return os.fspath(p).split("://", 1)[-1].rstrip("/")
  for root, _, files in src.walk():
    rel = bare(root)[len(bare(src)):].strip("/")
    for name in files:
      (src / rel / name).copy(dest / rel / name)
  (src / COMMIT_FILE).unlink(missing_ok=True)
  src.rmtree()


def newest_readable(manager, directory: str, read, what: str):
  """`read(step)` on the newest step of `manager` (an ocp.CheckpointManager over `directory`)
  that reads, after moving the unreadable newer ones aside; None without any step. See
  checkpoint.Checkpointer.restore_latest; `what` names the read in errors ("restore")."""
  failed = []  # (step, why), newest first
  for step in sorted(manager.all_steps(), reverse=True):
    result = error = None
    try:
      result, code = read(step), OK
    except errors.CheckpointError as e:
      error, code = e, FATAL
    except Exception as e:  # noqa: BLE001 (any reader error: sorted out below)
      error, code = let_go(e), FATAL if not_damage(e) else UNREADABLE
    code = agree(code)
    if code == OK:
      set_aside(manager, directory, [s for s, _ in failed])
      return result
    if code == FATAL:
      if isinstance(error, errors.CheckpointError):
        raise error
      why = describe(error) if error else "failed on another process (see its log)"
      raise errors.CheckpointError(
          f"{storage.join(directory, str(step))}: cannot {what} the checkpoint: {why}. That "
          "blames the storage or the machine, not the checkpoint: nothing was moved; fix it and "
          "re-run") from error
    why = describe(error) if error else "unreadable on another process (see its log)"
    logging.warning("Checkpoint %s cannot be read (%s); trying the previous one",
                    storage.join(directory, str(step)), why)
    failed.append((step, why))
  if not failed:
    return None
  tried = "; ".join(f"step {s}: {why}" for s, why in failed)
  raise errors.CheckpointError(
      f"{directory}: no checkpoint could be read ({tried}). Nothing was moved. If the "
      "storage is fine, the files are damaged: restore them from a copy, or move the step "
      "directories away (e.g. to <step>.corrupt) to train from scratch")


def set_aside(manager, directory: str, steps: list[int]):
  """Renames each step directory to `<step>.corrupt` (`.corrupt.1`, ... if taken) on process 0;
  every process then waits for the renames and reloads the manager's step list."""
  if not steps:
    return
  if jax.process_index() == 0:
    for step in steps:
      src = epath.Path(storage.join(directory, str(step)))
      dest, n = src.parent / f"{step}.corrupt", 0
      while dest.exists():
        n += 1
        dest = src.parent / f"{step}.corrupt.{n}"
      try:
        move_dir(src, dest)
        logging.warning("Moved the unreadable checkpoint %s aside to %s", src, dest)
      except Exception as e:  # noqa: BLE001 (resuming from the older step is still right)
        logging.error("Could not move the unreadable checkpoint %s aside to %s: %s", src, dest,
                      describe(e))
  if multiprocess():
    multihost_utils.sync_global_devices("bltjax: unreadable checkpoints moved aside")
  manager.reload()


def multiprocess() -> bool:
  return jax.process_count() > 1


def agree(code: int) -> int:
  """The worst outcome over all processes (single process: no collective)."""
  if not multiprocess():
    return code
  return int(np.max(multihost_utils.process_allgather(np.int32(code))))
