"""`python -m bltjax.bench step`: a few real train steps of any config on the devices present,
per attention backend.

    python -m bltjax.bench step --config=experiments/1b.py --attention=xla,cudnn \
        --config.model.latent.n_layers=8 --config.train.batch_size=8   # one GPU: fewer layers

It builds the config's real state (randomly initialised, sharded over the config's mesh) and a
synthetic batch of random bytes cut into patches of `--bytes_per_patch` (patching is not timed:
the step alone), compiles the step once per backend, runs `--warmup` steps and times `--steps`.
It prints per backend: the median step time, bytes/s, the MFU those imply (the analytic FLOPs of
`bltjax.train.flops` against the devices' peak), the peak device memory where the backend reports
it, and the share of the step spent in self-attention: the attentions of one microbatch (every
stack, forward and backward, on random q, k, v of the step's shapes) timed alone, times the
microbatches, over the step time (an isolated measurement: fusion inside the step may differ).
"""

import copy
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bltjax.model import fused_attention
from bltjax.model.tokenizer import BOS_ID, EOS_ID
from bltjax.runtime import sharding
from bltjax.train import (batch as batch_lib, experiment, flops, optim, step as step_lib,
                          train_state as ts)


@dataclasses.dataclass
class StepResult:
  backend: str
  seconds: float        # median step time
  bytes_per_sec: float
  mfu: float
  peak_bytes: int | None  # the device's peak memory in use (None: not reported by the backend)
  attention_share: float  # the self-attentions' measured time alone (attention_seconds) / step


def synthetic_batch(config, batch_size: int, bytes_per_patch: float, seed: int) -> dict:
  """Random bytes with a document break per row, patches of about `bytes_per_patch`, the
  config's batch layout (numpy)."""
  rng = np.random.default_rng(seed)
  spec = batch_lib.spec(config, batch_size)
  n = config.data.seq_len
  tokens = rng.integers(4, 260, (batch_size, n + 1)).astype(np.int32)
  half = n // 2  # two documents per row: BOS ... EOS BOS ...
  tokens[:, 0], tokens[:, half], tokens[:, half + 1] = BOS_ID, EOS_ID, BOS_ID
  out = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
             mask=np.ones((batch_size, n), np.float32))
  if "patch_lengths" in spec:
    p = spec["patch_lengths"].shape[1]
    lengths = np.zeros((batch_size, p), np.int32)
    lengths[:, 0] = 1  # the BOS patch
    for row in lengths:  # then lengths 1..2*bpp-1 (mean bpp) covering n + 1 positions, the rest 0
      left, i = n, 1
      while left > 0 and i < p - 1:
        row[i] = min(left, int(rng.integers(1, max(2, int(2 * bytes_per_patch)))))
        left, i = left - row[i], i + 1
      row[i] += left  # what is left goes to the last patch
    out["patch_lengths"] = lengths
  for name, s in spec.items():
    if name not in out:
      out[name] = np.zeros(s.shape, s.dtype)
  return out


def _stacks(config, model_cfg) -> list[tuple]:
  """(transformer config, row length, layers) of each self-attention stack of the model."""
  if config.model_type == "blt":
    return [(model_cfg.latent, config.patching.max_patches, model_cfg.latent.n_layers),
            (model_cfg.encoder, config.data.seq_len, model_cfg.encoder.n_layers),
            (model_cfg.decoder, config.data.seq_len, model_cfg.decoder.n_layers)]
  t = model_cfg.transformer
  return [(t, config.data.seq_len, t.n_layers)]


def attention_seconds(config, model_cfg, mesh, rows: int, backend: str, steps: int) -> float:
  """Measured time of the step's self-attentions alone: each stack's attention, forward and
  backward, on one microbatch of `rows` rows (random q, k, v, one document break per row),
  times its layer count; summed over the stacks. The projections are not included."""
  rt = dataclasses.replace(model_cfg.runtime, attention=backend)
  dtype = jnp.dtype(rt.dtype)
  total = 0.0
  for tc, n, layers in _stacks(config, model_cfg):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(rows, n, h, tc.head_dim)), dtype)
               for h in (tc.n_heads, tc.n_kv_heads, tc.n_kv_heads))
    seg = jnp.asarray(np.repeat((np.arange(n) >= n // 2)[None].astype(np.int32), rows, 0))

    def loss(q, k, v, seg=seg, tc=tc):
      o = fused_attention.self_attention(q, k, v, seg, window=tc.attn_window, rt=rt)
      return jnp.sum(o.astype(jnp.float32))
    with sharding.mesh_context(mesh):
      fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    jax.block_until_ready(fn(q, k, v))
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(q, k, v))
      times.append(time.perf_counter() - t0)
    total += layers * statistics.median(times)
  return total


def run(config, *, attentions: list[str], steps: int, warmup: int, bytes_per_patch: float,
        seed: int = 0) -> list[StepResult]:
  devices = jax.devices()
  mesh = sharding.make_mesh(config.mesh.shape, devices=devices)
  model_cfg, _ = experiment.validate(config, len(devices))
  n, b = config.data.seq_len, config.train.batch_size
  fpb = (flops.blt_flops_per_byte(model_cfg, n, bytes_per_patch)["total"]
         if config.model_type == "blt" else flops.lm_flops_per_byte(model_cfg, n))
  peak = flops.device_peak_flops(devices[0], model_cfg.runtime.dtype) * len(devices)
  host_batch = synthetic_batch(config, b, bytes_per_patch, seed)
  results = []
  for backend in attentions:
    c = copy.deepcopy(config)
    with c.unlocked():
      c.model.runtime.attention = backend
    model = ts.build_model(c)
    optimizer = optim.make_optimizer(c.optim, c.train.steps)
    abstract, state_sh = ts.abstract_state(c, model, optimizer, mesh)
    state = ts.init_state(c, model, optimizer, mesh, state_sh, seed)
    batch_sh = batch_lib.shardings(mesh, batch_lib.spec(c, b))
    batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host_batch.items()}
    with sharding.mesh_context(mesh):
      lowered, _ = step_lib.lower_steps(
          abstract, batch, loss_fn=step_lib.make_loss_fn(c, model), optimizer=optimizer,
          shardings=step_lib.StepShardings(mesh, state_sh, batch_sh),
          **step_lib.train_options(c, len(devices)))
      fn = lowered.compile()
    for _ in range(warmup):
      state, m = fn(state, batch)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = fn(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    stats = devices[0].memory_stats() or {}
    sec = statistics.median(times)
    micro = experiment.microbatches(c, len(devices))
    del state, batch  # the attention measurement runs in what the step leaves free
    share = micro * attention_seconds(c, model_cfg, mesh, b // micro, backend, steps) / sec
    results.append(StepResult(backend, sec, b * n / sec, fpb * b * n / sec / peak,
                              stats.get("peak_bytes_in_use"), share))
  return results


def print_results(config, results: list[StepResult]):
  d = jax.devices()[0]
  print(f"{len(jax.devices())} x {d.device_kind} ({d.platform}); {config.model_type}, "
        f"{config.train.batch_size} rows x {config.data.seq_len} bytes per step")
  print("| attention | step (median) | bytes/s | MFU | peak memory per device | attention share |")
  print("|---|---|---|---|---|---|")
  for r in results:
    mem = "n/a" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.2f} GiB"
    share = f"{100 * r.attention_share:.0f}%"
    print(f"| {r.backend} | {r.seconds * 1e3:.1f} ms | {r.bytes_per_sec:,.0f} | "
          f"{100 * r.mfu:.1f}% | {mem} | {share} |")
  base = results[0]
  for r in results[1:]:
    print(f"{r.backend} vs {base.backend}: {base.seconds / r.seconds:.2f}x the speed")


def default_backends() -> list[str]:
  """xla, and the fused kernel of this platform where it has one."""
  fused = {"tpu": "splash", "gpu": "cudnn"}.get(jax.default_backend())
  return ["xla"] + ([fused] if fused else [])


def main(config, *, attentions: list[str] | None, steps: int, warmup: int,
         bytes_per_patch: float):
  """What `python -m bltjax.bench step` does."""
  if config is None:
    raise ValueError("bench step needs --config=experiments/<name>.py")
  results = run(config, attentions=attentions or default_backends(), steps=steps, warmup=warmup,
                bytes_per_patch=bytes_per_patch)
  print_results(config, results)
