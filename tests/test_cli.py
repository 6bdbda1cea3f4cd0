"""Command-line exits (bltjax.runtime.cli, bltjax.data.workers): a mistake is one line and status 1, never
a traceback or an abort on the way out; no grain worker outlives the trainer, however it ends."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from bltjax.runtime import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, "experiments", "debug.py")
CRASH = ("Traceback", "Fatal Python error", "terminate called")


def _main(workdir, *flags):
  """`python -m bltjax.main` on the tiny debug config: one CPU device, its own environment."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices are for this process only
  return [sys.executable, "-m", "bltjax.main", f"--config={DEBUG}:tiny", f"--workdir={workdir}",
          *flags], env


def _training(workdir, *flags):
  """A long BLT-only run (space patching: no stage 1) with 2 grain worker processes."""
  return _main(workdir, "--config.patching.mode=space", "--config.data.num_workers=2",
               "--config.train.steps=100000", "--config.train.checkpoint_every=100000",
               "--config.train.eval_every=0", *flags)


def _run(cmd, env, cwd):
  """Runs `cmd` to the end; returns (process, stderr, every descendant seen while it ran)."""
  proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  seen = {}
  while proc.poll() is None:
    seen |= _descendants(proc.pid)
    time.sleep(0.05)
  return proc, proc.stderr.read(), seen


def _not_logs(err: str) -> list:
  """stderr's lines other than absl log records (I1126 09:38:11.72 123 main.py:41] ...)."""
  return [line for line in err.strip().splitlines() if not re.match(r"[IWE]\d{4} ", line)]


def _descendants(pid) -> dict:
  try:
    return {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
  except psutil.NoSuchProcess:
    return {}


def _cmdline(p) -> str:
  try:
    return " ".join(p.cmdline())
  except psutil.Error:  # gone, or a zombie
    return ""


def _alive(procs, within: float) -> list:
  """The processes of `procs` still running after up to `within` seconds."""
  deadline = time.time() + within
  while True:
    alive = [p for p in procs if _running(p)]
    if not alive or time.time() > deadline:
      return alive
    time.sleep(0.1)


def _running(p) -> bool:
  try:
    return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
  except psutil.Error:
    return False


def _kill(procs):
  for p in procs:
    try:
      p.kill()
    except psutil.Error:
      pass


def _wait_for_workers(proc, seconds=120) -> list:
  """grain's worker processes of `proc` (spawned by multiprocessing), once they exist."""
  deadline = time.time() + seconds
  while time.time() < deadline and proc.poll() is None:
    workers = [p for p in _descendants(proc.pid).values() if "spawn_main" in _cmdline(p)]
    if workers:
      return workers
    time.sleep(0.1)
  raise AssertionError("no grain worker process started")


def test_bad_config_override_is_one_line(tmp_path):
  cmd, env = _main(tmp_path / "wd", "--config.train.stepz=3")
  proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "stepz" in lines[0], lines
  assert '"steps"' in lines[0]  # ml_collections' suggestion survives


def test_verbose_prints_the_traceback(tmp_path):
  cmd, env = _main(tmp_path / "wd", "--config.train.stepz=3", "--verbose")
  proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1
  assert "Traceback (most recent call last):" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_missing_init_from_exits_1_without_aborting(tmp_path):
  cmd, env = _main(tmp_path / "wd", "--config.init_from=/nonexistent/dir")
  proc, err, seen = _run(cmd, env, tmp_path)
  assert proc.returncode == 1, err[-3000:]
  assert _not_logs(err) == ["error: /nonexistent/dir: /nonexistent/dir does not exist"]
  assert not _alive(seen.values(), within=5)


def test_error_after_the_input_workers_started_exits_1_without_aborting(tmp_path):
  """An init_from that exists but holds no checkpoint fails after the input pipeline (with a
  worker process) has started: the case that used to end in SIGABRT."""
  empty = tmp_path / "empty"
  empty.mkdir()
  cmd, env = _main(tmp_path / "wd", f"--config.init_from={empty}",
                   "--config.patching.mode=space", "--config.data.num_workers=1")
  proc, err, seen = _run(cmd, env, tmp_path)
  left = _alive(seen.values(), within=10)
  names = [_cmdline(p) for p in left]
  _kill(left)
  assert proc.returncode == 1, err[-3000:]  # not -6 (SIGABRT)
  assert not any(c in err for c in CRASH), err[-3000:]
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and str(empty) in errors[0], err[-3000:]
  assert "leaked shared_memory" not in err  # the batches read ahead were released
  assert not left, names


@pytest.mark.long
def test_sigkilled_trainer_leaves_no_worker_behind(tmp_path):
  cmd, env = _training(tmp_path / "wd")
  proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    _wait_for_workers(proc)
    time.sleep(3)  # the workers are reading and patching
    family = list(_descendants(proc.pid).values())
  finally:
    proc.kill()
    proc.wait()
  left = _alive(family, within=5)  # a worker polls its parent every 0.5 s
  names = [_cmdline(p) for p in left]
  _kill(left)
  assert not left, names


@pytest.mark.long
def test_ctrl_c_exits_130_quietly(tmp_path):
  cmd, env = _training(tmp_path / "wd")
  proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_workers(proc)
    time.sleep(3)
    family = list(_descendants(proc.pid).values())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  left = _alive(family, within=10)
  names = [_cmdline(p) for p in left]
  _kill(left)
  assert proc.returncode == 130, err[-3000:]
  assert not any(c in err for c in CRASH), err[-3000:]
  assert not left, names


def test_one_line_messages():
  key = KeyError("'stepz'\nDid you mean \"steps\" instead of \"stepz\"?")
  assert cli.message(key) == "'stepz' Did you mean \"steps\" instead of \"stepz\"?"
  assert cli.message(AttributeError(str(key))) == cli.message(key)  # ml_collections re-raises
  wrapped = ValueError("flag --config=x.py:bogus: Error whilst parsing config file:\n\n"
                       "Traceback (most recent call last):\n  File \"x.py\", line 3\n"
                       "ValueError: unknown config argument 'bogus'\n")
  assert cli.message(wrapped) == \
      "flag --config=x.py:bogus: ValueError: unknown config argument 'bogus'"
  assert cli.message(FileNotFoundError("gs://b/x: nothing there")) == "gs://b/x: nothing there"


_DYING_THREADS = '''
import logging, threading, time
from bltjax.runtime import cli

def writer(delay):  # a background writer that fails with the main thread and logs it, late
  time.sleep(delay)
  try:
    raise ValueError(f"RESOURCE_EXHAUSTED: writer {delay}")
  except ValueError:
    logging.exception("writer %s failed", delay)
  raise RuntimeError(f"writer {delay} gives up")  # and its traceback goes to threading.excepthook

def main(argv):
  for delay in (0.3, 1.5, 30):  # within the grace, after it, long after the exit
    threading.Thread(target=writer, args=(delay,), daemon=True).start()
  raise OSError("/mnt/wd/checkpoints/4: No space left on device")

cli.run(main)
'''


def test_the_error_is_the_last_line_whatever_dying_threads_log(tmp_path):
  script = tmp_path / "prog.py"
  script.write_text(_DYING_THREADS)
  result = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1, result.stderr
  assert lines[-1] == "error: /mnt/wd/checkpoints/4: No space left on device", result.stderr
  assert "writer 0.3 failed" in result.stderr  # what ended in time is still shown, before it
  assert "writer 30" not in result.stderr
