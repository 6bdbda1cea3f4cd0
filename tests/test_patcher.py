"""Where patches are cut: the packed-row rule, and host vs accelerator patching giving the same
patch_lengths (fp32), the same training run, exact resume and the same patch statistics."""

import dataclasses

import jax
import numpy as np
import pytest

from bltjax.checkpoint import checkpointer
from bltjax.model import patching, tokenizer
from bltjax.model.config import PatchingConfig
from bltjax.model.lm import TransformerLM
from bltjax.runtime import sharding
from bltjax.train import batch as batch_lib, experiment, metrics, patcher, trainer

from tests import tiny


def _pc(mode, **kw):
  fields = dict(mode=mode, threshold=None, threshold_add=None, monotonic=False, patch_size=None,
                max_patch_length=None) | kw
  return PatchingConfig(**fields)


def test_packed_rows_patch_at_document_boundaries():
  bos, eos = tokenizer.BOS_ID, tokenizer.EOS_ID
  tokens = np.array([[70, 71, eos, bos, 80, 81, 82, eos, bos, 90]])
  starts = patching.document_starts(tokens)
  assert starts.shape == (1, 11)
  assert sorted(np.flatnonzero(starts[0])) == [3, 4, 8, 9]  # BOS, after BOS, after EOS
  lengths, overflow = patching.cut_rows(jax.numpy.asarray(tokens), None,
                                        _pc("static", patch_size=100), 8)
  # Row start rule (0, 1) + document boundaries; the static patch never starts inside the row.
  np.testing.assert_array_equal(lengths[0], [1, 2, 1, 4, 1, 2, 0, 0])
  assert overflow[0] == 0


def test_overflowing_rows_are_merged_and_counted():
  tokens = jax.numpy.full((1, 12), 70)
  lengths, overflow = patching.cut_rows(tokens, None, _pc("byte"), 5)
  np.testing.assert_array_equal(lengths[0], [1, 1, 1, 1, 9])
  assert overflow[0] == 13 - 5


@pytest.fixture(scope="module")
def entropy_ckpt(tmp_path_factory):
  """A random-init tiny entropy model saved in the training layout."""
  cfg = tiny.entropy_config(window=16)
  model = TransformerLM(cfg)
  tokens = np.ones((1, 32), np.int32)
  params = sharding.unbox(jax.jit(model.init)(jax.random.key(3), tokens)["params"])
  path = str(tmp_path_factory.mktemp("entropy"))
  checkpointer.save_params(path, jax.device_get(params),
                         dict(model=dataclasses.asdict(cfg), model_type="entropy_model"), {})
  return path


def _rows(n_rows=8, seq_len=64, seed=0):
  """Packed rows with documents of random bytes (BOS/EOS inside the rows)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, 260, (n_rows, seq_len)).astype(np.int32)
  ids[:, 0] = tokenizer.BOS_ID
  ids[:, 20], ids[:, 21] = tokenizer.EOS_ID, tokenizer.BOS_ID
  mask = np.ones((n_rows, seq_len), np.float32)
  return dict(tokens=ids, targets=np.roll(ids, -1, 1), mask=mask)


def _patching(entropy_ckpt, placement, **pc):
  _, ent_config, _, _ = checkpointer.load_params(entropy_ckpt)
  return patcher.Patcher(_pc("entropy", **pc), 40, placement,
                          patcher.EntropySpec(entropy_ckpt, ent_config["model"]), None, {})


@pytest.mark.parametrize("rule", ["global", "monotonic", "combined", "max_length"])
def test_host_and_accelerator_patching_cut_the_same_patches(entropy_ckpt, rule):
  rows = _rows()
  # Thresholds at the medians of this (random-init) model's entropies and their increments, so
  # that every rule really decides.
  spec = _patching(entropy_ckpt, "host", threshold=0.0).entropy
  model, params = patcher.load_entropy_model(spec)
  h = np.asarray(jax.jit(patcher.entropies_fn(model))(params, rows["tokens"]))
  mid, step = float(np.median(h)), float(np.median(np.diff(h, axis=1)))
  pc = dict(global_=dict(threshold=mid), monotonic=dict(monotonic=True, threshold=step),
            combined=dict(threshold=mid, threshold_add=step),
            max_length=dict(threshold=mid, max_patch_length=3))[rule.replace("global", "global_")]
  host = _patching(entropy_ckpt, "host", **pc).host_transform().map(rows)
  mesh = sharding.make_mesh((2, 4, 1))
  cfg = experiment.tiny(experiment.load("experiments/debug.py"))
  cfg.data.seq_len = 64
  cfg.patching.update(device="accelerator", max_patches=40)
  specs = batch_lib.input_spec(cfg, 8, with_entropies=False)
  dp = patcher.DevicePatcher(_patching(entropy_ckpt, "accelerator", **pc), mesh, specs)
  device, stats = dp(batch_lib.to_global(rows, batch_lib.shardings(mesh, specs)))
  lengths = np.asarray(device["patch_lengths"])
  np.testing.assert_array_equal(lengths, host["patch_lengths"])
  assert 2 < (lengths > 0).sum(1).mean() < 39  # the rule really cuts
  assert device["patch_lengths"].sharding.spec == batch_lib.shardings(
      mesh, specs)["tokens"].spec  # stays sharded like the batch
  assert float(stats["patch_overflow"]) == host["patch_overflow"].sum()
  # The entropy model in 4 passes of 2 rows (the train step's microbatches): the same cuts.
  chunked = patcher.DevicePatcher(_patching(entropy_ckpt, "accelerator", **pc), mesh, specs,
                                  chunks=4)
  np.testing.assert_array_equal(np.asarray(chunked(batch_lib.to_global(
      rows, batch_lib.shardings(mesh, specs)))[0]["patch_lengths"]), lengths)
  # Padding: the patch slots that hold no patch, the same share on the host and on the device.
  np.testing.assert_allclose(float(stats["patch_padding"]), 1 - (lengths > 0).sum() / lengths.size,
                             rtol=1e-6)
  np.testing.assert_allclose(batch_lib.patch_padding(host["patch_lengths"]),
                             float(stats["patch_padding"]), rtol=1e-6)
  np.testing.assert_allclose(float(stats["bytes_per_patch"]),
                             batch_lib.host_stats(host | {"doc_flag_counts": np.zeros((8, 4))})
                             ["bytes_per_patch"], rtol=1e-6)


def test_stored_entropies_cut_the_same_patches_on_both_placements(entropy_ckpt):
  rows = _rows()
  rows["entropies"] = np.random.default_rng(1).uniform(0, 5, rows["tokens"].shape).astype(
      np.float32)
  meta = dict(entropy_model=dict(path="x", step=0, sha256="0"))
  p = patcher.Patcher(_pc("entropy", threshold=2.5), 40, "host", None, None, meta)
  host = p.host_transform().map(rows)
  mesh = sharding.make_mesh((1, 8, 1))
  cfg = experiment.tiny(experiment.load("experiments/debug.py"))
  cfg.data.seq_len = 64
  cfg.patching.update(device="accelerator", max_patches=40)
  specs = batch_lib.input_spec(cfg, 8, with_entropies=True)
  dp = patcher.DevicePatcher(dataclasses.replace(p, placement="accelerator"), mesh, specs)
  device, _ = dp(batch_lib.to_global(rows, batch_lib.shardings(mesh, specs)))
  assert "entropies" not in device
  np.testing.assert_array_equal(np.asarray(device["patch_lengths"]), host["patch_lengths"])
  want, _ = patching.cut_rows(rows["tokens"], rows["entropies"], p.config, 40)
  np.testing.assert_array_equal(host["patch_lengths"], want)


def _tiny_entropy_blt(entropy_ckpt, device, steps=6):
  cfg = experiment.tiny(experiment.load("experiments/debug.py"))
  cfg.patching.update(device=device, entropy_model_checkpoint=entropy_ckpt, threshold=None,
                      target_patch_size=3.0)
  cfg.train.update(steps=steps, log_every=1, checkpoint_every=3, eval_every=3, eval_batches=1)
  return cfg


def _records(workdir):
  return {r["step"]: r for r in metrics.read_metrics(workdir) if "loss" in r}


@pytest.mark.long  # a minute or so: in .ci/run's `pytest -m long`
def test_accelerator_patching_trains_resumes_and_logs_like_host_patching(tmp_path, entropy_ckpt):
  """Host patching straight through vs accelerator patching stopped at step 3 and resumed."""
  host, acc = str(tmp_path / "host"), str(tmp_path / "acc")
  trainer.run(_tiny_entropy_blt(entropy_ckpt, "host"), host)
  trainer.run(_tiny_entropy_blt(entropy_ckpt, "accelerator"), acc, stop_at_step=3)
  trainer.run(_tiny_entropy_blt(entropy_ckpt, "accelerator"), acc)
  a, b = _records(host), _records(acc)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for s in a:
    np.testing.assert_allclose(b[s]["loss"], a[s]["loss"], rtol=1e-6)
    # The same rows and patches before and after the resume (the data position is exact).
    assert b[s]["bytes_per_patch"] == pytest.approx(a[s]["bytes_per_patch"], rel=1e-6)
    assert b[s]["patch_overflow"] == a[s]["patch_overflow"]
    assert b[s]["patch_padding"] == pytest.approx(a[s]["patch_padding"], rel=1e-6)
    assert 0 < a[s]["patch_padding"] < 1
  evals = [r["eval_bpb"] for r in metrics.read_metrics(acc) if "eval_bpb" in r]
  want = [r["eval_bpb"] for r in metrics.read_metrics(host) if "eval_bpb" in r]
  np.testing.assert_allclose(evals, want, rtol=1e-5)
  # The calibrated threshold is the same and recorded in both runs' checkpoints.
  thresholds = [checkpointer.Checkpointer(w).metadata(6)[1]["patching_threshold"]
                for w in (host, acc)]
  assert thresholds[0] == thresholds[1]
