"""The update guard: non-finite or spiking updates are never applied, counted on the devices, and
acted on by the train loop (stop, or skip up to train.max_skipped_steps in a row); nothing
non-finite is checkpointed."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bltjax.checkpoint import checkpointer
from bltjax.runtime import errors
from bltjax.train import experiment, metrics, step as step_lib, train_state as ts, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quadratic(params, batch):
  """A one-parameter-vector 'model': loss = scale * |w|^2 over one target byte."""
  return jnp.sum(params["w"] ** 2) * batch["scale"], jnp.float32(1.0)


def _stepper(lr=0.01, **guard):
  opt = optax.sgd(lr)
  fn = jax.jit(functools.partial(step_lib.train_step, loss_fn=_quadratic, optimizer=opt,
                                 lr_fn=lambda s: lr, microbatches=1, **guard))
  params = {"w": jnp.ones(4)}
  state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                        guard=ts.new_guard())
  return fn, state


def _batch(scale):
  return {"scale": jnp.float32(scale)}


def test_a_non_finite_loss_is_not_applied_and_is_counted():
  fn, state = _stepper()
  state, _ = fn(state, _batch(1.0))
  before = jax.device_get(state.params)
  state, m = fn(state, _batch(np.nan))
  np.testing.assert_array_equal(jax.device_get(state.params)["w"], before["w"])
  assert int(state.step) == 2  # the batch is consumed
  m = jax.device_get(m)
  assert (m["nonfinite_steps"], m["skipped_steps"], m["skip_streak"], m["last_skipped_step"]) == (
      1, 1, 1, 2)
  state, m = fn(state, _batch(1.0))  # a good step applies and ends the streak
  assert not np.array_equal(jax.device_get(state.params)["w"], before["w"])
  assert (int(m["skip_streak"]), int(m["nonfinite_steps"])) == (0, 1)


def test_an_update_that_overflows_the_params_is_not_applied():
  fn, state = _stepper(lr=1e38)  # finite loss and gradients, infinite new params
  state, m = fn(state, _batch(10.0))  # w - 1e38 * 20 overflows
  assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert int(m["nonfinite_steps"]) == 1
  np.testing.assert_array_equal(jax.device_get(state.params)["w"], np.ones(4))
  assert bool(step_lib.all_finite(state.params))


def test_loss_spikes_are_skipped_only_when_enabled():
  for factor, want in ((3.0, 1), (0.0, 0)):
    fn, state = _stepper(loss_spike_factor=factor, loss_spike_horizon=3)
    for _ in range(4):
      state, _ = fn(state, _batch(1.0))
    before = jax.device_get(state.params)["w"]
    state, m = fn(state, _batch(10.0))  # 10x the running mean
    assert int(m["spike_steps"]) == want and int(m["nonfinite_steps"]) == 0
    assert np.array_equal(jax.device_get(state.params)["w"], before) == bool(want)


def test_spikes_are_not_judged_before_the_window_fills():
  fn, state = _stepper(loss_spike_factor=3.0, loss_spike_horizon=5)
  state, _ = fn(state, _batch(1.0))
  state, m = fn(state, _batch(10.0))
  assert int(m["spike_steps"]) == 0


# -- the train loop ---------------------------------------------------------------------------------


def _tiny_lm(steps=6, **train_fields):
  cfg = experiment.entropy_stage_config(experiment.tiny(experiment.load(
      os.path.join(REPO, "experiments", "debug.py"))))
  cfg.train.update(dict(steps=steps, log_every=2, checkpoint_every=2, eval_every=0,
                        eval_batches=0) | train_fields)
  return cfg


@pytest.mark.long  # the same through the command line: tests/test_faults.py
def test_divergence_stops_the_run_and_keeps_the_good_checkpoints(tmp_path):
  wd = str(tmp_path / "wd")
  trainer.run(_tiny_lm(steps=2), wd)  # a good checkpoint at step 2
  cfg = _tiny_lm(steps=8)
  cfg.optim.lr = 1e30  # the next update overflows
  with pytest.raises(errors.TrainingDiverged,
                     match=r"since step 2 had a non-finite.*checkpoint \(step 2\) is intact"):
    trainer.run(cfg, wd)
  ckpt = checkpointer.Checkpointer(wd)
  assert ckpt.manager.all_steps() == [2]  # nothing saved after the bad step
  ckpt.close()
  params = checkpointer.load_params(wd)[0]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  logged = [r for r in metrics.read_metrics(wd) if "nonfinite_steps" in r]
  assert logged[-1]["nonfinite_steps"] >= 1


def test_skip_policy_skips_and_stops_after_too_many_in_a_row(tmp_path):
  cfg = _tiny_lm(steps=6, nonfinite="skip", max_skipped_steps=3)
  cfg.optim.lr = 1e30  # every update overflows
  with pytest.raises(errors.TrainingDiverged, match=r"updates in a row were skipped"):
    trainer.run(cfg, str(tmp_path / "wd"))
  skipped = [r["skipped_steps"] for r in metrics.read_metrics(str(tmp_path / "wd"))
             if "skipped_steps" in r]
  assert skipped == sorted(skipped) and skipped[-2] >= 1 and skipped[-1] > 3  # logged, then stop
