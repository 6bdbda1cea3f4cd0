"""Benchmarks that print figures (never timed assertions): `python -m bltjax.bench <what>`.

  train     train-step bytes/s of bltjax and of the `transformers` BLT port (PyTorch CPU; a test
            extra) on the same architecture, batch of bytes and patch lengths, thread count,
            interleaved in one run; then bltjax's step time at N and 2N bytes per row.
  generate  cached generation vs. full recomputation (see bltjax.generate).
  pipeline  how a pod is fed: entropy FLOPs share, host cores needed, host pipeline
            bytes/s per core, start-up time and memory per process on a multi-GB corpus.
  compress  gzip -9, xz -9e and zstd -19 bits per byte on exactly the held-out bytes the trainer's
            eval_bpb covers (--config=experiments/small.py[:arg], default experiments/debug.py;
            --config.field=value overrides as for bltjax.main); see bltjax.bench_compress.

These machines are noisy: each figure is a median over several timed steps, and ratios are taken
between measurements interleaved in the same run.
"""

import os
import time

from absl import app, flags
from ml_collections import config_flags

from bltjax.runtime import process_setup

if __name__ == "__main__":
  process_setup.reexec_with_malloc_tuning()  # glibc malloc settings; see bltjax/runtime/process_setup.py
process_setup.set_defaults()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bltjax.data import sources  # noqa: E402
from bltjax.interop import hf_config  # noqa: E402
from bltjax.model import patching, tokenizer  # noqa: E402
from bltjax.model.blt import ByteLatentTransformer  # noqa: E402
from bltjax.model.config import (BLTConfig, PatchingConfig, RuntimeConfig,  # noqa: E402
                                 TransformerConfig, swiglu_hidden_dim)
from bltjax.runtime import sharding  # noqa: E402
from bltjax.train import step as step_lib, train_state as ts  # noqa: E402

_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "bytes per row")
_BATCH = flags.DEFINE_integer("batch", 4, "rows per step")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per measurement")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "interleaved rounds (bltjax, port, bltjax, ...)")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for the PyTorch port")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "bltjax compute dtype (params stay float32)")
_PORT_DTYPE = flags.DEFINE_string("port_dtype", "float32", "internal: the port worker's dtype")


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
                                         attn_chunk=256, attn_loop=True, scan_unroll=16))


def real_batch(batch: int, seq_len: int):
  """Rows of standard-library source bytes and their space patching (the same for both)."""
  src = sources.StdlibSource()
  stream = np.concatenate([tokenizer.encode(src[i].data) for i in range(40)])
  tokens = stream[:batch * (seq_len + 1)].reshape(batch, seq_len + 1).astype(np.int32)
  lengths = patching.space_patch_lengths(tokens[:, :-1])
  return tokens[:, :-1], tokens[:, 1:], lengths


def _median_time(fn, steps):
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


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

  Runs in its own process (`python -m bltjax.bench _port`), so that PyTorch's and XLA's thread
  pools never spin against each other; the parent asks it for timings over a pipe.
  """

  def __init__(self, dtype: str, seq_len: int, batch: int, threads: int, bltjax_dtype: str):
    import subprocess
    import sys
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


def port_worker():
  """Child process: builds the port, then times `n` steps for every `n` read from stdin."""
  import sys
  import torch
  from transformers import BltConfig as HFConfig, BltForCausalLM
  torch.set_num_threads(_THREADS.value)
  torch.manual_seed(0)
  cfg = bench_config(_DTYPE.value)
  tokens, targets, lengths = real_batch(_BATCH.value, _SEQ_LEN.value)
  pc = PatchingConfig(mode="byte", threshold=None, threshold_add=None, monotonic=False,
                      patch_size=None, max_patch_length=None)
  model = BltForCausalLM(HFConfig(**hf_config.config_to_hf(cfg, None, pc))).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
  inputs = dict(input_ids=torch.tensor(tokens, dtype=torch.long),
                patch_lengths=torch.tensor(lengths, dtype=torch.long))
  # The port shifts labels itself: labels = inputs, so the loss covers the same target bytes.
  labels = inputs["input_ids"]
  autocast = _PORT_DTYPE.value == "bfloat16"

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
      out = model(**inputs, labels=labels, use_cache=False)
    out.loss.backward()
    opt.step()
    opt.zero_grad()

  step()  # warm-up
  print(f"@{sum(p.numel() for p in model.parameters())}", flush=True)
  for line in sys.stdin:
    print(f"@{_median_time(step, int(line))}", flush=True)


def bench_train():
  n, b, steps = _SEQ_LEN.value, _BATCH.value, _STEPS.value
  cfg = bench_config(_DTYPE.value)
  tokens, targets, lengths = real_batch(b, n)
  ours = JaxStep(cfg, tokens, targets, lengths)
  ports = {dt: TorchStep(dt, n, b, _THREADS.value, _DTYPE.value) for dt in ("float32", "bfloat16")}
  nbytes = b * n
  print(f"config: BLT-1B layout at 1/4 width, {ours.params / 1e6:.1f}M parameters "
        f"(port: {ports['float32'].params / 1e6:.1f}M); batch {b} x {n} bytes, "
        f"{lengths.shape[1]} patches/row (space patching of stdlib source); "
        f"{_THREADS.value} threads; bltjax compute {_DTYPE.value}, fp32 params; glibc malloc "
        f"{'tuned' if 'GLIBC_TUNABLES' in os.environ else 'default'} in both processes")
  rows = {"bltjax": [], "port float32": [], "port bf16 autocast": []}
  for _ in range(_ROUNDS.value):
    rows["port float32"].append(ports["float32"].time(steps))
    rows["port bf16 autocast"].append(ports["bfloat16"].time(steps))
    time.sleep(2)  # let the idle port processes' OpenMP threads stop spinning
    rows["bltjax"].append(_median_time(ours, steps))
  for port in ports.values():
    port.close()
  for name, times in rows.items():
    print(f"  {name:20s} step {np.median(times):6.2f} s   {nbytes / np.median(times):8.0f} bytes/s"
          f"   (rounds: {', '.join(f'{t:.2f}' for t in times)})")
  for name in ("port float32", "port bf16 autocast"):
    ratios = [p / o for o, p in zip(rows["bltjax"], rows[name])]
    print(f"  bltjax / {name}: {np.median(ratios):.2f}x bytes/s "
          f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")
  long_tokens, long_targets, long_lengths = real_batch(b, 2 * n)
  ours_2n = JaxStep(cfg, long_tokens, long_targets, long_lengths)
  t1, t2 = [], []
  for _ in range(_ROUNDS.value):
    t1.append(_median_time(ours, steps))
    t2.append(_median_time(ours_2n, steps))
  print(f"bltjax step time at N={n}: {np.median(t1):.2f} s, at 2N={2 * n}: {np.median(t2):.2f} s "
        f"-> {np.median(t2) / np.median(t1):.2f}x for twice the bytes (local attention is "
        f"O(N*window))")


_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "generate: a trained model to use (default: "
                                  "the debug architecture, randomly initialised)")
_NEW_BYTES = flags.DEFINE_integer("new_bytes", 1024, "generate: bytes to generate")


def _debug_model():
  """experiments/debug.py's BLT and entropy model, random init, threshold at the median entropy."""
  import os
  from bltjax import BLT
  from bltjax.train import experiment
  from bltjax.model.config import LMConfig
  from bltjax.model.lm import TransformerLM
  cfg = experiment.load(os.path.join(os.path.dirname(__file__), "..", "experiments", "debug.py"))
  runtime = RuntimeConfig.for_inference("float32")
  model = BLTConfig.from_dict(dict(cfg.model.to_dict(), runtime=runtime))
  ent = LMConfig.from_dict(dict(cfg.entropy_model.model.to_dict(), runtime=runtime))
  tokens, _, _ = real_batch(2, 256)
  params = sharding.unbox(jax.jit(ByteLatentTransformer(model).init)(
      jax.random.key(0), tokens, np.ones((2, 257), np.int32))["params"])
  eparams = sharding.unbox(jax.jit(TransformerLM(ent).init)(jax.random.key(1), tokens)["params"])
  byte = PatchingConfig("byte", None, None, False, None, None)
  threshold = float(np.quantile(BLT(model, params, patching_cfg=byte, entropy_cfg=ent,
                                    entropy_params=eparams).entropies(tokens), 1 - 1 / 3))
  pc = PatchingConfig("entropy", threshold, None, False, None, None)
  return BLT(model, params, patching_cfg=pc, entropy_cfg=ent, entropy_params=eparams,
             max_context=4096)


def bench_generate():
  from bltjax import BLT
  from bltjax.inference import generator as gen_lib
  blt = BLT.load(_CHECKPOINT.value) if _CHECKPOINT.value else _debug_model()
  new = _NEW_BYTES.value
  prompt = [b"def main(argv):\n  "]
  tokens, lengths = gen_lib.prepare_prompts(prompt, new, max(blt.max_context, new + 64))
  one, _ = blt._jit_steps
  sampling = gen_lib.Sampling(stop_at_eos=False)
  results = {}
  for recompute in (False, True):
    state = blt._generator.init_state(tokens, lengths, 0)
    state = one(blt.params, blt.entropy_params, state, sampling, recompute=recompute)  # compile
    state = blt._generator.init_state(tokens, lengths, 0)
    times = []
    while int(state.t) < tokens.shape[1] - 1:
      t0 = time.perf_counter()
      state = one(blt.params, blt.entropy_params, state, sampling, recompute=recompute)
      jax.block_until_ready(state.t)
      times.append(time.perf_counter() - t0)
    gen_times = np.array(times[int(lengths[0]) - 1:])  # steps that produced new bytes
    results[recompute] = (gen_times, np.asarray(state.tokens))
    name = "full recomputation" if recompute else "cached"
    print(f"{name:20s} {new / gen_times.sum():8.1f} bytes/s over {new} new bytes; first 256: "
          f"{256 / gen_times[:256].sum():8.1f} bytes/s, last 256: "
          f"{256 / gen_times[-256:].sum():8.1f} bytes/s")
  # Steps that finish a patch also run the latent transformer: show how many each window has.
  out = results[False][1]
  starts = np.cumsum(blt.patch_lengths(out[:, :-1])[0])
  first = (starts > lengths[0]) & (starts <= lengths[0] + 256)
  last = starts > out.shape[1] - 256
  print(f"patches finished in the first 256 new bytes: {first.sum()}, in the last 256: "
        f"{last.sum()}")
  # Per step, split by whether the step finished a patch (byte t+1 starts one).
  gen_times = results[False][0]
  step_pos = np.arange(len(gen_times)) + lengths[0]  # the step that reads byte t produces t+1
  finishes = np.isin(step_pos, starts)
  for name, window in (("first", slice(0, 256)), ("last", slice(-256, None))):
    f, t = finishes[window], gen_times[window]
    print(f"  cached steps in the {name} 256: {1e3 * t[~f].mean():.2f} ms without a patch "
          f"boundary, {1e3 * t[f].mean():.2f} ms with one (latent step)")
  same = np.array_equal(results[False][1], results[True][1])
  ratio = results[True][0].sum() / results[False][0].sum()
  patches = blt.patch_lengths(results[False][1][:, :-1])
  print(f"cached / recomputation: {ratio:.1f}x bytes/s; identical bytes: {same}; "
        f"{(patches > 0).sum()} patches over {results[False][1].shape[1]} bytes")


_CONFIGS = flags.DEFINE_list("configs", ["experiments/8b.py", "experiments/1b.py"],
                             "pipeline: experiment configs")
_ROW_BYTES = flags.DEFINE_integer("row_bytes", 2048, "pipeline: bytes per measured row (the cost "
                                  "per byte does not depend on it beyond the 512-byte window)")
_CORPUS_GB = flags.DEFINE_float("corpus_gb", 2.0, "pipeline: size of the synthetic corpus for "
                                "the start-up measurement")
# Chips per host of the accelerators the pipeline bench sizes for.
_HOSTS = (("tpu v5p", 4), ("tpu v6e", 8), ("nvidia h100", 8))


def _pipeline_worker():
  """Child process pinned to one core: host entropy patching bytes/s (a grain worker's job)."""
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  from bltjax.train import experiment, patcher
  from bltjax.model.config import LMConfig
  from bltjax.model.lm import TransformerLM
  c = experiment.load(_CONFIGS.value[0])
  ecfg = LMConfig.from_dict(dict(c.entropy_model.model.to_dict(),
                                           runtime=RuntimeConfig.for_inference("float32")))
  tokens, _, _ = real_batch(2, _ROW_BYTES.value)
  model = TransformerLM(ecfg)
  params = sharding.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  pc = PatchingConfig("entropy", 1.335442066192627, None, False, None, None)
  ent = patcher.entropies_fn(model)
  fn = jax.jit(lambda t: patching.cut_rows(t, ent(params, t), pc, max(2, _ROW_BYTES.value // 3)))
  jax.block_until_ready(fn(tokens))
  seconds = _median_time(lambda: jax.block_until_ready(fn(tokens)), 3)
  print(f"@{tokens.size / seconds}", flush=True)


def bench_pipeline():
  """How a pod is fed: the entropy model's share of the step's FLOPs (accelerator patching), the
  host cores that host patching would need, and what the host pipeline without the model does
  per core (read + pack + hash + batch), plus its start-up time and memory."""
  import subprocess
  import sys
  from bltjax import bench_data
  from bltjax.train import experiment, flops as flops_lib
  out = subprocess.run([sys.executable, "-m", "bltjax.bench", "_pipeline",
                        f"--configs={_CONFIGS.value[0]}", f"--row_bytes={_ROW_BYTES.value}"],
                       check=True, capture_output=True, text=True).stdout
  patch_core = float([line for line in out.splitlines() if line.startswith("@")][0][1:])
  first = experiment.load(_CONFIGS.value[0])
  host_core = bench_data.bench_host_pipeline(seq_len=first.data.seq_len)
  print(f"\nper host CPU core: host entropy patching {patch_core:,.0f} bytes/s (the released "
        f"100M model, fp32); host pipeline without the model (read + pack + hash + batch) "
        f"{host_core:,.0f} bytes/s")
  for path in _CONFIGS.value:
    c = experiment.load(path)
    step_fpb = flops_lib.blt_flops_per_byte(experiment.model_config(c), c.data.seq_len,
                                            4.5)["total"]
    ent_cfg = experiment.model_config(experiment.entropy_stage_config(c))
    ent_fpb = flops_lib.lm_flops_per_byte(ent_cfg, c.data.seq_len, training=False)
    print(f"\n{path}: step {step_fpb / 1e9:.2f} GFLOP/byte, entropy model forward "
          f"{ent_fpb / 1e9:.3f} GFLOP/byte = {100 * ent_fpb / step_fpb:.1f}% of the step")
    for chip, chips in _HOSTS:
      # Accelerator patching adds the entropy model's FLOPs to the same chips.
      per_host = 0.4 * flops_lib.PEAK_FLOPS[chip] / (step_fpb + ent_fpb) * chips
      print(f"  {chip:12s} ({chips} chips/host) at 40% MFU: {per_host:,.0f} bytes/s per host; "
            f"host patching would need {per_host / patch_core:,.0f} cores, accelerator patching "
            f"{per_host / host_core:.2f} core(s) of input pipeline "
            f"({host_core / per_host:.1f}x margin per core)")
  print()
  bench_data.bench_startup(corpus_gb=_CORPUS_GB.value)


_COMPRESS_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "compress: the experiment whose held-out bytes to compress (default: "
    "experiments/debug.py)", lock_config=False)


def bench_compress():
  from bltjax import bench_compress
  from bltjax.train import experiment
  if _COMPRESS_CONFIG.value is None:
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "debug.py")
    config, name = experiment.load(path), "experiments/debug.py"
  else:
    config, name = _COMPRESS_CONFIG.value, flags.FLAGS["config"].config_filename
  bench_compress.main(config, f"{name}: ")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m bltjax.bench {{{','.join(COMMANDS)}}} [--flags]")
  COMMANDS[argv[1]]()


COMMANDS = {"train": bench_train, "generate": bench_generate, "pipeline": bench_pipeline,
            "compress": bench_compress, "_port": port_worker, "_pipeline": _pipeline_worker}

if __name__ == "__main__":
  from bltjax.runtime import cli
  cli.run(main)  # errors as one line (--verbose: traceback), exit 1
