"""`python -m bltjax.bench train`: train-step bytes/s of bltjax and of the `transformers` BLT
port (PyTorch CPU; a test extra) on the same architecture, batch of bytes and patch lengths and
thread count, interleaved in one run; then bltjax's step time at N and 2N bytes per row.

Ratios are taken between measurements interleaved in the same run (these machines are noisy).
"""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bltjax.bench import common
from bltjax.interop import hf_config
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.config import (BLTConfig, PatchingConfig, RuntimeConfig, TransformerConfig,
                                 swiglu_hidden_dim)
from bltjax.runtime import sharding
from bltjax.train import step as step_lib, train_state as ts


def bench_config(dtype: str) -> BLTConfig:
  """BLT-1B's layout (1 encoder layer, 9 decoder layers with cross-attention, k=2, six hash
  n-gram tables, 512-byte windows) at a quarter of its width: 64M parameters.

  Runtime as one would run it on a CPU: no rematerialisation (memory is plentiful), 256-query
  attention blocks computed one after another (each block's scores stay in cache), layer loops
  unrolled (XLA:CPU then schedules across layers and needs no per-layer copies of saved
  activations)."""
  def t(dim, layers, window):
    return TransformerConfig(dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 64,
                             ffn_dim=swiglu_hidden_dim(dim), rope_theta=500000.0, norm_eps=1e-5,
                             attn_window=window)
  return BLTConfig(encoder=t(256, 1, 512), latent=t(512, 8, None), decoder=t(256, 9, 512),
                   cross_attn_k=2, cross_attn_nheads=4, cross_attn_all_layers_encoder=False,
                   cross_attn_all_layers_decoder=True, hash_group_sizes=(3, 4, 5, 6, 7, 8),
                   hash_vocab=16381, hash_functions=1,
                   runtime=RuntimeConfig(dtype=dtype, param_dtype="float32", remat_policy="none",
                                         attention="xla", attn_block=512,
                                         attn_chunk=256, attn_loop=True, scan_unroll=16))


class JaxStep:
  """A compiled bltjax train step (AdamW) on one batch."""

  def __init__(self, cfg: BLTConfig, tokens, targets, lengths):
    model = ByteLatentTransformer(cfg)
    params = sharding.unbox(
        jax.jit(lambda r: model.init(r, tokens, lengths))(jax.random.key(0))["params"])
    self.params = ts.param_count(params)
    opt = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)

    def loss_fn(p, b):
      return step_lib.loss_sums(model.apply({"params": p}, b["tokens"], b["patch_lengths"]),
                                b["targets"], b["mask"])
    self.state = ts.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=opt.init(params), guard=ts.new_guard())
    self.batch = dict(tokens=jnp.asarray(tokens), targets=jnp.asarray(targets),
                      mask=jnp.ones(tokens.shape, jnp.float32),
                      patch_lengths=jnp.asarray(lengths))
    lowered, _ = step_lib.lower_steps(self.state, self.batch, loss_fn=loss_fn, optimizer=opt,
                                      lr_fn=lambda s: 1e-4, microbatches=1)
    self.fn = lowered.compile()
    self()  # warm-up

  def __call__(self):
    self.state, m = self.fn(self.state, self.batch)
    jax.block_until_ready(m)


class TorchStep:
  """The `transformers` BltForCausalLM, same architecture, fwd+bwd+AdamW on the same batch.

  Runs in its own process (`python -m bltjax.bench _port`, see `port_worker`), so that PyTorch's
  and XLA's thread pools never spin against each other; the parent asks it for timings over a
  pipe.
  """

  def __init__(self, dtype: str, seq_len: int, batch: int, threads: int, bltjax_dtype: str):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "bltjax.bench", "_port", f"--port_dtype={dtype}",
         f"--seq_len={seq_len}", f"--batch={batch}", f"--threads={threads}",
         f"--dtype={bltjax_dtype}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.params = float(self._read())

  def _read(self):
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError("the PyTorch port benchmark process died")
      if line.startswith("@"):
        return line[1:].strip()

  def time(self, steps: int) -> float:
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    return float(self._read())

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def port_worker(*, port_dtype: str, seq_len: int, batch: int, threads: int, dtype: str):
  """Child process: builds the port (`dtype`: the bltjax config's compute dtype; `port_dtype`:
  float32, or bfloat16 autocast), then times `n` steps for every `n` read from stdin."""
  import torch
  from transformers import BltConfig as HFConfig, BltForCausalLM
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  cfg = bench_config(dtype)
  tokens, _, lengths = common.real_batch(batch, seq_len)
  pc = PatchingConfig(mode="byte", threshold=None, threshold_add=None, monotonic=False,
                      patch_size=None, max_patch_length=None)
  model = BltForCausalLM(HFConfig(**hf_config.config_to_hf(cfg, None, pc))).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  inputs = dict(input_ids=torch.tensor(tokens, dtype=torch.long),
                patch_lengths=torch.tensor(lengths, dtype=torch.long))
  # The port shifts labels itself: labels = inputs, so the loss covers the same target bytes.
  labels = inputs["input_ids"]
  autocast = port_dtype == "bfloat16"

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      out = model(**inputs, labels=labels, use_cache=False)
    out.loss.backward()
    opt.step()
    opt.zero_grad()

  step()  # warm-up
  print(f"@{sum(p.numel() for p in model.parameters())}", flush=True)
  for line in sys.stdin:
    print(f"@{common.median_time(step, int(line))}", flush=True)


def run(*, seq_len: int, batch: int, steps: int, rounds: int, threads: int, dtype: str):
  """Prints the step times and bytes/s of bltjax and the port (float32 and bf16 autocast) on
  `batch` rows of `seq_len` bytes, the median of `steps` timed steps in each of `rounds`
  interleaved rounds; then bltjax's step time at seq_len and 2 x seq_len."""
  n, b = seq_len, batch
  cfg = bench_config(dtype)
  tokens, targets, lengths = common.real_batch(b, n)
  ours = JaxStep(cfg, tokens, targets, lengths)
  ports = {dt: TorchStep(dt, n, b, threads, dtype) for dt in ("float32", "bfloat16")}
  nbytes = b * n
  print(f"config: BLT-1B layout at 1/4 width, {ours.params / 1e6:.1f}M parameters "
        f"(port: {ports['float32'].params / 1e6:.1f}M); batch {b} x {n} bytes, "
        f"{lengths.shape[1]} patches/row (space patching of stdlib source); "
        f"{threads} threads; bltjax compute {dtype}, fp32 params; glibc malloc "
        f"{'tuned' if 'GLIBC_TUNABLES' in os.environ else 'default'} in both processes")
  rows = {"bltjax": [], "port float32": [], "port bf16 autocast": []}
  for _ in range(rounds):
    rows["port float32"].append(ports["float32"].time(steps))
    rows["port bf16 autocast"].append(ports["bfloat16"].time(steps))
    time.sleep(2)  # let the idle port processes' OpenMP threads stop spinning
    rows["bltjax"].append(common.median_time(ours, steps))
  for port in ports.values():
    port.close()
  for name, times in rows.items():
    print(f"  {name:20s} step {np.median(times):6.2f} s   {nbytes / np.median(times):8.0f} bytes/s"
          f"   (rounds: {', '.join(f'{t:.2f}' for t in times)})")
  for name in ("port float32", "port bf16 autocast"):
    ratios = [p / o for o, p in zip(rows["bltjax"], rows[name])]
    print(f"  bltjax / {name}: {np.median(ratios):.2f}x bytes/s "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")
  long_tokens, long_targets, long_lengths = common.real_batch(b, 2 * n)
  ours_2n = JaxStep(cfg, long_tokens, long_targets, long_lengths)
  t1, t2 = [], []
  for _ in range(rounds):
    t1.append(common.median_time(ours, steps))
    t2.append(common.median_time(ours_2n, steps))
  print(f"bltjax step time at N={n}: {np.median(t1):.2f} s, at 2N={2 * n}: {np.median(t2):.2f} s "
        f"-> {np.median(t2) / np.median(t1):.2f}x for twice the bytes (local attention is "
        f"O(N*window))")
