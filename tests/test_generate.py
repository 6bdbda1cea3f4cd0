"""Cached generation equals recomputation and the `transformers` port; import/export round trips."""

import json
import logging
import os

import jax
import numpy as np
import pytest
import torch

from bltjax import BLT, generate, tokenizer
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.config import PatchingConfig
from bltjax.model.entropy_model import EntropyModel
from tests import tiny
from tests.hf_models import make_hf_blt, random_tokens

PROMPTS = [b"def main(argv):\n  ", "Byte Latent Transformer".encode(),
           b"\x00\xff invalid utf-8 is just bytes", b""]


def random_blt(seed=0, *, window=8, entropy_window=6, mode="entropy", threshold=None,
               max_patch_length=None, **cfg_kw):
  """A randomly initialised BLT + entropy model (tiny), with a threshold cutting mixed patches."""
  cfg = tiny.blt_config(window=window, **cfg_kw)
  ecfg = tiny.entropy_config(window=entropy_window)
  tokens = np.ones((1, 8), np.int32)
  params = jax.jit(ByteLatentTransformer(cfg).init)(jax.random.key(seed), tokens,
                                                    np.ones((1, 9), np.int32))["params"]
  eparams = jax.jit(EntropyModel(ecfg).init)(jax.random.key(seed + 1), tokens)["params"]
  unbox = lambda t: jax.tree.map(lambda x: x.unbox(), t, is_leaf=lambda x: hasattr(x, "unbox"))  # noqa
  params, eparams = unbox(params), unbox(eparams)
  if mode == "entropy" and threshold is None:  # the median entropy: about half the bytes start
    calib = BLT(cfg, params, patching_cfg=PatchingConfig("byte", None, None, False, None, None),
                entropy_cfg=ecfg, entropy_params=eparams)
    threshold = float(np.median(calib.entropies(random_tokens(np.random.default_rng(0), 2, 64))))
  pc = PatchingConfig(mode=mode, threshold=threshold, threshold_add=None, monotonic=False,
                      patch_size=3 if mode == "static" else None,
                      max_patch_length=max_patch_length)
  return BLT(cfg, params, patching_cfg=pc, entropy_cfg=ecfg, entropy_params=eparams,
             max_context=1024)


@pytest.mark.parametrize("variant", [
    dict(),                                              # entropy patching, windows 8 and 6
    dict(max_patch_length=3, enc_layers=2, all_enc=True, all_dec=False, k=3),
    dict(mode="space"),
    dict(mode="static"),
])
def test_cached_generation_equals_recomputation(variant):
  """Byte for byte, batched prompts of different lengths, many patches and windows crossed."""
  blt = random_blt(**variant)
  cached = blt.generate_bytes(PROMPTS, max_new_bytes=90, stop_at_eos=False)
  again = blt.generate_bytes(PROMPTS, max_new_bytes=90, stop_at_eos=False, recompute=True)
  assert cached == again
  assert sum(len(c) for c in cached) > 200  # (special ids are dropped from the bytes)
  state_patches = blt.patch_lengths(tokenizer.encode(PROMPTS[0] + cached[0], add_eos=False)[None])
  assert (state_patches > 0).sum() > 20, "the output should cross many patch boundaries"


def test_cached_generation_across_the_512_byte_window():
  """Default 512-byte windows (the released models'), outputs longer than the window."""
  blt = random_blt(seed=3, window=512, entropy_window=512)
  prompts = [b"one", b"x" * 40]
  cached = blt.generate_bytes(prompts, max_new_bytes=560, stop_at_eos=False)
  again = blt.generate_bytes(prompts, max_new_bytes=560, stop_at_eos=False, recompute=True)
  assert cached == again and len(cached[1]) > 512


def test_documents_inside_a_prompt():
  blt = random_blt(seed=4)
  ids = np.concatenate([tokenizer.encode("first"), tokenizer.encode("second", add_eos=False)])
  tokens, lengths = ids[None].astype(np.int32), np.array([len(ids)], np.int32)
  tokens = np.concatenate([tokens, np.zeros((1, 40), np.int32)], axis=1)
  gen = blt._generator
  one, _ = blt._jit_steps
  outs = []
  for recompute in (False, True):
    state = gen.init_state(tokens, lengths, 0)
    while int(state.t) < tokens.shape[1] - 1:
      state = one(blt.params, blt.entropy_params, state, generate.Sampling(stop_at_eos=False),
                  recompute=recompute)
    outs.append(np.asarray(state.tokens))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_sampling_is_reproducible():
  blt = random_blt(seed=1)
  a = blt.generate_bytes(PROMPTS[:2], max_new_bytes=30, temperature=1.0, seed=7)
  b = blt.generate_bytes(PROMPTS[:2], max_new_bytes=30, temperature=1.0, seed=7)
  c = blt.generate_bytes(PROMPTS[:2], max_new_bytes=30, temperature=1.0, seed=8)
  assert a == b and a != c
  greedy = blt.generate_bytes(PROMPTS[:2], max_new_bytes=30, stop_at_eos=False)
  nucleus = blt.generate_bytes(PROMPTS[:2], max_new_bytes=30, temperature=1.0, top_p=1e-6,
                               stop_at_eos=False)
  assert nucleus == greedy  # a tiny nucleus keeps only the most likely byte
  assert isinstance(blt.generate(["hi"], max_new_bytes=5)[0], str)


def test_prompt_errors_and_truncation(caplog):
  blt = random_blt()
  blt.max_context = 64
  with pytest.raises(ValueError, match="does not fit the model's context of 64 bytes"):
    blt.generate_bytes(["x"], max_new_bytes=64)
  with pytest.raises(TypeError, match="list"):
    blt.generate_bytes("a single string", max_new_bytes=4)
  with caplog.at_level(logging.WARNING):
    out = blt.generate_bytes([b"y" * 100], max_new_bytes=8, stop_at_eos=False)
  assert "keeping its last 56" in caplog.text and len(out[0]) <= 8
  assert len(blt.generate_bytes([""], max_new_bytes=8, stop_at_eos=False)[0]) <= 8


def test_streaming_gives_the_same_bytes():
  blt = random_blt(seed=2)
  chunks = []
  out = blt.generate_bytes([PROMPTS[1]], max_new_bytes=40, stop_at_eos=False,
                           on_bytes=chunks.append)
  assert b"".join(chunks) == out[0]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("hf_gen"))
  calib = random_tokens(np.random.default_rng(0), 2, 48)
  model = make_hf_blt(directory, calib_tokens=calib, window=16, patcher_window=12)
  return model, directory


def test_greedy_generation_matches_transformers(hf_pair):
  model, directory = hf_pair
  blt = BLT.from_hf(directory)
  for prompt in PROMPTS[:3]:
    ids = torch.tensor(tokenizer.encode(prompt, add_eos=False)[None].astype(np.int64))
    with torch.no_grad():
      out = model.generate(input_ids=ids, max_new_tokens=80, do_sample=False, use_cache=False)
    theirs = tokenizer.decode_bytes(out[0, ids.shape[1]:].numpy())
    assert blt.generate_bytes([prompt], max_new_bytes=80, stop_at_eos=False)[0] == theirs


def test_hf_orbax_hf_round_trip_is_lossless(hf_pair, tmp_path):
  _, directory = hf_pair
  blt = BLT.from_hf(directory)
  blt.save(str(tmp_path / "orbax"))
  back = BLT.from_checkpoint(str(tmp_path / "orbax"))
  back.save(str(tmp_path / "hf"), format="hf")
  from safetensors.numpy import load_file
  a = load_file(os.path.join(directory, "model.safetensors"))
  b = load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  from transformers import BltForCausalLM
  reloaded = BltForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  tokens = random_tokens(np.random.default_rng(5), 1, 40)
  lengths = blt.patch_lengths(tokens)
  with torch.no_grad():
    theirs = reloaded(input_ids=torch.tensor(tokens), patch_lengths=torch.tensor(lengths),
                      use_cache=False).logits.numpy()
  np.testing.assert_allclose(back.logits(tokens, lengths), theirs, atol=1e-4, rtol=0)
  with open(tmp_path / "hf" / "config.json") as f:
    assert json.load(f)["patching_threshold"] == blt.patching_config.threshold


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny two-stage run of experiments/debug.py (the quickstart), as `main` writes it."""
  from bltjax import configs, train
  workdir = str(tmp_path_factory.mktemp("debug_run") / "wd")
  train.run(configs.tiny(configs.load(os.path.join(os.path.dirname(__file__), "..",
                                                   "experiments", "debug.py"))), workdir)
  return workdir


def test_workdir_generates_and_exports_to_both_formats(trained_workdir, tmp_path):
  blt = BLT.from_checkpoint(trained_workdir)
  assert blt.patching_config.mode == "entropy" and blt.entropy_params is not None
  out = blt.generate_bytes([b"import os\n"], max_new_bytes=40, stop_at_eos=False)
  assert out[0] == blt.generate_bytes([b"import os\n"], max_new_bytes=40, stop_at_eos=False,
                                      recompute=True)[0]
  tokens = tokenizer.encode(b"def f(x):\n  return x + 1\n", add_eos=False)[None]
  want = blt.logits(tokens)

  BLT.load(trained_workdir).save(str(tmp_path / "orbax"), format="orbax")
  np.testing.assert_array_equal(BLT.load(str(tmp_path / "orbax")).logits(tokens), want)

  blt.save(str(tmp_path / "hf"), format="hf")
  from transformers import BltForCausalLM
  peer = BltForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  with torch.no_grad():
    theirs = peer(input_ids=torch.tensor(tokens.astype(np.int64)),
                  patch_lengths=torch.tensor(blt.patch_lengths(tokens)),
                  use_cache=False).logits.numpy()
  np.testing.assert_allclose(want, theirs, atol=1e-4, rtol=0)
  np.testing.assert_allclose(BLT.load(str(tmp_path / "hf")).logits(tokens), want, atol=1e-5)


def test_export_and_generate_commands(trained_workdir, tmp_path):
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  out = str(tmp_path / "bf16")
  subprocess.run([sys.executable, "-m", "bltjax.export", f"--workdir={trained_workdir}",
                  f"--out={out}", "--format=hf", "--dtype=bfloat16"], check=True, env=env)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  res = subprocess.run([sys.executable, "-m", "bltjax.generate", f"--checkpoint={out}",
                        "--prompt=import sys", "--max_new_bytes=16"], check=True, env=env,
                       capture_output=True)
  assert res.stdout.startswith(b"import sys") and len(res.stdout) > len(b"import sys")


def test_converted_hf_model_continues_pretraining(hf_pair, tmp_path):
  """python -m bltjax.convert, then main with init_from: training starts from Meta-format
  weights, and its patches come from the converted entropy model."""
  import dataclasses
  import subprocess
  import sys
  from bltjax import checkpoint, configs, metrics, train, train_state as ts
  from bltjax.model.config import to_dict
  _, directory = hf_pair
  out = str(tmp_path / "converted")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  subprocess.run([sys.executable, "-m", "bltjax.convert", f"--hf_dir={directory}",
                  f"--out={out}"], check=True, env=env)
  blt = BLT.from_hf(directory)
  cfg = configs.tiny(configs.load(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                               "debug.py")))
  model = dataclasses.replace(blt.config, runtime=dataclasses.replace(blt.config.runtime))
  cfg.model = to_dict(model)
  cfg.patching.update(threshold=blt.patching_config.threshold, max_patches=129)
  cfg.init_from = out
  cfg.train.update(steps=2, log_every=1, eval_every=0, eval_batches=0)
  # The state a fresh run starts from holds exactly the converted weights.
  from bltjax import optim, sharding
  mesh = sharding.make_mesh(cfg.mesh.shape)
  opt = optim.make_optimizer(cfg.optim, 2)
  abstract, sh = ts.abstract_state(cfg, ts.build_model(cfg), opt, mesh)
  state = ts.init_state_from(cfg, opt, mesh, abstract, sh, out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state.params, blt.params)
  workdir = str(tmp_path / "wd")
  train.run(cfg, workdir)
  assert [r["step"] for r in metrics.read_metrics(workdir) if "loss" in r] == [1, 2]
  _, meta = checkpoint.Checkpointer(workdir).metadata(2)
  assert meta["entropy_model"]["path"] == os.path.join(out, "entropy_model")
  assert meta["entropy_model"]["sha256"] == checkpoint.params_hash(blt.entropy_params)
