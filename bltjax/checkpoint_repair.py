"""What a failed checkpoint read means and how it is reported (bltjax/checkpoint.py uses these).

A read can fail because the checkpoint's files are damaged (truncated, missing, bad metadata): the
checkpoint is then moved aside and an older one restored. Or it can fail because the storage or
the machine is unavailable (no network, no permission, no memory): then nothing is moved, since
the files may be fine. Either way the error is reported as one line, and the noise that Orbax
and TensorStore print for each abandoned array read is dropped.
"""

import gc
import os
import sys
import traceback

from etils import epath

from bltjax import storage

COMMIT_FILE = "commit_success.txt"  # what marks a finished save on gs:// (Orbax's commit file)
# Status codes (as TensorStore reports them) and exception types that blame the storage or the
# machine, not the checkpoint: never a reason to move a checkpoint aside.
NOT_DAMAGE_CODES = ("UNAVAILABLE", "PERMISSION_DENIED", "UNAUTHENTICATED", "DEADLINE_EXCEEDED",
                    "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED")
NOT_DAMAGE_ERRORS = (PermissionError, ConnectionError, TimeoutError, MemoryError)


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
