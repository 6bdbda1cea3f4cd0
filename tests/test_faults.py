"""Fault injection through the real command line: SIGKILLs (one of them during an asynchronous
checkpoint save), a second run on a live workdir, a corrupt checkpoint, divergence and a full disk.
Each run is a `python -m bltjax.main` process; `.ci/run` runs these (`pytest -m long`)."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bltjax.checkpoint import checkpointer
from bltjax.train import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, "experiments", "debug.py")
pytestmark = pytest.mark.long

# A tiny BLT with space patching (no stage 1): ~0.1-0.3 s per step on 2 CPU cores.
TINY = ("--config.patching.mode=space", "--config.train.log_every=1",
        "--config.train.checkpoint_every=2", "--config.train.eval_every=0")


def _cmd(workdir, steps, *extra):
  return [sys.executable, "-m", "bltjax.main", f"--config={DEBUG}:tiny", f"--workdir={workdir}",
          f"--config.train.steps={steps}", *TINY, *extra]


def _run(workdir, steps, *extra, timeout=300):
  return subprocess.run(_cmd(workdir, steps, *extra), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def _start(workdir, steps, *extra, log=None):
  out = open(log or os.devnull, "w")
  return subprocess.Popen(_cmd(workdir, steps, *extra), cwd=REPO, stdout=out,
                          stderr=subprocess.STDOUT)


def _losses(workdir) -> dict:
  """step -> loss; a resumed run re-logs the steps after its checkpoint: the last record wins."""
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def _logged_steps(workdir) -> int:
  try:
    return len(_losses(workdir))
  except (FileNotFoundError, ValueError):
    return 0


def _wait(cond, timeout, what, proc=None):
  end = time.time() + timeout
  while time.time() < end:
    if cond():
      return
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
    time.sleep(0.005)
  raise AssertionError(f"timed out waiting for {what}")


def _one_line_error(result, pattern):
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and "Fatal Python error" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert pattern in errors[0], errors[0]
  return errors[0]


def _tmp_dirs(workdir) -> set:
  """Orbax writes an asynchronous save into a temporary step directory, renamed when complete."""
  try:
    return {name for name in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in name}
  except FileNotFoundError:
    return set()


def test_sigkill_at_random_moments_then_resume_gives_identical_losses(tmp_path):
  steps = 16
  want = _losses(_reference(tmp_path, steps))
  wd = str(tmp_path / "killed")
  rng = random.Random(0)
  during_save = 0
  for kill in range(4):
    left = _tmp_dirs(wd)  # an earlier kill may have left one
    proc = _start(wd, steps, log=str(tmp_path / f"kill{kill}.log"))
    if kill % 2 == 0:  # the moment an asynchronous save is writing its files
      _wait(lambda: _tmp_dirs(wd) - left, 240, "a checkpoint save", proc)
      during_save += 1
    else:  # a random moment of training
      at = min(_logged_steps(wd) + rng.randint(1, 4), steps - 1)
      _wait(lambda: _logged_steps(wd) >= at, 240, f"step {at}", proc)
      time.sleep(rng.uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert during_save == 2
  result = _run(wd, steps)
  assert result.returncode == 0, result.stderr[-3000:]
  got = _losses(wd)
  assert sorted(got) == list(range(1, steps + 1))
  assert got == want  # bitwise: params, optimizer state and data order all resumed exactly


_REFERENCE = {}


def _reference(tmp_path, steps) -> str:
  """An uninterrupted run (once per session and step count)."""
  if steps not in _REFERENCE:
    wd = str(tmp_path / f"reference{steps}")
    result = _run(wd, steps)
    assert result.returncode == 0, result.stderr[-3000:]
    _REFERENCE[steps] = wd
  return _REFERENCE[steps]


def test_a_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
  wd = str(tmp_path / "wd")
  first = _start(wd, 100_000, log=str(tmp_path / "first.log"))
  try:
    _wait(lambda: _logged_steps(wd) >= 1, 240, "the first run's first step", first)
    second = _run(wd, 4)
    line = _one_line_error(second, "in use by a training run")
    assert f"PID {first.pid}" in line
    assert first.poll() is None  # the first run trains on
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  third = _run(wd, 4)  # the lock of a dead process does not block
  assert third.returncode == 0, third.stderr[-3000:]
  assert str(first.pid) in third.stderr  # the take-over is logged, naming the dead holder
  assert not os.path.exists(os.path.join(wd, ".lock"))  # released at exit


def _largest_file(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
  want = _losses(_reference(tmp_path, 6))
  wd = str(tmp_path / "wd")
  assert _run(wd, 4).returncode == 0  # checkpoints 2 and 4
  victim = _largest_file(os.path.join(wd, "checkpoints", "4", "state"))
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  result = _run(wd, 6)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoints/4" in result.stderr and "corrupt" in result.stderr  # a warning names it
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4.corrupt"))  # moved aside, not deleted
  got = _losses(wd)
  assert {s: got[s] for s in range(3, 7)} == {s: want[s] for s in range(3, 7)}  # from step 2


def test_divergence_exits_1_and_leaves_no_non_finite_checkpoint(tmp_path):
  wd = str(tmp_path / "wd")
  assert _run(wd, 2).returncode == 0
  result = _run(wd, 8, "--config.optim.lr=1e30")
  _one_line_error(result, "non-finite")
  ckpt = checkpointer.Checkpointer(wd)
  assert ckpt.manager.all_steps() == [2]
  ckpt.close()
  params = checkpointer.load_params(wd)[0]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_full_disk_fails_cleanly_and_keeps_the_last_checkpoint(tmp_path):
  mnt = tmp_path / "disk"
  mnt.mkdir()
  if shutil.which("mount") is None or subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
      capture_output=True).returncode:
    pytest.skip("cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN)")
  try:
    wd = str(mnt / "wd")
    assert _run(wd, 2).returncode == 0
    filler = mnt / "filler"
    free = shutil.disk_usage(mnt).free
    with open(filler, "wb") as f:  # leave 64 KiB: less than one checkpoint
      f.write(b"\0" * max(free - (64 << 10), 0))
    result = _run(wd, 8)
    # Orbax logs its background writers' failures (with tracebacks) as they happen; the run then
    # ends with one line naming the file that could not be written.
    assert result.returncode == 1 and "Fatal Python error" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "No space left on device" in last, last
    assert str(mnt) in last
    filler.unlink()
    ckpt = checkpointer.Checkpointer(wd)
    assert ckpt.latest_step() == 2
    ckpt.close()
    result = _run(wd, 4)  # space again: resumes from the checkpoint before the failure
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resumed" in result.stderr and "from step 2" in result.stderr
    ckpt = checkpointer.Checkpointer(wd)
    assert ckpt.latest_step() == 4
    ckpt.close()
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_bad_documents_of_every_kind_are_counted_in_the_training_metrics(tmp_path):
  from bltjax.train import experiment, trainer
  from tests import test_bad_data
  root = tmp_path / "corpus"
  root.mkdir()
  pattern, expected, _, _ = test_bad_data.jsonl_corpus(root)
  cfg = experiment.tiny(experiment.load(DEBUG))
  cfg.patching.mode = "space"
  cfg.data.update(source="jsonl", paths=(str(root / pattern),), eval_fraction=0.0,
                  max_document_bytes=test_bad_data.MAX)
  cfg.train.update(steps=3, log_every=1, eval_every=0, eval_batches=0)
  wd = str(tmp_path / "wd")
  trainer.run(cfg, wd)  # bad documents never stop training
  records = [r for r in metrics.read_metrics(wd) if "loss" in r]
  assert len(records) == 3
  for kind, count in expected.items():  # 3 steps of 8 x 129 bytes: at least one full epoch
    assert sum(r[f"{kind}_docs"] for r in records) >= count, kind
