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


def test_backend_flags_are_added_only_where_the_user_has_not_set_them(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=false --xla_foo=1")
  monkeypatch.delenv("LIBTPU_INIT_ARGS", raising=False)
  process_setup.set_defaults()
  xla = os.environ["XLA_FLAGS"].split()
  assert "--xla_gpu_enable_latency_hiding_scheduler=false" in xla  # the user's choice stays
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in xla
  assert "--xla_foo=1" in xla
  assert set(process_setup.CPU_FLAGS + process_setup.GPU_FLAGS[1:]) <= set(xla)
  assert os.environ["LIBTPU_INIT_ARGS"].split() == list(process_setup.TPU_FLAGS)
  process_setup.set_defaults()  # idempotent
  assert os.environ["XLA_FLAGS"].split() == xla


def test_jax_starts_with_the_default_flags():
  """XLA aborts at start-up on a flag it does not know: every default must be one of this jax's."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}
  program = ("from bltjax.runtime import process_setup; process_setup.set_defaults()\n"
             "import os, jax, jax.numpy as jnp\n"
             "assert all(f in os.environ['XLA_FLAGS'] for f in process_setup.GPU_FLAGS)\n"
             "print(float(jax.jit(lambda x: x @ x)(jnp.ones((4, 4))).sum()))")
  out = subprocess.run([sys.executable, "-c", program], env=env | {"JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "64.0"
