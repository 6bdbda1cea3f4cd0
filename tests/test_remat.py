"""Named rematerialisation: the policies keep exactly the values they name (in the compute dtype,
not fp32 accumulators) and never change the gradients."""

import collections
import contextlib
import dataclasses
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from bltjax.model.config import NAMED_REMAT_POLICIES, LMConfig
from bltjax.model.lm import TransformerLM
from tests import tiny


def _model(remat, dtype="float32"):
  cfg = tiny.entropy_config(window=8, layers=2, dtype=dtype)
  return TransformerLM(dataclasses.replace(cfg, runtime=tiny.runtime(dtype, remat)))


def _setup():
  tokens = np.random.default_rng(0).integers(4, 260, (2, 32)).astype(np.int32)
  params = nn.meta.unbox(jax.jit(_model("none").init)(jax.random.key(0), tokens)["params"])
  return params, tokens


def _loss(model, tokens):
  return lambda p: jnp.mean(jax.nn.logsumexp(model.apply({"params": p}, tokens), axis=-1))


@pytest.mark.parametrize("policy", ["full", *NAMED_REMAT_POLICIES])
def test_named_policies_give_the_same_gradients(policy):
  params, tokens = _setup()
  want = jax.jit(jax.grad(_loss(_model("none"), tokens)))(params)
  got = jax.jit(jax.grad(_loss(_model(policy), tokens)))(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


# The shapes the tagged values have, stacked over the scan's layers: [L, B, N, H, E] for the
# attention side, [L, B, N, D] or [L, B, N, F] for the projections (L=2, B=2, N=32, D=32, F=64).
SHAPES = {"query_proj": "[2,2,32,2,16]", "key_proj": "[2,2,32,2,16]",
          "value_proj": "[2,2,32,2,16]", "context": "[2,2,32,2,16]", "out_proj": "[2,2,32,32]",
          "mlp_gate": "[2,2,32,64]", "mlp_up": "[2,2,32,64]", "mlp_out": "[2,2,32,32]"}


def _scan_residuals(policy, dtype):
  """What the layer scan keeps for the backward pass, as 'bf16[2,2,32,32]' strings."""
  params, tokens = _setup()
  out = io.StringIO()
  with contextlib.redirect_stdout(out):  # one line per residual: "bf16[...] output of scan ..."
    print_saved_residuals(_loss(_model(policy, dtype), tokens), params)
  return sorted(line.split()[0] for line in out.getvalue().splitlines()
                if "output of scan" in line)


@pytest.mark.parametrize("policy", list(NAMED_REMAT_POLICIES))
def test_a_policy_keeps_what_it_names_in_the_compute_dtype(policy):
  """The named values, all bf16, and at most each layer's input (the remat boundary) besides."""
  kept = collections.Counter(_scan_residuals(policy, "bfloat16"))
  named = collections.Counter(f"bf16{SHAPES[n]}" for n in NAMED_REMAT_POLICIES[policy])
  assert not named - kept, f"not kept: {named - kept}"
  assert kept - named in (collections.Counter(), collections.Counter(["bf16[2,2,32,32]"]))


def test_an_unknown_policy_is_named():
  cfg = tiny.entropy_config()
  d = dataclasses.asdict(cfg)
  with pytest.raises(ValueError, match="remat_policy='minimal'.*minimal_with_context"):
    LMConfig.from_dict(d | dict(runtime=d["runtime"] | dict(remat_policy="minimal")))
