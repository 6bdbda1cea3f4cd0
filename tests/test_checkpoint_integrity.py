"""Checkpoint integrity: a damaged newest checkpoint falls back to an older one (moved aside, never
deleted), a changed config is an error that moves nothing, an interrupted save leaves nothing
behind, and read-only loads name the checkpoint they cannot read."""

import logging
import os
import shutil
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.checkpoint import checkpointer, repair
from bltjax.data.prefetch import ThreadPrefetcher
from bltjax.runtime import errors, sharding
from bltjax.train import experiment, optim, train_state as ts
from tests.gcs import gcs  # noqa: F401 (the fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Orbax's abandoned reads of a failed restore, reported when collected (bltjax quiets them).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def model():
  """(abstract state with shardings, state_at(step)): the tiny entropy model's train state, its
  params shifted by `step` so that each checkpoint holds different values."""
  cfg = experiment.entropy_stage_config(
      experiment.tiny(experiment.load(os.path.join(REPO, "experiments", "debug.py"))))
  mesh = sharding.make_mesh(cfg.mesh.shape)
  mod, opt = ts.build_model(cfg), optim.make_optimizer(cfg.optim, 10)
  abstract, shardings = ts.abstract_state(cfg, mod, opt, mesh)
  base = ts.init_state(cfg, mod, opt, mesh, shardings, 0)

  def state_at(step):
    return base.replace(step=jnp.int32(step), params=jax.tree.map(lambda p: p + step, base.params))
  return abstract, state_at


def data_iter(consumed=0):
  """The training loop's iterator type (a prefetcher over a grain iterator), `consumed` in."""
  it = ThreadPrefetcher(iter(grain.MapDataset.range(10_000).to_iter_dataset()), lambda x: x)
  for _ in range(consumed):
    next(it)
  return it


def save(workdir, model, steps):
  """A checkpoint per step; the iterator has handed out 10 * step elements at each."""
  _, state_at = model
  ck = checkpointer.Checkpointer(str(workdir), max_to_keep=5)
  for step in steps:
    it = data_iter(10 * step)
    ck.save(step, state_at(step), it, {"step": step}, {"meta_step": step})
    ck.wait()
    it.close()
  ck.close()
  return str(workdir / "checkpoints")


def truncate_state(ckpts, step):
  """Cuts the largest file of the step's state in half (an interrupted upload or a disk fault)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ckpts, str(step), "state"))
           for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  return biggest


def assert_unreadable(workdir, model, step):
  """The damage really breaks a plain restore (so that no test passes vacuously)."""
  ck = checkpointer.Checkpointer(str(workdir))
  with pytest.raises(Exception):  # noqa: B017 (TensorStore raises a bare Exception)
    ck.restore(step, model[0])
  ck.close()


def listing(ckpts):
  return sorted(os.listdir(ckpts))


def assert_state_of(state, model, step):
  want = model[1](step)
  assert int(state.step) == step
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, model, caplog):
  ckpts = save(tmp_path, model, [1, 2, 3])
  truncate_state(ckpts, 3)
  assert_unreadable(tmp_path, model, 3)
  os.mkdir(os.path.join(ckpts, "3.corrupt"))  # taken (an earlier fault): the next name is used
  it = data_iter()
  ck = checkpointer.Checkpointer(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    r = ck.restore_latest(model[0], it)
  assert r.step == 2 and r.config == {"step": 2} and r.metadata == {"meta_step": 2}
  assert_state_of(r.state, model, 2)
  assert next(r.data_iter) == 20  # the iterator too was restored from step 2
  it.close()
  warned = [m for m in caplog.messages if os.path.join(ckpts, "3") in m]
  assert any("cannot be read" in m and "OUT_OF_RANGE" in m for m in warned), caplog.messages
  assert any("moved" in m.lower() and "3.corrupt.1" in m for m in warned), caplog.messages
  assert listing(ckpts) == ["1", "2", "3.corrupt", "3.corrupt.1"]
  assert ck.latest_step() == 2 and list(ck.manager.all_steps()) == [1, 2]
  ck.close()
  again = checkpointer.Checkpointer(str(tmp_path))  # Orbax's listing ignores <step>.corrupt*
  assert again.latest_step() == 2 and again.latest_metadata() == (2, {"step": 2},
                                                                  {"meta_step": 2})
  again.close()


def test_every_checkpoint_unreadable_is_an_error_that_moves_nothing(tmp_path, model):
  ckpts = save(tmp_path, model, [1, 2])
  for step in (1, 2):
    truncate_state(ckpts, step)
    assert_unreadable(tmp_path, model, step)
  ck = checkpointer.Checkpointer(str(tmp_path))
  with pytest.raises(errors.CheckpointError) as e:
    ck.restore_latest(model[0], data_iter())
  message = str(e.value)
  assert "step 2: " in message and "step 1: " in message and ckpts in message
  assert "\n" not in message and "Nothing was moved" in message
  assert listing(ckpts) == ["1", "2"]
  ck.close()


def test_a_checkpoint_of_another_config_is_an_error_and_stays(tmp_path, model):
  ckpts = save(tmp_path, model, [1, 2])
  abstract = model[0]
  params = dict(abstract.params)
  emb = params["tok_embeddings"]["embedding"]
  params["tok_embeddings"] = {"embedding": jax.ShapeDtypeStruct(
      (emb.shape[0], 2 * emb.shape[1]), emb.dtype, sharding=emb.sharding)}
  params["extra"] = {"scale": params["norm"]["scale"]}
  ck = checkpointer.Checkpointer(str(tmp_path))
  with pytest.raises(errors.CheckpointError, match="does not fit this model") as e:
    ck.restore_latest(abstract.replace(params=params))
  message = str(e.value)
  assert "params/tok_embeddings/embedding: saved (260, 64), model needs (260, 128)" in message
  assert "missing params/extra/scale" in message and "nothing was moved" in message
  assert os.path.join(ckpts, "2") in message
  assert listing(ckpts) == ["1", "2"] and ck.latest_step() == 2
  ck.close()


def test_a_checkpoint_from_before_the_update_guard_says_so(tmp_path, model):
  abstract, state_at = model
  ck = checkpointer.Checkpointer(str(tmp_path))
  old = {"step": jnp.int32(1), "params": state_at(1).params, "opt_state": state_at(1).opt_state}
  ck.save(1, old, None, {}, {})  # the TrainState of earlier releases: no guard counters
  ck.wait()
  with pytest.raises(errors.CheckpointError, match=r"without the update guard.*init_from="):
    ck.restore_latest(abstract)
  assert listing(str(tmp_path / "checkpoints")) == ["1"]
  ck.close()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_unreadable_state_metadata_falls_back(tmp_path, model, damage):
  """The state's _METADATA (tree and shapes) cut or gone: damage, not another config."""
  ckpts = save(tmp_path, model, [1, 2])
  path = os.path.join(ckpts, "2", "state", "_METADATA")
  if damage == "truncate":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(path)
  ck = checkpointer.Checkpointer(str(tmp_path))
  assert ck.restore_latest(model[0]).step == 1
  assert listing(ckpts) == ["1", "2.corrupt"]
  ck.close()


def test_a_storage_error_is_not_damage(tmp_path, model, monkeypatch):
  """An unreachable bucket or a denied read says nothing about the files: nothing is moved."""
  ckpts = save(tmp_path, model, [1, 2])
  ck = checkpointer.Checkpointer(str(tmp_path))

  def unavailable(*args, **kwargs):
    raise ValueError("UNAVAILABLE: Error reading gs://bucket/run/checkpoints/2: connection reset")
  monkeypatch.setattr(ck.manager, "restore", unavailable)
  with pytest.raises(errors.CheckpointError, match="not the checkpoint: nothing was moved"):
    ck.restore_latest(model[0])
  assert listing(ckpts) == ["1", "2"]
  ck.close()


def test_missing_json_items_fall_back(tmp_path, model):
  ckpts = save(tmp_path, model, [1, 2, 3])
  shutil.rmtree(os.path.join(ckpts, "3", "meta"))
  ck = checkpointer.Checkpointer(str(tmp_path))
  assert ck.latest_metadata() == (2, {"step": 2}, {"meta_step": 2})
  assert listing(ckpts) == ["1", "2", "3.corrupt"]
  shutil.rmtree(os.path.join(ckpts, "2", "config"))
  r = ck.restore_latest(model[0])
  assert r.step == 1 and r.metadata == {"meta_step": 1} and r.data_iter is None
  assert_state_of(r.state, model, 1)
  assert listing(ckpts) == ["1", "2.corrupt", "3.corrupt"]
  ck.close()


def test_no_checkpoint_at_all(tmp_path, model):
  ck = checkpointer.Checkpointer(str(tmp_path))
  assert ck.restore_latest(model[0]) is None and ck.latest_metadata() is None
  ck.close()
  with pytest.raises(FileNotFoundError, match="no Orbax checkpoint found") as e:
    checkpointer.load_params(str(tmp_path))
  assert isinstance(e.value, errors.CheckpointError)


def test_processes_agree_on_the_step(tmp_path, model, monkeypatch):
  """Process 0 reads step 2, another process cannot: both fall back to step 1, process 0 moves
  step 2 aside and all synchronise (the collectives are faked: one process here)."""
  from jax.experimental import multihost_utils
  ckpts = save(tmp_path, model, [1, 2])
  others, synced = iter([repair.UNREADABLE, repair.OK]), []
  monkeypatch.setattr(repair, "multiprocess", lambda: True)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda code: np.array([code, next(others)]))
  monkeypatch.setattr(multihost_utils, "sync_global_devices", synced.append)
  ck = checkpointer.Checkpointer(str(tmp_path))
  r = ck.restore_latest(model[0])
  assert r.step == 1 and len(synced) == 1
  assert listing(ckpts) == ["1", "2.corrupt"]
  ck.close()


_INTERRUPTED_SAVE = """
import asyncio, os, sys, time
import jax.numpy as jnp
from orbax.checkpoint._src.path import atomicity
from bltjax.checkpoint import checkpointer

async def never(self):  # the save is killed before it commits, whatever the timing
  await asyncio.sleep(3600)
atomicity.AtomicRenameTemporaryPath.finalize = never
ck = checkpointer.Checkpointer(sys.argv[1])
ck.save(2, {"w": jnp.ones((256, 256))}, None, {}, {})
deadline = time.time() + 60
while time.time() < deadline and not os.path.isdir(
    os.path.join(ck.directory, "2.orbax-checkpoint-tmp", "state.orbax-checkpoint-tmp")):
  time.sleep(0.05)
time.sleep(0.5)  # some of the files written
print(sorted(os.listdir(ck.directory)), flush=True)
os._exit(0)  # as a SIGKILL: the asynchronous save never finishes
"""


def test_an_interrupted_save_is_cleaned_up(tmp_path):
  ck = checkpointer.Checkpointer(str(tmp_path))
  ck.save(1, {"w": jnp.zeros((256, 256))}, None, {}, {})
  ck.close()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", _INTERRUPTED_SAVE, str(tmp_path)], env=env,
                       cwd=REPO, check=True, capture_output=True, text=True).stdout
  ckpts = os.path.join(tmp_path, "checkpoints")
  assert "2.orbax-checkpoint-tmp" in out and listing(ckpts) == ["1", "2.orbax-checkpoint-tmp"]
  ck = checkpointer.Checkpointer(str(tmp_path))
  assert listing(ckpts) == ["1"] and ck.latest_step() == 1
  abstract = {"w": jax.ShapeDtypeStruct((256, 256), jnp.float32)}
  assert ck.restore_latest(abstract).step == 1
  ck.save(3, {"w": jnp.ones((256, 256))}, None, {}, {})
  ck.close()
  assert listing(ckpts) == ["1", "3"]


def test_read_only_loads_name_the_unreadable_checkpoint(tmp_path, model):
  ckpts = save(tmp_path, model, [1, 2])
  truncate_state(ckpts, 2)
  assert_unreadable(tmp_path, model, 2)
  bad = os.path.join(ckpts, "2")
  with pytest.raises(errors.CheckpointError) as e:
    checkpointer.load_params(str(tmp_path))
  message = str(e.value)
  assert message.startswith(f"{bad}: cannot read this checkpoint (")
  assert "OUT_OF_RANGE" in message and "older steps there: 1" in message and "\n" not in message
  with pytest.raises(errors.CheckpointError, match=f"^{bad}: cannot read"):
    checkpointer.restore_params(str(tmp_path), model[0].params)
  params = checkpointer.load_params(os.path.join(ckpts, "1"))[0]  # what the message suggests
  np.testing.assert_array_equal(params["norm"]["scale"], np.asarray(model[1](1).params["norm"][
      "scale"]))
  other = dict(model[0].params, extra=model[0].params["norm"])
  with pytest.raises(errors.CheckpointError, match="1: params do not fit this model: missing "
                     "extra/scale$"):
    checkpointer.restore_params(os.path.join(ckpts, "1"), other)
  shutil.rmtree(os.path.join(bad, "meta"))
  with pytest.raises(errors.CheckpointError, match=f"^{bad}: cannot read .*meta"):
    checkpointer.recorded_entropy_model(str(tmp_path))
  assert listing(ckpts) == ["1", "2"]  # read-only: nothing moved


_IN_A_BUCKET = """
import sys, grain, jax, numpy as np
from bltjax.checkpoint import checkpointer
run, phase = sys.argv[1], sys.argv[2]
state = {"params": {"w": np.arange(4096.0)}}
it = iter(grain.MapDataset.range(100).to_iter_dataset())
ck = checkpointer.Checkpointer(run)
if phase == "save":
  for step in (1, 2):
    next(it)
    ck.save(step, jax.tree.map(lambda x: x * step, state), it, {"c": step}, {"m": step})
  ck.close()
  sys.exit()
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
    x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), state)
assert checkpointer.find_checkpoint(run)[1] == 2  # step 3 has no commit file: never picked
try:
  checkpointer.load_params(run)
  raise AssertionError("the damaged step 2 was read")
except checkpointer.errors.CheckpointError as e:
  assert str(e).startswith(run + "/checkpoints/2: cannot read this checkpoint (ValueError: "
                           "OUT_OF_RANGE") and "older steps there: 1" in str(e), e
r = ck.restore_latest(abstract, it)
assert r.step == 1 and r.config == {"c": 1} and next(r.data_iter) == 1
np.testing.assert_array_equal(r.state["params"]["w"], state["params"]["w"])
assert ck.latest_step() == 1
ck.close()
"""


def test_fallback_in_a_bucket(gcs):  # noqa: F811 (the fixture)
  """gs://: a truncated object in the newest step -> restore from the previous, the step moved
  aside in the bucket; a step left without its commit file by a killed save is cleaned up."""
  run, prefix = gcs.gs("integrity/run"), "integrity/run/checkpoints/"

  def phase(name):
    return subprocess.run([sys.executable, "-c", _IN_A_BUCKET, run, name], cwd=REPO,
                          env=gcs.environ(), capture_output=True, text=True, timeout=120)
  assert phase("save").returncode == 0
  step2 = gcs.list(prefix + "2/")
  sizes = {n: len(gcs.read(n)) for n in step2 if n.startswith(prefix + "2/state/")}
  biggest = max(sizes, key=sizes.get)
  gcs.upload(biggest, gcs.read(biggest)[: sizes[biggest] // 2])
  gcs.upload(prefix + "3/state/_sharding", b"{}")  # a save killed before its commit
  proc = phase("restore")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"Moved the unreadable checkpoint {run}/checkpoints/2 aside" in proc.stderr
  names = gcs.list(prefix)
  assert [n for n in names if n.startswith(prefix + "2.corrupt/")] == [
      n.replace("/2/", "/2.corrupt/") for n in step2]
  assert not any(n.startswith((prefix + "2/", prefix + "3/")) for n in names), names
