"""Entry points restart once with glibc malloc settings, keep their argv, and respect opt-outs."""

import os
import subprocess
import sys

import pytest

from bltjax.runtime import process_setup

_PROGRAM = ("import os, sys; from bltjax.runtime import process_setup; process_setup.reexec_with_malloc_tuning(); "
            "print(os.environ.get('GLIBC_TUNABLES'), os.getpid(), sys.argv[1:])")


def _run(env_update, *args):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BLTJAX_MALLOC_TUNING")}
  env.update(env_update)
  proc = subprocess.Popen([sys.executable, "-c", _PROGRAM, *args], env=env, text=True,
                          stdout=subprocess.PIPE)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0
  tunables, pid, argv = out.strip().split(" ", 2)
  return tunables, int(pid) == proc.pid, argv


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_reexec_applies_malloc_tunables_in_the_same_process():
  tunables, same_pid, argv = _run({}, "--flag=1", "x")
  assert tunables == process_setup.MALLOC_TUNABLES
  assert same_pid  # exec, not a child: signals and PIDs seen by launchers stay valid
  assert argv == "['--flag=1', 'x']"


def test_reexec_respects_opt_out_and_user_tunables():
  assert _run({"BLTJAX_MALLOC_TUNING": "0"})[0] == "None"
  assert _run({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})[0] == "glibc.malloc.arena_max=2"
