"""Properties of the BLT and the entropy model that parity with the port cannot show: causality,
documents, windows, logical axes, and the sharded model equal to the single-device one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.model import layers, patching, tokenizer
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.lm import TransformerLM
from bltjax.runtime import sharding
from tests import tiny
from tests.jaxprs import all_eqns


def init(module, *args):
  return nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), *args)["params"])


def random_bytes(rng, n):
  return rng.integers(4, 260, size=n)


@pytest.fixture(scope="module")
def blt():
  model = ByteLatentTransformer(tiny.blt_config(window=8, enc_layers=2, all_enc=True))
  tokens = np.ones((1, 40), np.int32)
  return model, init(model, tokens, np.ones((1, 41), np.int32))


def test_logits_are_causal(blt):
  """Byte t's logits never depend on bytes after t (the decoder reads patch_id(t+1)-1)."""
  model, params = blt
  rng = np.random.default_rng(0)
  a = np.concatenate([[1], random_bytes(rng, 39)])[None]
  lengths = patching.lengths_from_start_mask(
      patching.start_mask("entropy", entropies=rng.uniform(0, 2, a.shape), threshold=1.0))
  apply = jax.jit(model.apply)
  base = apply({"params": params}, a, lengths)
  for t in (0, 5, 17, 38):
    b = a.copy()
    b[0, t + 1:] = random_bytes(rng, 39 - t)
    out = apply({"params": params}, b, lengths)
    np.testing.assert_allclose(out[0, :t + 1], base[0, :t + 1], atol=1e-5)
    assert not np.allclose(out[0, t + 1:], base[0, t + 1:], atol=1e-3)


def test_documents_do_not_see_each_other(blt):
  """After EOS, a new document (BOS + bytes) ignores the previous one, except that hash n-grams
  span the boundary (as in the reference), so the last 7 bytes before EOS are kept fixed."""
  model, params = blt
  rng = np.random.default_rng(1)
  doc1, doc2 = random_bytes(rng, 18), random_bytes(rng, 18)
  a = np.concatenate([[1], doc1, [2, 1], doc2])[None]      # 39 tokens, EOS at 19, BOS at 20
  a = np.concatenate([a, [[7]]], axis=1)
  lengths = np.array([[1, 6, 6, 7, 1, 1, 8, 11]])          # EOS ends a patch; BOS is a patch
  assert lengths.sum() == a.shape[1] + 1
  b = a.copy()
  b[0, 1:10] = random_bytes(rng, 9)
  apply = jax.jit(model.apply)
  la, lb = apply({"params": params}, a, lengths), apply({"params": params}, b, lengths)
  np.testing.assert_allclose(la[0, 20:], lb[0, 20:], atol=1e-5)

  ent = TransformerLM(tiny.entropy_config(window=64))
  ep = init(ent, a)
  ea, eb = ent.apply({"params": ep}, a), ent.apply({"params": ep}, b)
  np.testing.assert_allclose(ea[0, 20:], eb[0, 20:], atol=1e-5)
  assert not np.allclose(ea[0, 10:19], eb[0, 10:19], atol=1e-3)


def test_entropy_model_window_limits_context():
  """With L layers of window w, position t sees exactly positions > t - L*(w-1)."""
  layers, w, n = 2, 5, 40
  ent = TransformerLM(tiny.entropy_config(window=w, layers=layers))
  rng = np.random.default_rng(2)
  a = np.concatenate([[1], random_bytes(rng, n - 1)])[None]
  params = init(ent, a)
  t = 30
  reach = t - layers * (w - 1)
  far, near = a.copy(), a.copy()
  far[0, 1:reach] = random_bytes(rng, reach - 1)
  near[0, reach] = (a[0, reach] - 4 + 1) % 256 + 4
  apply = jax.jit(ent.apply)
  base = apply({"params": params}, a)
  np.testing.assert_allclose(apply({"params": params}, far)[0, t], base[0, t], atol=1e-5)
  assert not np.allclose(apply({"params": params}, near)[0, t], base[0, t], atol=1e-4)


def test_every_parameter_has_logical_axes(blt):
  model, _ = blt
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32),
                                            jnp.ones((1, 9), jnp.int32)))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == len(x.value.shape), x


def test_bfloat16_compute_stays_close_to_float32(blt):
  model, params = blt
  rng = np.random.default_rng(3)
  a = np.concatenate([[1], random_bytes(rng, 39)])[None]
  lengths = patching.space_patch_lengths(a)
  bf16 = ByteLatentTransformer(tiny.blt_config(window=8, enc_layers=2, all_enc=True,
                                               dtype="bfloat16", remat="full"))
  out32 = model.apply({"params": params}, a, lengths)
  out16 = jax.jit(bf16.apply)({"params": params}, a, lengths)
  assert out16.dtype == jnp.float32  # logits stay fp32
  assert float(jnp.max(jnp.abs(out16 - out32))) < 0.15


def test_bfloat16_matmul_backward_runs_in_bfloat16_and_loses_nothing():
  """`layers.matmul`'s backward multiplies bf16 operands (fp32 products would be 2-3x slower on
  CPU) and gives the same gradients as fp32 arithmetic on the same bf16 values."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(32, 24)), jnp.float32)  # fp32 master weight
  cot = jnp.asarray(rng.normal(size=(2, 16, 24)), jnp.bfloat16)
  y, vjp = jax.vjp(layers.matmul, x, w)
  dx, dw = vjp(cot)
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  x32, w16, c32 = x.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32), cot.astype(
      jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(jnp.einsum("bsi,io->bso", x32, w16, precision=hi)
                                        .astype(jnp.bfloat16), np.float32), rtol=1e-2, atol=0.05)
  np.testing.assert_allclose(np.asarray(dx, np.float32),
                             np.asarray(jnp.einsum("bso,io->bsi", c32, w16, precision=hi)
                                        .astype(jnp.bfloat16), np.float32), rtol=1e-2, atol=0.05)
  # The weight gradient is not rounded to bf16 on its way to the fp32 parameter.
  np.testing.assert_allclose(np.asarray(dw), np.asarray(jnp.einsum("bsi,bso->io", x32, c32,
                                                                   precision=hi)), rtol=1e-5)
  grad_jaxpr = jax.make_jaxpr(vjp)(cot).jaxpr
  dtypes = [tuple(str(v.aval.dtype) for v in e.invars) for e in all_eqns(grad_jaxpr)
            if e.primitive.name == "dot_general"]
  assert len(dtypes) == 2 and all(d == ("bfloat16", "bfloat16") for d in dtypes), dtypes
  # In fp32 it is plain autodiff.
  x32 = x.astype(jnp.float32)
  got = jax.grad(lambda x, w: (layers.matmul(x, w) * c32).sum(), argnums=(0, 1))(x32, w)
  want = jax.grad(lambda x, w: (jnp.einsum("bsi,io->bso", x, w) * c32).sum(),
                  argnums=(0, 1))(x32, w)
  for g, e in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)


def test_sharded_model_equals_single_device():
  """On a 2x2x2 (data, fsdp, tensor) mesh the jitted model gives the single-device logits."""
  cfg = tiny.blt_config(window=8, enc_layers=1)
  model = ByteLatentTransformer(cfg)
  rng = np.random.default_rng(4)
  tokens = np.stack([np.concatenate([[1], random_bytes(rng, 31)]) for _ in range(4)])
  lengths = patching.lengths_from_start_mask(
      patching.start_mask("entropy", entropies=rng.uniform(0, 2, tokens.shape), threshold=1.0))
  params = init(model, tokens, lengths)
  want = jax.jit(model.apply)({"params": params}, tokens, lengths)

  mesh = sharding.make_mesh((2, 2, 2))
  with sharding.mesh_context(mesh):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, lengths))["params"]
    shardings = sharding.logical_to_shardings(boxed, mesh)
    sharded = jax.device_put(params, shardings)
    batch = sharding.batch_sharding(mesh, 2)
    fn = jax.jit(lambda p, t, l: model.apply({"params": p}, t, l),
                 in_shardings=(shardings, batch, batch))
    got = fn(sharded, jax.device_put(tokens, batch), jax.device_put(lengths, batch))
  kernel = sharded["latent"]["stack"]["layers"]["feed_forward"]["w1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (2, 24, 48)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_tokens_decode_round_trip_through_the_tokenizer():
  ids = tokenizer.encode("naïve ☃")
  assert ids[0] == tokenizer.BOS_ID and ids[-1] == tokenizer.EOS_ID
  assert tokenizer.decode(ids) == "naïve ☃"
