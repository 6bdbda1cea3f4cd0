"""How every bltjax program runs: `cli.run(main)` in place of `absl.app.run(main)`.

Every command (`bltjax/<command>.py`) has the same shape: absl flags defined at module level,
`main(argv)` that makes one library call, and `cli.run(main)` under `__main__`. `run` does the
process set-up first (`process_setup`: XLA flag defaults before JAX starts a backend; for
long-running programs, `malloc_tuning=True`, the one restart with glibc malloc settings), then
parses the flags and quiets chatty libraries' logging.

A mistake the user can fix (a bad flag or config, a missing path, a `bltjax.runtime.errors.Error`) is
one line, `error: <message>` on stderr, and exit status 1: a traceback would bury it. Anything
else is a bug and prints its traceback (exit 1). `--verbose` prints every traceback. Ctrl-C
exits 130. However the program ends, it does not abort on the way out (see `_leave`). A run that
succeeds goes through absl's usual exit.
"""

import ast
import functools
import logging
import multiprocessing
import multiprocessing.util
import os
import sys
import threading
import time
import traceback

from absl import app, flags

from bltjax.runtime import errors, logs, process_setup

# The errors that main() may end with and that are the user's to fix.
EXPECTED = (errors.Error, ValueError, OSError, flags.Error, app.UsageError)
# While flags are parsed, ml_collections reports a bad --config.a.b=c override as KeyError or
# AttributeError and a wrong value's type as TypeError: before main() runs, all of them are the
# command line's fault.
PARSE_ERRORS = EXPECTED + (KeyError, AttributeError, TypeError)
GRACE_S = 1.0  # how long threads still running at an error exit get to end
CHILD_EXIT_S = 5.0  # how long worker processes get to end after SIGTERM before SIGKILL


def run(main, *, malloc_tuning: bool = False):
  """absl's `app.run(main)` with the process set-up and the error handling above.

  `malloc_tuning`: restart this process once with glibc malloc settings that keep XLA:CPU's
  per-step temporaries mapped (training, preprocessing, benchmarks; see process_setup)."""
  if malloc_tuning:
    process_setup.reexec_with_malloc_tuning()
  process_setup.set_defaults()
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Print the traceback of every error, not only its "
                      "one-line message.")
  app.run(functools.partial(_main, main), flags_parser=functools.partial(_parse, flags.FLAGS))


def no_arguments(argv):
  """For a command's main(argv): anything but flags on the command line is a usage error."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")


def message(e: BaseException) -> str:
  """`e` as one line."""
  text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)  # KeyError quotes str(e)
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a KeyError's str, re-raised
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      pass
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if "Traceback (most recent call last):" in lines:
    # ml_collections wraps an error raised by a config file's get_config() with its traceback:
    # keep the flag it names and the error itself.
    head = " ".join(lines[:lines.index("Traceback (most recent call last):")])
    head = head.removesuffix("Error whilst parsing config file:").strip()
    lines = [head, lines[-1]] if head else lines[-1:]
  return " ".join(lines) or type(e).__name__


def _parse(parse, argv):
  try:
    args = parse(argv)
    _raise_config_load_errors()
    return args
  except SystemExit:  # --help, or argparse's own usage error
    raise
  except BaseException as e:  # noqa: BLE001 (reported by _fail)
    if isinstance(e, (KeyError, AttributeError)):  # ml_collections: an override's field
      cause, e = e, ValueError(f"a --config override names no field: {message(e)}")
      e.__cause__ = cause  # --verbose shows where
    _fail(e, verbose=_verbose(argv), expected=PARSE_ERRORS)


def _main(main, argv):
  try:
    logs.quiet_libraries()
    return main(argv)
  except SystemExit as e:
    if not e.code:
      raise  # success: absl's usual exit
    if not isinstance(e.code, int):  # sys.exit("message")
      sys.stderr.write(f"{e.code}\n")
    _leave(e.code if isinstance(e.code, int) else 1)
  except BaseException as e:  # noqa: BLE001 (reported by _fail)
    _fail(e, verbose=_verbose(argv), expected=EXPECTED)


def _fail(e: BaseException, *, verbose: bool, expected: tuple):
  _flush()
  if isinstance(e, KeyboardInterrupt):
    if verbose:
      traceback.print_exception(e)
    _leave(130)
  if verbose or not isinstance(e, expected):
    traceback.print_exception(e)
  if isinstance(e, expected):
    _leave(1, last_line=f"error: {message(e)}")
  _leave(1)


def _verbose(argv) -> bool:
  if flags.FLAGS.is_parsed() and "verbose" in flags.FLAGS:
    return flags.FLAGS.verbose
  return isinstance(argv, list) and any(
      a in ("--verbose", "-verbose", "--verbose=true", "--verbose=1") for a in argv)


def _raise_config_load_errors():
  """ml_collections keeps a config file that cannot be loaded (a wrong path) as a placeholder
  that raises only when first used, deep inside main(): raise it now, as one line."""
  for name in flags.FLAGS:
    value = flags.FLAGS[name].value
    if type(value).__name__ == "_ErrorConfig":
      error = object.__getattribute__(value, "_error")  # its __getattr__ raises
      last = str(error).strip().splitlines()[-1].strip()  # e.g. [Errno 2] No such file ...
      raise OSError(f"--{name}: cannot load the config file: {last}")


def _flush():
  for handler in logging.getLogger().handlers:
    handler.flush()
  sys.stdout.flush()
  sys.stderr.flush()


def _leave(code: int, last_line: str | None = None):
  """Exits with `code` now, without aborting on the way out; `last_line` (the error) is the last
  thing printed.

  Python's shutdown stops the threads still running (the input pipeline's prefetch thread,
  grain's threads, Orbax's, the metrics uploader) wherever they are when they next take the
  interpreter lock. One inside C++ (an XLA compilation, a tensorstore read) is then unwound by
  glibc's thread exit through frames that do not allow it and the process aborts ("terminate
  called after throwing an instance of ''", "Fatal Python error: Aborted", SIGABRT), or
  crashes on state freed under it. Threads cannot be stopped from outside. So: give them a
  moment to end, stop the worker processes and thread pools as multiprocessing would at exit,
  and if threads still run, leave with os._exit (output flushed first; grain workers end with
  us, see bltjax.data.workers). Otherwise the usual shutdown runs.

  Threads that fail with the main thread (Orbax's writers on a full disk) log their own errors
  as they end: that happens before `last_line`, and anything they would log after it is
  dropped, so that the one line that says what to do is where a user looks.
  """
  _flush()
  if _other_threads():
    _join_others(GRACE_S)  # e.g. a worker process being started: let it start
  if _other_threads():
    _stop_children()
    _join_others(GRACE_S)  # the pools' threads end once told to
  if last_line is not None:
    logging.disable(logging.CRITICAL)  # absl's and Orbax's loggers, from any thread
    threading.excepthook = sys.excepthook = lambda *args: None  # tracebacks of dying threads
    _flush()
    sys.stderr.write(last_line + "\n")
  _flush()
  if _other_threads():
    os._exit(code)
  sys.exit(code)


def _join_others(timeout: float):
  deadline = time.monotonic() + timeout
  for t in _other_threads():
    try:
      t.join(max(0.0, deadline - time.monotonic()))
    except (AssertionError, RuntimeError):  # started outside Python: cannot be joined
      pass


def _other_threads() -> list:
  return [t for t in threading.enumerate()
          if t is not threading.current_thread() and t.is_alive()]


def _stop_children():
  """What multiprocessing does at exit, bounded in time: its finalizers (grain closes its
  iterators, which stops their workers and releases their queues; thread pools stop), then
  SIGTERM, and SIGKILL, for worker processes still running."""
  finalize = getattr(multiprocessing.util, "_run_finalizers", None)  # private: may go away
  if finalize is not None:
    finalize(0)
  children = multiprocessing.active_children()
  for p in children:
    p.terminate()
  for p in children:
    p.join(CHILD_EXIT_S)
    if p.is_alive():
      p.kill()
      p.join(1.0)
