"""Two processes on this machine (CPU devices, localhost coordinator) train like one process with
the same global batch and mesh, patching on the accelerators (here: the global CPU mesh)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from bltjax.train import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, "experiments", "debug.py")


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "bltjax.main", f"--config={DEBUG}:tiny", f"--workdir={workdir}",
          "--config.data.shards=2", "--config.train.steps=4", "--config.train.log_every=1",
          "--config.entropy_model.train.steps=2",
          # The entropy model patches on the global mesh, across both processes.
          "--config.patching.device=accelerator", *extra]


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


@pytest.mark.long
def test_two_processes_match_one(tmp_path):
  """launch/local_multiprocess.sh (2 processes x 2 devices) vs one process with 4 devices."""
  one = str(tmp_path / "one")
  subprocess.run(_cmd(one), check=True, env=_env(4), cwd=str(tmp_path))
  two = str(tmp_path / "two")
  env = dict(os.environ, NUM_PROCESSES="2", DEVICES_PER_PROCESS="2")
  subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh")] + _cmd(two)[3:],
                 check=True, env=env, cwd=str(tmp_path))
  want = {r["step"]: r["loss"] for r in metrics.read_metrics(one) if "loss" in r}
  got = {r["step"]: r["loss"] for r in metrics.read_metrics(two) if "loss" in r}
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  # Only process 0 writes the metrics; both processes checkpoint their own data state.
  assert len(metrics.read_metrics(two)) == len(metrics.read_metrics(one))
  data = os.path.join(two, "checkpoints", "4", "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data))
