"""The TPU compiler's speed estimate for a step, layer by layer (`python -m bltjax.aot`).

`compiled.cost_analysis()` of the whole step is unusable: a scanned layer is counted once and its
`optimal_seconds` came out negative for the 8B step. Instead one transformer block of each kind
(a latent block, a local block) is compiled alone for one chip of the target: forward and
backward, unrolled, with the run's remat policy, on the rows one device holds per microbatch. Its
`optimal_seconds` is the compiler's roofline time for that work. Scaled by the number of layers
and microbatches, they give a step time and the MFU it implies.

These are compiler estimates, not measurements:
- the Pallas kernels (splash attention) are opaque to the cost model, so their time is added
  from their analytic FLOPs at the chip's peak (forward 4·N·K·H·E for K keys per query, backward
  2.5x that, one more forward when remat recomputes it);
- FSDP's all-gathers and reduce-scatters are not in a one-chip program (overlapped with compute,
  they cost nothing; exposed, they add to the step);
- embeddings, hash n-grams, cross-attentions, the output layer and the optimizer update are not
  estimated (they are a few percent of the FLOPs; `flops.py`).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bltjax.model import fused_attention, transformer
from bltjax.model.config import NAMED_REMAT_POLICIES, RuntimeConfig, TransformerConfig
from bltjax.train import flops


def block_seconds(tc: TransformerConfig, rt: RuntimeConfig, device, *, rows: int,
                  length: int) -> dict:
  """The compiler's roofline for one block's forward + backward on `rows` rows of `length` on
  one `device` (an abstract TPU device): {'compiler_s': its optimal_seconds, 'kernel_flops': the
  attention kernels' analytic FLOPs (opaque to the compiler), 'flops': the block's model FLOPs}."""
  block = transformer.Block(tc, rt)
  policy = None if rt.remat_policy == "none" else transformer.remat_policy(rt.remat_policy)
  dtype = jnp.dtype(rt.dtype)
  x = jax.ShapeDtypeStruct((rows, length, tc.dim), dtype)
  ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
  params = jax.eval_shape(lambda: nn.meta.unbox(block.init(
      jax.random.key(0), jnp.zeros(x.shape, dtype), jnp.zeros(ids.shape, jnp.int32),
      jnp.zeros(ids.shape, jnp.int32))["params"]))

  def forward(p, x, positions, segments):
    return block.apply({"params": p}, x, positions, segments)[0]

  if policy is not None or rt.remat_policy == "full":
    forward = jax.checkpoint(forward, policy=policy)

  def fwd_bwd(p, x, positions, segments):
    y, pull = jax.vjp(lambda p, x: forward(p, x, positions, segments), p, x)
    return pull(jnp.ones_like(y))

  mesh = jax.sharding.Mesh(np.array([device]), ("chip",))
  one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with fused_attention.compiling_for("tpu"):
    compiled = jax.jit(fwd_bwd, in_shardings=one, out_shardings=one).lower(
        params, x, ids, ids).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  keys = flops.mean_keys(length, tc.attn_window)
  attention_fwd = 4 * rows * length * keys * tc.n_heads * tc.head_dim
  # The forward kernel runs again in the backward pass unless remat keeps its output ('context').
  recompute = 0 if (rt.remat_policy == "none"
                    or "context" in NAMED_REMAT_POLICIES.get(rt.remat_policy, ())) else 1
  kernel_flops = attention_fwd * (1 + 2.5 + recompute)
  return dict(compiler_s=float(cost["optimal_seconds"]), kernel_flops=kernel_flops,
              flops=3 * rows * length * flops.layer_flops(tc, keys))


def step_estimate(config, model_cfg, device, peak: float, microbatches: int, rows: int,
                  flops_per_step_per_device: float) -> dict:
  """Per-layer estimates of a BLT (latent and local blocks) or an LM (its one stack), scaled to
  a step: {'layers': {name: {...}}, 'step_s', 'mfu'}."""
  rt = dataclasses.replace(model_cfg.runtime, attention="auto")
  if hasattr(model_cfg, "latent"):
    stacks = {"latent": (model_cfg.latent, config.patching.max_patches,
                         model_cfg.latent.n_layers),
              "local": (model_cfg.encoder, config.data.seq_len,
                        model_cfg.encoder.n_layers + model_cfg.decoder.n_layers)}
  else:
    t = model_cfg.transformer
    stacks = {"transformer": (t, config.data.seq_len, t.n_layers)}
  layers, step = {}, 0.0
  for name, (tc, length, count) in stacks.items():
    r = block_seconds(tc, rt, device, rows=rows, length=length)
    r["kernel_s"] = r["kernel_flops"] / peak
    r["seconds"] = r["compiler_s"] + r["kernel_s"]
    r["count"] = count
    layers[name] = r
    step += count * r["seconds"]
  step *= microbatches
  if any(r["compiler_s"] <= 0 for r in layers.values()):
    # Seen for v6e with libtpu 0.10.2: negative optimal_seconds; no estimate beats a wrong one.
    return dict(layers=layers, step_s=None, mfu=None)
  return dict(layers=layers, step_s=step, mfu=flops_per_step_per_device / (step * peak))
