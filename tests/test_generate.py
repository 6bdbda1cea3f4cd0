"""Cached generation equals recomputation and the `transformers` port; import/export round trips."""

import functools
import json
import logging
import os

import jax
import numpy as np
import pytest
import torch

from bltjax import BLT
from bltjax.inference import generator, sampling
from bltjax.model import tokenizer
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.config import PatchingConfig
from bltjax.model.lm import TransformerLM
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
  eparams = jax.jit(TransformerLM(ecfg).init)(jax.random.key(seed + 1), tokens)["params"]
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


@pytest.mark.parametrize("variant, options", [
    (dict(), True),                                      # entropy patching, windows 8 and 6
    (dict(max_patch_length=3, enc_layers=2, all_enc=True, all_dec=False, k=3), True),
    (dict(mode="space"), False),
    (dict(mode="static"), False),
])
def test_cached_generation_equals_recomputation(variant, options):
  """Byte for byte, batched prompts of different lengths, many patches and windows crossed."""
  blt = random_blt(**variant)
  cached = blt.generate_bytes(PROMPTS, max_new_bytes=90, stop_at_eos=False)
  again = blt.generate_bytes(PROMPTS, max_new_bytes=90, stop_at_eos=False, recompute=True)
  assert cached == again
  assert sum(len(c) for c in cached) > 200  # (special ids are dropped from the bytes)
  state_patches = blt.patch_lengths(tokenizer.encode(PROMPTS[0] + cached[0], add_eos=False)[None])
  assert (state_patches > 0).sum() > 20, "the output should cross many patch boundaries"
  if options:  # a repetition penalty, top_k (no-op for greedy), stops that end rows early
    stop = [bytes([b]) for b in sorted(set(cached[0][45:]))[:6]] + [cached[1][30:33]]
    opts = dict(max_new_bytes=90, stop_at_eos=False, stop=stop, repetition_penalty=1.3, top_k=5)
    cached = blt.generate_bytes(PROMPTS, **opts)
    assert cached == blt.generate_bytes(PROMPTS, recompute=True, **opts)
    assert min(len(c) for c in cached) < 80, "some row should stop early"


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
      state = one(blt.params, blt.entropy_params, state, generator.Sampling(stop_at_eos=False),
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


# -- generation options: top_k, stop, repetition_penalty ---------------------------------------

OPT_PROMPTS = [b"def main(argv):\n  ", b"\x00\xff invalid utf-8 is just bytes"]
OPT_NEW = 48  # every options test uses these prompts and length: one buffer shape to compile


@pytest.fixture(scope="module")
def opt_blt():
  return random_blt(seed=5)


def _buffer(blt, sampler, stop=()):
  """(ids [B, N], prompt lengths, last position written) after generating OPT_NEW bytes: the
  buffer `generate_bytes` cuts its output from (same compiled loop)."""
  stops = sampling.encode_stops(stop, blt.max_context)
  tokens, lengths = generator.prepare_prompts(OPT_PROMPTS, OPT_NEW, blt.max_context)
  state = blt._generator.init_state(tokens, lengths, 0, sampling.stop_arrays(stops))
  state = blt._jit_steps[1](blt.params, blt.entropy_params, state, sampler)
  return np.asarray(state.tokens), lengths, int(state.t)


def _choices(blt, tokens, lengths, upto):
  """Per generated byte: (its id, the logits [V] it was chosen from, ids seen before it)."""
  logits = blt.logits(tokens[:, :upto + 1])
  for r in range(tokens.shape[0]):
    for p in range(lengths[r], upto + 1):
      seen = np.unique(tokens[r, :p])
      yield tokens[r, p], logits[r, p - 1], seen[seen >= tokenizer.OFFSET]


def test_top_k(opt_blt):
  assert opt_blt.generate_bytes(OPT_PROMPTS, OPT_NEW, temperature=1.0, stop_at_eos=False,
                                top_k=1, seed=3) == opt_blt.generate_bytes(
                                    OPT_PROMPTS, OPT_NEW, stop_at_eos=False)
  k = 3
  tokens, lengths, upto = _buffer(opt_blt, sampling.Sampling(5.0, stop_at_eos=False, top_k=k))
  ranks = [int((lg > lg[c] + 1e-4).sum()) for c, lg, _ in _choices(opt_blt, tokens, lengths, upto)]
  assert max(ranks) < k, "a byte outside the top k was sampled"
  assert len(set(ranks)) == k, "at a high temperature all of the top k should come up"


def test_repetition_penalty(opt_blt):
  gen = lambda penalty: opt_blt.generate_bytes(  # noqa: E731
      OPT_PROMPTS, OPT_NEW, stop_at_eos=False, repetition_penalty=penalty)
  penalty = 4.0
  assert gen(1.0) == opt_blt.generate_bytes(OPT_PROMPTS, OPT_NEW, stop_at_eos=False) != gen(penalty)
  tokens, lengths, upto = _buffer(opt_blt, sampling.Sampling(stop_at_eos=False,
                                                             repetition_penalty=penalty))
  for chosen, lg, seen in _choices(opt_blt, tokens, lengths, upto):
    want = lg.copy()  # by hand: HF/CTRL, prompt and generated bytes, specials excluded
    want[seen] = np.where(lg[seen] > 0, lg[seen] / penalty, lg[seen] * penalty)
    assert want[chosen] >= want.max() - 1e-4
  # The jitted penalty itself, on a hand-made vector (BOS is special and never penalised).
  seen_3xV = sampling.mark_seen(jax.numpy.zeros((3, 260), bool), np.array([1, 5, 6]))  # 1: BOS
  lg = np.zeros((3, 260), np.float32)
  lg[:, [1, 5, 6, 7]] = [3.0, 2.0, -2.0, 1.0]
  got = np.asarray(sampling.penalize(lg, seen_3xV, 2.0))[:, [1, 5, 6, 7]]
  np.testing.assert_array_equal(got, [[3, 2, -2, 1], [3, 1, -2, 1], [3, 2, -4, 1]])


def _stop_from(ids, lo, n, avoid, pred=lambda s: True):
  """(i, bytes): n generated bytes first occurring at i >= lo (no special ids), in no `avoid`."""
  for i in range(lo, len(ids) - n):
    s = tokenizer.decode_bytes(ids[i:i + n])
    if (len(s) == n and tokenizer.decode_bytes(ids[:i + n - 1]).find(s) == -1
        and not any(s in a for a in avoid) and pred(s)):
      return i, s
  raise AssertionError("no usable stop sequence in the output")


def test_stop_sequences(opt_blt):
  blt, greedy = opt_blt, sampling.Sampling(stop_at_eos=False)
  tokens, lengths, _ = _buffer(blt, greedy)
  ids0, ids1 = (tokens[r, lengths[r]:lengths[r] + OPT_NEW] for r in range(2))
  g0, g1 = tokenizer.decode_bytes(ids0), tokenizer.decode_bytes(ids1)
  in_prompt, straddle = OPT_PROMPTS[0][-3:], OPT_PROMPTS[0][-2:] + g0[:1]
  assert not any(s in g for s in (in_prompt, straddle) for g in (g0, g1))
  i_mid, mid = _stop_from(ids0, 24, 3, [g1])
  i_early, early = _stop_from(ids0, 6, 2, [g1],
                              lambda s: s.decode("utf-8", "replace").encode() != s)  # bad UTF-8
  i_one, one = _stop_from(ids1, 16, 2, [g0])
  want0 = lambda i: tokenizer.decode_bytes(ids0[:i])  # noqa: E731
  gen = functools.partial(blt.generate_bytes, OPT_PROMPTS, OPT_NEW, stop_at_eos=False)

  # Prompt bytes never count; row 0 ends at `mid`, row 1 (no match) runs on to the end.
  stop = [in_prompt.decode(), straddle, mid]
  assert gen(stop=stop) == [want0(i_mid), g1]
  buf, _, upto = _buffer(blt, greedy, stop)
  end0 = lengths[0] + i_mid + 2  # where `mid` ends
  np.testing.assert_array_equal(buf[0, :end0 + 1], tokens[0, :end0 + 1])
  assert (buf[0, end0 + 1:] == tokenizer.PAD_ID).all(), "row 0 went on after its stop"
  assert upto == tokens.shape[1] - 1
  np.testing.assert_array_equal(buf[1], tokens[1])

  # Several stop sequences (bytes, not UTF-8): each row ends at its earliest one, and the loop
  # ends once all rows are done.
  stop = [mid, early, one, b"\xfe\xfe\xfe"]
  assert gen(stop=stop) == [want0(i_early), tokenizer.decode_bytes(ids1[:i_one])]
  assert _buffer(blt, greedy, stop)[2] == lengths[1] + i_one + 1
  # One stop string alone is one stop sequence (not a sequence of 1-byte ones).
  assert [s.tolist() for s in sampling.encode_stops("\n\u00e9", 8)] == [[14, 199, 173]]

  # Streaming holds back what may start a stop sequence: the stop is never streamed, and a
  # prefix that does not complete is released (here a stop continuing the row's last 2 bytes).
  for stop in ([mid, early, one, b"\xfe\xfe\xfe"], [in_prompt, g0[-2:] + b"\xfe", b"x", b"y"]):
    chunks = []
    out = gen(stop=stop, on_bytes=chunks.append)
    assert b"".join(chunks) == out[0]
  assert out[0] == g0 and len(chunks[-1]) >= 2


def test_option_errors(opt_blt):
  for kwargs, match in [
      (dict(stop=[""]), r"stop\[0\] is empty"),
      (dict(stop=["ok", "x" * 2000]), r"stop\[1\] has 2000 bytes, more than the model's context"),
      (dict(stop=[b"a", 3]), r"stop\[1\] must be str or bytes, got int"),
      (dict(top_k=-1), "top_k must be an int >= 0"),
      (dict(top_k=2.5), "top_k must be an int >= 0"),
      (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
      (dict(top_p=0.0), r"top_p must be in \(0, 1\]")]:
    with pytest.raises(ValueError, match=match):
      opt_blt.generate_bytes(["x"], 4, **kwargs)


def test_generate_command_with_options(opt_blt, tmp_path):
  import subprocess
  import sys
  opt_blt.save(str(tmp_path / "model"))
  kw = dict(stop_at_eos=False, repetition_penalty=4.0)
  full = opt_blt.generate_bytes(OPT_PROMPTS, OPT_NEW, **kw)[0]
  tokens, lengths, _ = _buffer(opt_blt, sampling.Sampling(**kw))
  ids = tokens[0, lengths[0]:lengths[0] + OPT_NEW]
  i, stop = _stop_from(ids, 20, 3, [], lambda s: b"\x00" not in s)  # (argv cannot hold NUL)
  want = tokenizer.decode_bytes(ids[:i])
  assert full.startswith(want + stop)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONIOENCODING="utf-8", XLA_FLAGS="")
  res = subprocess.run([sys.executable, "-m", "bltjax.generate", f"--checkpoint={tmp_path}/model",
                        f"--prompt={OPT_PROMPTS[0].decode()}", f"--max_new_bytes={OPT_NEW}",
                        "--temperature=0.7", "--top_k=1", "--repetition_penalty=4",
                        b"--stop=" + stop, "--stop=\xff never"], env=env, capture_output=True,
                       check=True)
  assert res.stdout.decode() == OPT_PROMPTS[0].decode() + want.decode("utf-8", "replace") + "\n"


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
  from bltjax.train import experiment, trainer
  workdir = str(tmp_path_factory.mktemp("debug_run") / "wd")
  trainer.run(experiment.tiny(experiment.load(os.path.join(os.path.dirname(__file__), "..",
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
  from bltjax.checkpoint import checkpointer
  from bltjax.train import experiment, metrics, trainer, train_state as ts
  from bltjax.model.config import to_dict
  _, directory = hf_pair
  out = str(tmp_path / "converted")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  subprocess.run([sys.executable, "-m", "bltjax.convert", f"--hf_dir={directory}",
                  f"--out={out}"], check=True, env=env)
  blt = BLT.from_hf(directory)
  cfg = experiment.tiny(experiment.load(os.path.join(os.path.dirname(__file__), "..", "experiments",
                                               "debug.py")))
  model = dataclasses.replace(blt.config, runtime=dataclasses.replace(blt.config.runtime))
  cfg.model = to_dict(model)
  cfg.patching.update(threshold=blt.patching_config.threshold, max_patches=129)
  cfg.init_from = out
  cfg.train.update(steps=2, log_every=1, eval_every=0, eval_batches=0)
  # The state a fresh run starts from holds exactly the converted weights.
  from bltjax.train import optim
  from bltjax.runtime import sharding
  mesh = sharding.make_mesh(cfg.mesh.shape)
  opt = optim.make_optimizer(cfg.optim, 2)
  abstract, sh = ts.abstract_state(cfg, ts.build_model(cfg), opt, mesh)
  state = ts.init_state_from(cfg, opt, mesh, abstract, sh, out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               state.params, blt.params)
  workdir = str(tmp_path / "wd")
  trainer.run(cfg, workdir)
  assert [r["step"] for r in metrics.read_metrics(workdir) if "loss" in r] == [1, 2]
  _, meta = checkpointer.Checkpointer(workdir).metadata(2)
  assert meta["entropy_model"]["path"] == os.path.join(out, "entropy_model")
  assert meta["entropy_model"]["sha256"] == checkpointer.params_hash(blt.entropy_params)
