"""The fused attention backends compute what the xla path computes: splash (Pallas interpret mode
on CPU) against `attention.local_attention`, alone, under a mesh and through the whole model;
cuDNN on a GPU (`pytest -m gpu`)."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.inference.api import BLT
from bltjax.model import attention, fused_attention, patching, tokenizer
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.config import BLTConfig, LMConfig, PatchingConfig
from bltjax.model.lm import TransformerLM, entropies_from_logits
from bltjax.runtime import sharding
from bltjax.train import patcher
from tests import tiny
from tests.test_attention import random_segments


def _runtime(backend):
  return dataclasses.replace(tiny.runtime(), attention=backend)


def _inputs(seed, b, n, heads, kv_heads, e=32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(b, n, h, e)), jnp.float32)
          for h in (heads, kv_heads, kv_heads)]


def _attend(backend, window):
  rt = _runtime(backend)
  return jax.jit(lambda q, k, v, seg: fused_attention.self_attention(q, k, v, seg, window=window,
                                                                     rt=rt))


def _grads(backend, window, q, k, v, seg):
  rt = _runtime(backend)
  w = jnp.cos(jnp.arange(q.shape[-1], dtype=jnp.float32))  # an output-dependent loss

  def loss(q, k, v):
    return jnp.sum(fused_attention.self_attention(q, k, v, seg, window=window, rt=rt) * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _assert_close_grads(got, want, rtol=1e-4, atol=1e-6):
  """Within `rtol` of the largest magnitude (`atol` where the gradient is zero, as dq is when
  each query sees only itself)."""
  for name, g, r in zip("qkv", got, want):
    scale = float(jnp.max(jnp.abs(r)))
    assert float(jnp.max(jnp.abs(g - r))) <= rtol * scale + atol, f"d{name}"


@pytest.mark.parametrize("n,window,heads,kv_heads,docs", [
    (200, 48, 4, 2, 3),      # documents, GQA, a window shorter than the row, 200 = 1.6 blocks
    (40, None, 3, 3, 2),     # the latent's block-causal attention; a row shorter than a block
    (256, 64, 2, 1, 1),      # multi-query, two whole blocks
    (64, 16, 2, 2, "each"),  # every position its own document: each query sees only itself
])
def test_splash_equals_xla(n, window, heads, kv_heads, docs):
  q, k, v = _inputs(n, 2, n, heads, kv_heads)
  seg = (np.tile(np.arange(n, dtype=np.int32), (2, 1)) if docs == "each"
         else random_segments(np.random.default_rng(n), 2, n, docs))
  want = _attend("xla", window)(q, k, v, seg)
  got = _attend("splash", window)(q, k, v, seg)
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-5
  _assert_close_grads(_grads("splash", window, q, k, v, seg),
                      _grads("xla", window, q, k, v, seg))


@pytest.mark.parametrize("rows,heads,kv_heads", [
    (4, 4, 2),  # rows over ('data', 'fsdp'), heads over 'tensor'
    (2, 3, 3),  # 2 rows over 'data' only; 3 heads stay whole
    (1, 2, 1),  # one row (a held-out snippet) on every device
])
def test_splash_under_a_mesh_runs_per_device(rows, heads, kv_heads):
  """shard_map: one kernel per device, over the mesh axes that divide rows and heads."""
  q, k, v = _inputs(1, rows, 160, heads, kv_heads)
  seg = random_segments(np.random.default_rng(1), rows, 160, 2)
  want, want_grads = _attend("xla", 32)(q, k, v, seg), _grads("xla", 32, q, k, v, seg)
  with sharding.mesh_context(sharding.make_mesh((2, 2, 2))):
    got, got_grads = _attend("splash", 32)(q, k, v, seg), _grads("splash", 32, q, k, v, seg)
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-5
  _assert_close_grads(got_grads, want_grads)


def _with_backend(cfg, backend):
  return dataclasses.replace(cfg, runtime=_runtime(backend))


def test_blt_logits_and_gradients_are_the_same_with_splash():
  cfg = tiny.blt_config(window=16)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 260, (2, 96)).astype(np.int32)
  tokens[:, 0], tokens[:, 50], tokens[:, 51] = tokenizer.BOS_ID, tokenizer.EOS_ID, tokenizer.BOS_ID
  lengths = np.zeros((2, 40), np.int32)
  lengths[:, :33] = 3  # N + 1 = 97 bytes: a 1-byte first patch, 32 of 3; 7 padded patches
  lengths[:, 0] = 1
  params = nn.meta.unbox(jax.jit(ByteLatentTransformer(cfg).init)(
      jax.random.key(0), tokens, lengths)["params"])

  def loss_and_grads(backend):
    model = ByteLatentTransformer(_with_backend(cfg, backend))
    def loss(p):
      logits = model.apply({"params": p}, tokens, lengths)
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1)), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, want), want_grads = loss_and_grads("xla")
  (_, got), got_grads = loss_and_grads("splash")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got_grads)[0],
                          jax.tree.leaves(want_grads)):
    scale = max(float(jnp.max(jnp.abs(w))), 1e-6)
    assert float(jnp.max(jnp.abs(g - w))) <= 1e-4 * scale, jax.tree_util.keystr(path)


def test_entropy_model_entropies_are_the_same_with_splash():
  cfg = tiny.entropy_config(window=24)
  tokens = np.random.default_rng(2).integers(4, 260, (2, 150)).astype(np.int32)
  params = nn.meta.unbox(jax.jit(TransformerLM(cfg).init)(jax.random.key(1), tokens)["params"])

  def entropies(backend):
    model = TransformerLM(_with_backend(cfg, backend))
    return jax.jit(lambda p, t: entropies_from_logits(model.apply({"params": p}, t)))(
        params, tokens)
  np.testing.assert_allclose(np.asarray(entropies("splash")), np.asarray(entropies("xla")),
                             atol=1e-5)


def test_accelerator_patching_cuts_the_same_patches_with_splash():
  """What accelerator patching runs (`patcher.entropies_fn`, then `patching.cut_rows`): the same
  patch lengths whatever the entropy model's attention backend."""
  cfg = tiny.entropy_config(window=24)
  tokens = np.random.default_rng(5).integers(4, 260, (4, 200)).astype(np.int32)
  tokens[:, 0] = tokenizer.BOS_ID
  params = nn.meta.unbox(jax.jit(TransformerLM(cfg).init)(jax.random.key(2), tokens)["params"])

  def lengths(backend, threshold):
    fn = patcher.entropies_fn(TransformerLM(_with_backend(cfg, backend)))
    entropies = jax.jit(fn)(params, tokens)
    pc = PatchingConfig("entropy", threshold, None, False, None, None)
    return entropies, np.asarray(patching.cut_rows(tokens, entropies, pc, 120)[0])

  want_entropies, _ = lengths("xla", 0.0)
  values = np.sort(np.asarray(want_entropies).ravel())
  gap = np.argmax(np.diff(values)[len(values) // 3:2 * len(values) // 3]) + len(values) // 3
  threshold = float(values[gap] + values[gap + 1]) / 2  # far from every entropy: a clean cut
  want, got = lengths("xla", threshold)[1], lengths("splash", threshold)[1]
  assert 10 < (want > 0).sum(1).min() < 120  # the rule really cuts
  np.testing.assert_array_equal(got, want)


def test_cached_generation_equals_recomputation_with_splash():
  """Recomputation runs the whole model (its self-attention through splash); the cached steps
  stay xla: greedy bytes are the same."""
  cfg, ecfg = tiny.blt_config(window=8), tiny.entropy_config(window=6)
  tokens = np.ones((1, 8), np.int32)
  params = nn.meta.unbox(jax.jit(ByteLatentTransformer(cfg).init)(
      jax.random.key(0), tokens, np.ones((1, 9), np.int32))["params"])
  eparams = nn.meta.unbox(jax.jit(TransformerLM(ecfg).init)(jax.random.key(1), tokens)["params"])
  pc = PatchingConfig("space", None, None, False, None, None)
  blt = BLT(_with_backend(cfg, "splash"), params, patching_cfg=pc,
            entropy_cfg=_with_backend(ecfg, "splash"), entropy_params=eparams, max_context=256)
  prompts = [b"def main(argv):\n  ", b"x = 1"]
  cached = blt.generate_bytes(prompts, max_new_bytes=24, stop_at_eos=False)
  assert cached == blt.generate_bytes(prompts, max_new_bytes=24, stop_at_eos=False,
                                      recompute=True)


def test_auto_picks_xla_on_cpu_and_cudnn_names_what_it_cannot_run():
  assert fused_attention.resolve("auto", head_dim=32, dtype=jnp.float32,
                                 length=64) == ("xla", None)
  assert fused_attention.resolve("splash", head_dim=32, dtype=jnp.float32,
                                 length=64) == ("splash", None)
  why = fused_attention.cudnn_unsupported
  assert "float32" in why(head_dim=128, dtype=jnp.float32, length=4096)
  assert "head dims" in why(head_dim=40, dtype=jnp.bfloat16, length=4096)
  assert "16384" in why(head_dim=128, dtype=jnp.bfloat16, length=16384)
  assert why(head_dim=128, dtype=jnp.bfloat16, length=4096) is None
  with pytest.raises(ValueError, match="model.runtime.attention='flash'"):
    fused_attention.resolve("flash", head_dim=32, dtype=jnp.float32, length=8)


def test_the_runtime_names_a_bad_backend_or_block():
  d = dataclasses.asdict(tiny.blt_config())
  with pytest.raises(ValueError, match="model.runtime.attention='tpu'"):
    BLTConfig.from_dict(d | dict(runtime=d["runtime"] | dict(attention="tpu")))
  with pytest.raises(ValueError, match="entropy_model.runtime.attn_block=100"):
    e = dataclasses.asdict(tiny.entropy_config())
    LMConfig.from_dict(e | dict(runtime=e["runtime"] | dict(attn_block=100)))


@pytest.mark.gpu
def test_cudnn_equals_xla_on_a_gpu():
  """cuDNN flash attention (bf16) against xla on the same inputs, forward and gradients."""
  if jax.default_backend() != "gpu":
    pytest.skip("needs a GPU")
  q, k, v = (x.astype(jnp.bfloat16) for x in _inputs(3, 2, 512, 8, 4, e=64))
  seg = random_segments(np.random.default_rng(3), 2, 512, 3)
  for window in (None, 128):
    want = _attend("xla", window)(q, k, v, seg).astype(jnp.float32)
    got = _attend("cudnn", window)(q, k, v, seg).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(got - want))) <= 2e-2
    _assert_close_grads(_grads("cudnn", window, q, k, v, seg),
                        _grads("xla", window, q, k, v, seg), rtol=5e-2)


@pytest.mark.long  # two tiny two-stage runs, ~2.5 min: in .ci/run's `pytest -m long`
def test_the_quickstart_trains_the_same_with_splash(tmp_path):
  """`python -m bltjax.main --config=experiments/debug.py:tiny` with splash attention in both
  stages (interpret mode on CPU): every logged loss equals the xla run's within 1e-4."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def run(backend):
    workdir = tmp_path / backend
    subprocess.run(
        [sys.executable, "-m", "bltjax.main",
         f"--config={os.path.join(root, 'experiments', 'debug.py')}:tiny", f"--workdir={workdir}",
         f"--config.model.runtime.attention={backend}",
         f"--config.entropy_model.model.runtime.attention={backend}",
         "--config.train.log_every=1", "--config.entropy_model.train.log_every=1"],
        check=True, cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        stdout=subprocess.DEVNULL)
    return {stage: [r["loss"] for r in map(json.loads, (workdir / stage).read_text().splitlines())
                    if "loss" in r]
            for stage in ("entropy_model/metrics.jsonl", "metrics.jsonl")}

  want, got = run("xla"), run("splash")
  for stage, losses in want.items():
    assert len(losses) == 4 and len(got[stage]) == 4, stage
    np.testing.assert_allclose(got[stage], losses, atol=1e-4, err_msg=stage)
