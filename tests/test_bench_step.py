"""`python -m bltjax.bench step`: real train steps of a config per attention backend."""

import os

import numpy as np
import pytest

from bltjax.bench import step as bench_step
from bltjax.model import patching
from bltjax.train import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
  return experiment.tiny(experiment.load(os.path.join(REPO, "experiments", "debug.py")))


def test_the_synthetic_batch_is_a_valid_batch_of_the_config():
  config = _tiny()
  batch = bench_step.synthetic_batch(config, 8, bytes_per_patch=4.5, seed=0)
  n, p = config.data.seq_len, config.patching.max_patches
  assert batch["patch_lengths"].shape == (8, p) and batch["tokens"].shape == (8, n)
  patching.validate_patch_lengths(batch["patch_lengths"], n)  # covers n + 1 positions per row
  np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
  mean = (n + 1) / (batch["patch_lengths"] > 0).sum(1).mean()
  assert 3 < mean < 6, mean  # about the requested 4.5 bytes per patch


@pytest.mark.long  # ~50 s: two compiled steps, one in Pallas interpret mode
def test_steps_run_per_backend_on_this_machine():
  """Real steps on the 8 test devices (FSDP): figures for xla and splash (interpret mode)."""
  config = _tiny()
  results = bench_step.run(config, attentions=["xla", "splash"], steps=1, warmup=1,
                           bytes_per_patch=4.5)
  assert [r.backend for r in results] == ["xla", "splash"]
  for r in results:
    assert r.seconds > 0 and r.bytes_per_sec > 0 and 0 < r.mfu < 1
    assert 0 < r.attention_share
