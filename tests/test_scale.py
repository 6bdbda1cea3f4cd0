"""The paper's configurations at scale, checked abstractly (nothing is allocated): parameter counts,
sharding coverage on a 256-device mesh, FLOP accounting, and compile-only memory reports."""

import importlib.util
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

from bltjax.interop import hf_config
from bltjax.model.config import PatchingConfig
from bltjax.runtime import sharding
from bltjax.train import batch as batch_lib, experiment, flops, optim, train_state as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Parameter counts per component computed from the published dimensions (docs/reference-notes.md §3;
# BLT-1B: D_E=D_D=1024, 1 encoder / 9 decoder layers, latent 2048 x 25, k=2; BLT-7B ("8B"):
# 1280, 1 / 6 layers, latent 4096 x 32, k=4; six 500,002-row hash tables).
EXPECTED = {
    "1b": {"embed/tok_embeddings": 266_240, "embed/hash_embeddings": 3_072_012_288,
           "local_encoder/stack": 12_847_104, "local_encoder/cross_attn": 4_196_352,
           "local_encoder/patch_embedding_projection": 2_097_152,
           "latent/token_embedding_projection": 0, "latent/stack": 1_284_608_000,
           "local_decoder/patch_embedding_projection": 4_194_304,
           "local_decoder/layers/cross_attn": 37_767_168,
           "local_decoder/layers/block": 115_623_936, "local_decoder/norm+output": 267_264},
    "8b": {"embed/tok_embeddings": 332_800, "embed/hash_embeddings": 3_840_015_360,
           "local_encoder/stack": 20_318_720, "local_encoder/cross_attn": 6_556_160,
           "local_encoder/patch_embedding_projection": 6_553_600,
           "latent/token_embedding_projection": 20_971_520, "latent/stack": 6_476_267_520,
           "local_decoder/patch_embedding_projection": 20_971_520,
           "local_decoder/layers/cross_attn": 39_336_960,
           "local_decoder/layers/block": 121_912_320, "local_decoder/norm+output": 334_080},
}
RELEASED_TOTAL = {"1b": 4_533_879_808, "8b": 10_553_570_560}


def load(name):
  return experiment.load(os.path.join(REPO, "experiments", f"{name}.py"))


def abstract_params(config):
  model = ts.build_model(config)
  spec = batch_lib.spec(config, 1)
  dummy = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in spec.items()}
  return jax.eval_shape(lambda b: model.init(jax.random.key(0), *batch_lib.model_inputs(config, b)),
                        dummy)["params"]


def component_counts(params):
  counts = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]:
    keys = [k.key for k in path]
    name = "/".join(keys[:3] if keys[:3] in (["local_decoder", "layers", "cross_attn"],
                                              ["local_decoder", "layers", "block"]) else keys[:2])
    if name in ("local_decoder/norm", "local_decoder/output"):
      name = "local_decoder/norm+output"
    counts[name] = counts.get(name, 0) + int(np.prod(leaf.shape))
  return counts


@pytest.mark.parametrize("name", ["1b", "8b"])
def test_parameter_counts_match_the_released_models(name):
  counts = component_counts(abstract_params(load(name)))
  for component, want in EXPECTED[name].items():
    assert counts.get(component, 0) == want, component
  assert sum(counts.values()) == RELEASED_TOTAL[name]


@pytest.mark.parametrize("name", ["1b", "8b"])
def test_parameter_counts_match_transformers(name):
  """The `transformers` port builds the same architecture (on the meta device: no memory)."""
  import torch
  from transformers import BltConfig, BltForCausalLM
  c = load(name)
  ours = sum(component_counts(abstract_params(c)).values())
  ent = experiment.model_config(experiment.entropy_stage_config(c))
  ours += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(
      abstract_params(experiment.entropy_stage_config(c)))))
  pc = PatchingConfig("entropy", 1.3354, None, False, None, None)
  with torch.device("meta"):
    peer = BltForCausalLM(BltConfig(**hf_config.config_to_hf(experiment.model_config(c), ent, pc)))
  theirs = sum(p.numel() for p in peer.parameters())
  assert ours == theirs, (ours, theirs)
  assert abs(ours / {"1b": 4.633e9, "8b": 10.653e9}[name] - 1) < 0.005  # HF audit figures


def test_8b_is_sharded_on_256_devices():
  """>= 98% of parameter + optimizer bytes sharded, every sharded dimension divisible, and the
  3.84B-parameter hash tables sharded (not replicated)."""
  c = load("8b")
  mesh = AbstractMesh((1, 256, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  model, opt = ts.build_model(c), optim.make_optimizer(c.optim, 10)
  boxed = jax.eval_shape(ts.make_init_fn(c, model, opt), jax.eval_shape(lambda: jax.random.key(0)))
  shardings = sharding.logical_to_shardings(boxed, mesh)
  leaves = jax.tree.leaves(sharding.unbox(boxed))
  specs = jax.tree.leaves(shardings)
  total = sharded = 0
  for leaf, sh in zip(leaves, specs):
    nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    total += nbytes
    parts = [p for p in sh.spec]
    if any(p is not None for p in parts):
      sharded += nbytes
    for dim, axes in zip(leaf.shape, parts):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      assert dim % size == 0, (leaf.shape, sh.spec)
  assert sharded / total >= 0.98, sharded / total
  hash_spec = shardings.params["embed"]["hash_embeddings"]["embedding"].spec
  assert "fsdp" in tuple(hash_spec)


def test_flops_per_byte_accounting():
  c = experiment.model_config(load("8b"))
  f45 = flops.blt_flops_per_byte(c, 16384, 4.5)
  f9 = flops.blt_flops_per_byte(c, 16384, 9.0)
  # The latent runs once per patch: twice the patch size, (about) half its FLOPs per byte.
  assert f9["latent"] < 0.52 * f45["latent"]
  assert f9["local_decoder"] == f45["local_decoder"]
  assert abs(sum(v for k, v in f45.items() if k != "total") - f45["total"]) < 1
  # One latent layer by hand: QKVO 4*2*h^2, attention 2*2*h*(keys), SwiGLU 6*h*ffn, x3 training.
  lat = c.latent
  keys = (16384 / 4.5 + 1) / 2  # causal over ~3641 patches (rounded like the code)
  keys = (round(16384 / 4.5) + 1) / 2
  per_layer = 8 * lat.dim**2 + 4 * lat.dim * keys + 6 * lat.dim * lat.ffn_dim
  proj = 2 * c.latent_input_dim * lat.dim
  np.testing.assert_allclose(f45["latent"], 3 * (lat.n_layers * per_layer + proj) / 4.5,
                             rtol=1e-12)
  # The paper's inference figure for 8B BLT-Entropy (ps 4.5) is ~2.2e9 FLOPs/byte: same order.
  assert 1.5e9 < flops.blt_flops_per_byte(c, 16384, 4.5, training=False)["total"] < 5e9


def test_compile_only_check_on_fake_devices():
  """bltjax.train.aot on this machine's 8 fake devices (an 'a100x8' mesh): compiles the real
  step."""
  from bltjax.train import aot
  c = experiment.tiny(load("debug"))  # mesh (1, -1, 1): FSDP over the 8 devices, as the paper configs
  r = aot.compile_report(c, "a100x8", mfu=0.4, bytes_per_patch=4.0)
  assert r["error"] is None and r["total"] < r["hbm"]
  assert r["involuntary_remat"] == 0
  assert r["arguments"] > 0 and r["flops_per_step"] > 0 and r["step_time"] > 0
  assert r["patching"] is None  # debug.py patches on the host
  # A GPU mesh compiles on host devices: 'auto' attention is xla there, and no kernel is counted.
  assert r["attention"] == {"model": "xla", "entropy_model": "xla"} and r["kernels"] == {}
  assert r["state_per_device"] + r["batch_per_device"] <= r["arguments"]
  hlo = ('%a = bf16[1,512,128] custom-call(%q), custom_call_target="tpu_custom_call", '
         'backend_config={"custom_call_config": {"name": "splash_mha_fwd_segmented_residuals"}}\n'
         '%b = f32[8] custom-call(), custom_call_target="AllocateBuffer"\n'
         '%c = bf16[2,8] custom-call(%x), custom_call_target="__cudnn$fmhaSoftmax"')
  assert aot.count_kernels(hlo) == {"splash_mha_fwd_segmented_residuals": 1,
                                    "__cudnn$fmhaSoftmax": 1}
  c.patching.device = "accelerator"  # the entropy model compiled next to the step, same mesh
  p = aot.compile_report(c, "a100x8", mfu=0.4, bytes_per_patch=4.0)["patching"]
  assert p["error"] is None and p["arguments"] > 0 and p["temporaries"] > 0
  assert p["flops_per_byte"] == flops.lm_flops_per_byte(
      experiment.model_config(experiment.entropy_stage_config(c)), c.data.seq_len, training=False)


HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.tpu_topology
@pytest.mark.skipif(not HAVE_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
@pytest.mark.parametrize("name,topology", [("8b", "v5p-256"), ("1b", "v5p-256")])
def test_compile_only_check_for_tpu_pods(name, topology):
  res = subprocess.run([sys.executable, "-m", "bltjax.aot",
                        f"--config={REPO}/experiments/{name}.py", f"--topology={topology}"],
                       capture_output=True, text=True, cwd=REPO)
  assert res.returncode == 0, res.stdout + res.stderr[-2000:]
  assert ": fits" in res.stdout and "involuntary full rematerializations: 0" in res.stdout
  # Accelerator patching compiles next to the step, and both together keep >= 20% of HBM free.
  assert "accelerator patching (entropy model + cut" in res.stdout
  headroom = int(re.search(r"step \+ patching: .* headroom (\d+)%", res.stdout).group(1))
  assert headroom >= 20, res.stdout
  # Fused attention: splash kernels for the local encoder, the latent and the local decoder
  # (one scanned stack each: forward, dq and dkv), and for the entropy model in patching.
  assert "attention: model splash, entropy_model splash" in res.stdout
  kernels = dict(re.findall(r"(splash_\w+) x(\d+)", res.stdout.split("accelerator patching")[0]))
  for kind in ("fwd", "dq", "dkv"):
    assert sum(int(n) for k, n in kernels.items() if f"_{kind}_" in k) >= 3, res.stdout
  assert "fused kernels splash_mha_fwd" in res.stdout.split("accelerator patching")[1]


@pytest.mark.tpu_topology
@pytest.mark.skipif(not HAVE_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_splash_kernels_compile_for_a_tpu_from_this_host():
  """`attention="auto"` on a TPU target builds Mosaic splash kernels (not interpret mode), in the
  step and in accelerator patching; `bltjax.aot` counts them (~30 s: the tiny config)."""
  res = subprocess.run([sys.executable, "-m", "bltjax.aot",
                        f"--config={REPO}/experiments/debug.py:tiny", "--topology=v5p-8",
                        "--config.patching.device=accelerator"],
                       capture_output=True, text=True, cwd=REPO)
  assert res.returncode == 0, res.stdout + res.stderr[-2000:]
  step, patching = res.stdout.split("accelerator patching")
  assert re.search(r"splash_mha_fwd\w* x\d+", step)
  assert re.search(r"splash_mha_dkv\w* x\d+", step)
  assert "splash_mha_fwd" in patching

