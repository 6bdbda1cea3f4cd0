"""Training: determinism, exact resume, restore onto another mesh, gradient accumulation, the
sharded step, config validation, and the quickstart command end to end."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from bltjax.checkpoint import checkpointer
from bltjax.runtime import sharding
from bltjax.train import (batch as batch_lib, experiment, metrics, optim, patcher, step as step_lib,
                          train_state as ts, trainer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, "experiments", "debug.py")


def tiny_blt(steps=6, **patching):
  cfg = experiment.tiny(experiment.load(DEBUG))
  cfg.patching.update(dict(mode="space") | patching)
  cfg.train.update(steps=steps, log_every=1, checkpoint_every=3, eval_every=0, eval_batches=0)
  return cfg


def losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def test_same_seed_same_losses(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  trainer.run(tiny_blt(steps=3), a)
  trainer.run(tiny_blt(steps=3), b)
  assert losses(a) == losses(b) and len(losses(a)) == 3
  c = tiny_blt(steps=3)
  c.seed = 1
  trainer.run(c, str(tmp_path / "c"))
  assert losses(str(tmp_path / "c")) != losses(a)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  trainer.run(tiny_blt(), straight)
  trainer.run(tiny_blt(), resumed, stop_at_step=3)
  assert sorted(losses(resumed)) == [1, 2, 3]
  trainer.run(tiny_blt(), resumed)  # the same command again: resumes at step 3
  assert losses(resumed) == losses(straight)  # bitwise, data order included
  assert checkpointer.Checkpointer(resumed).latest_step() == 6


@pytest.mark.long  # ~50 s: in .ci/run's `pytest -m long`
def test_restore_onto_a_different_mesh(tmp_path):
  """Saved on 8 devices (2x2x2), resumed in a new process on 4 devices (1x4x1)."""
  cfg = tiny_blt()
  cfg.mesh.shape = (2, 2, 2)
  reference, moved = str(tmp_path / "ref"), str(tmp_path / "moved")
  trainer.run(cfg, reference)
  trainer.run(cfg, moved, stop_at_step=3)
  script = (
      "from bltjax.runtime import process_setup; process_setup.set_defaults()\n"
      "import jax, sys; sys.path.insert(0, %r)\n"
      "assert jax.device_count() == 4\n"
      "from tests.test_train import tiny_blt; from bltjax.train import trainer\n"
      "cfg = tiny_blt(); cfg.mesh.shape = (1, 4, 1); trainer.run(cfg, %r)\n" % (REPO, moved))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=REPO)
  got, want = losses(moved), losses(reference)
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(4, 7)], [want[s] for s in range(4, 7)],
                             rtol=1e-5)


def _one_step(cfg, mesh, batch, microbatches, opt=None):
  model = ts.build_model(cfg)
  opt = opt or optim.make_optimizer(cfg.optim, 10)
  _, sh = ts.abstract_state(cfg, model, opt, mesh)
  state = ts.init_state(cfg, model, opt, mesh, sh, 0)
  fn = functools.partial(step_lib.train_step, loss_fn=step_lib.make_loss_fn(cfg, model),
                         optimizer=opt, lr_fn=optim.lr_schedule(cfg.optim, 10),
                         microbatches=microbatches)
  bsh = batch_lib.shardings(mesh, batch_lib.spec(cfg, len(batch["tokens"])))
  with sharding.mesh_context(mesh):
    step = jax.jit(fn, in_shardings=(sh, bsh), out_shardings=(sh, sharding.replicated(mesh)))
    for _ in range(2):
      state, m = step(state, batch)
  return jax.device_get(state.params), jax.device_get(m)


def _random_batch(cfg, rows):
  rng = np.random.default_rng(0)
  n = cfg.data.seq_len
  tokens = np.concatenate([np.ones((rows, 1)), rng.integers(4, 260, (rows, n))], 1)
  tokens = tokens.astype(np.int32)
  mask = np.ones((rows, n), np.float32)
  mask[1, n // 2:] = 0  # padding in one row: the loss normalises by real target bytes
  patch = patcher.setup(cfg, None, None).host_transform()
  lengths = patch.map(dict(tokens=tokens[:, :-1]))["patch_lengths"]
  return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], mask=mask, patch_lengths=lengths)


def test_gradient_accumulation_equals_the_large_batch():
  cfg = tiny_blt()
  mesh = sharding.make_mesh((1, 2, 1), devices=jax.devices()[:2])
  batch = _random_batch(cfg, 8)
  # Plain SGD with lr 1: parameter changes are the gradients themselves (AdamW would amplify
  # float-reordering noise in near-zero gradients).
  sgd = optax.sgd(1.0)
  want = _one_step(cfg, mesh, batch, microbatches=1, opt=sgd)
  got = _one_step(cfg, mesh, batch, microbatches=4, opt=sgd)
  _assert_same_step(got, want)
  np.testing.assert_allclose(got[1]["grad_norm"], want[1]["grad_norm"], rtol=1e-4)


def _assert_same_step(got, want):
  """(params, metrics) of two train steps agree: loss to rtol 1e-5, every parameter to 1e-5."""
  (p_got, m_got), (p_want, m_want) = got, want
  np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p_want, p_got)


def test_sharded_step_equals_single_device():
  cfg = tiny_blt()
  batch = _random_batch(cfg, 8)
  single = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  want = _one_step(cfg, single, batch, microbatches=1, opt=optax.sgd(1.0))
  got = _one_step(cfg, sharding.make_mesh((2, 2, 2)), batch, microbatches=1, opt=optax.sgd(1.0))
  _assert_same_step(got, want)


def test_runtime_settings_do_not_change_what_is_computed():
  """Attention chunking and looping, layer-loop unrolling and remat change how, not what."""
  cfg = tiny_blt()
  batch = _random_batch(cfg, 8)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  want = _one_step(cfg, mesh, batch, microbatches=1, opt=optax.sgd(1.0))
  cfg.model.runtime.update(attn_chunk=8, attn_loop=True, scan_unroll=2, remat_policy="full")
  _assert_same_step(_one_step(cfg, mesh, batch, microbatches=1, opt=optax.sgd(1.0)), want)


@pytest.mark.parametrize("field,value,message", [
    ("mesh.shape", (3, 1, 1), "mesh.shape=.*8 available devices"),
    ("train.batch_size", 6, "train.batch_size=6 .* data-parallel size"),
    ("patching.mode", "bpe", "patching.mode='bpe' is unknown"),
    ("model.encoder.attn_window", 4096, "model.encoder.attn_window=4096 is larger than "
     "data.seq_len"),
    ("model.latent.n_heads", 5, "model.latent.dim=128 is not divisible by model.latent.n_heads"),
    ("data.source", "s3", "data.source='s3'"),
    ("model.runtime.attn_chunk", 12, "model.runtime.attn_chunk=12 does not divide the attention "
     "window 32"),
    ("model.runtime.scan_unroll", 0, "model.runtime.scan_unroll must be >= 1"),
])
def test_invalid_configs_name_the_field(field, value, message):
  cfg = tiny_blt()
  section, _, name = field.rpartition(".")
  node = cfg
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=message):
    experiment.validate(cfg, 8)


def test_rows_per_device_sets_the_microbatches_for_any_device_count():
  """One config, many machines: batch_size / (rows_per_device x data*fsdp) microbatches."""
  cfg = experiment.load(os.path.join(REPO, "experiments", "8b.py"))
  assert (cfg.train.rows_per_device, cfg.train.microbatches) == (1, None)
  for devices, want in ((128, 8), (256, 4), (64, 16), (8, 128)):  # v5p-256, v6e-256, h100x64/x8
    assert experiment.microbatches(cfg, devices) == want
  cfg.train.microbatches = 8
  assert experiment.microbatches(cfg, 128) == 8  # an explicit value that agrees is fine
  with pytest.raises(ValueError, match=r"train.microbatches=8 contradicts "
                     r"train.rows_per_device=1, which gives 128 on 8 devices"):
    experiment.microbatches(cfg, 8)
  cfg.train.microbatches, cfg.train.rows_per_device = None, 3
  with pytest.raises(ValueError, match=r"train.batch_size=1024 is not a multiple of "
                     r"train.rows_per_device=3 x data\*fsdp=128"):
    experiment.microbatches(cfg, 128)
  small = tiny_blt()  # no rows_per_device: microbatches as written
  assert experiment.microbatches(small, 8) == small.train.microbatches


def test_quickstart_command_end_to_end(tmp_path):
  """`python -m bltjax.main --config=experiments/debug.py` (tiny): both stages and outputs. The
  BLT stage reads through a grain worker process, as the quickstart's does: the run ends clean
  (no shared memory left for the resource tracker to report) and its last line says where the
  model is and how to generate from it."""
  workdir = str(tmp_path / "wd")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "bltjax.main", f"--config={DEBUG}:tiny",
                         f"--workdir={workdir}", "--config.data.num_workers=1"],
                        env=env, cwd=str(tmp_path), capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "leaked shared_memory" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stdout.strip().splitlines()[-1] == (
      f"Trained BLT in {workdir}; generate from it: python -m bltjax.generate "
      f"--checkpoint={workdir} --prompt='import '")
  for stage in (workdir, os.path.join(workdir, "entropy_model")):
    records = metrics.read_metrics(stage)
    assert {"step", "loss", "bpb", "lr", "grad_norm", "bytes_per_sec",
            "data_wait_fraction"} <= set(records[0])
    assert any("eval_bpb" in r for r in records)
    assert os.listdir(os.path.join(stage, "tensorboard"))
    assert checkpointer.Checkpointer(stage).latest_step() == 4
  blt_records = metrics.read_metrics(workdir)
  assert "bytes_per_patch" in blt_records[0]
  _, meta = checkpointer.Checkpointer(workdir).metadata(4)
  ent = meta["entropy_model"]
  assert ent["path"] == os.path.join(workdir, "entropy_model") and len(ent["sha256"]) == 64
  params, _, _, _ = checkpointer.load_params(ent["path"])
  assert checkpointer.params_hash(params) == ent["sha256"]
  assert meta["patching_threshold"] > 0
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["patching"]["mode"] == "entropy"


def _main(workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return [sys.executable, "-m", "bltjax.main", f"--config={DEBUG}:tiny", f"--workdir={workdir}",
          "--config.train.steps=12", "--config.train.checkpoint_every=3", *extra], env


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory):
  """The 12-step tiny quickstart run, start to end without interruption."""
  ref = str(tmp_path_factory.mktemp("uninterrupted") / "ref")
  cmd, env = _main(ref)
  subprocess.run(cmd, check=True, env=env, cwd=os.path.dirname(ref))
  return losses(ref)


def _signal_after(workdir, step, sig, **popen_kw):
  """Starts the run and sends `sig` once its checkpoint of `step` exists; returns the process."""
  import time
  cmd, env = _main(workdir)
  proc = subprocess.Popen(cmd, env=env, cwd=os.path.dirname(workdir), **popen_kw)
  target = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + 300
  while not os.path.exists(target) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  assert os.path.exists(target), f"the run ended before its step-{step} checkpoint"
  proc.send_signal(sig)
  return proc, cmd, env


@pytest.mark.long  # more kills, one during a save: tests/test_faults.py
def test_sigkill_then_rerun_continues_with_the_same_losses(tmp_path, uninterrupted_losses):
  """Kill -9 during the BLT stage; the same command resumes and matches an uninterrupted run."""
  import signal
  killed = str(tmp_path / "killed")
  proc, cmd, env = _signal_after(killed, 6, signal.SIGKILL, stderr=subprocess.DEVNULL)
  proc.wait()
  assert checkpointer.Checkpointer(killed).latest_step() < 12
  subprocess.run(cmd, check=True, env=env, cwd=str(tmp_path))
  assert losses(killed) == uninterrupted_losses


@pytest.mark.long
def test_sigterm_checkpoints_exits_zero_and_resumes(tmp_path, uninterrupted_losses):
  """Preemption: SIGTERM -> checkpoint at the next step boundary, exit 0; the rerun continues
  with the losses of an uninterrupted run."""
  import signal
  run = str(tmp_path / "run")
  proc, cmd, env = _signal_after(run, 3, signal.SIGTERM, stderr=subprocess.PIPE)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err.decode()[-2000:]
  assert 3 <= checkpointer.Checkpointer(run).latest_step() < 12 and b"preempted" in err
  subprocess.run(cmd, check=True, env=env, cwd=str(tmp_path))
  assert losses(run) == uninterrupted_losses
