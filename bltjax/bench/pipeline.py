"""`python -m bltjax.bench pipeline`: how a pod is fed. The entropy model's share of the step's
FLOPs (accelerator patching), the host cores that host patching would need, and what the host
pipeline without the model does per core (read + pack + hash + batch), plus its start-up time
and memory (the last two: `bltjax.bench.host`).
"""

import os
import subprocess
import sys

import jax

from bltjax.bench import common, host
from bltjax.model import patching
from bltjax.model.config import LMConfig, PatchingConfig, RuntimeConfig
from bltjax.model.lm import TransformerLM
from bltjax.runtime import sharding
from bltjax.train import experiment, flops as flops_lib, patcher

# Chips per host of the accelerators the pipeline bench sizes for.
HOSTS = (("tpu v5p", 4), ("tpu v6e", 8), ("nvidia h100", 8))
PARTS = ("all", "host", "startup")  # --part: everything, or one of the host measurements alone


def patching_worker(*, config: str, row_bytes: int):
  """Child process pinned to one core (`python -m bltjax.bench _pipeline`): host entropy
  patching bytes/s with `config`'s entropy model (a grain worker's job)."""
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  c = experiment.load(config)
  ecfg = LMConfig.from_dict(dict(c.entropy_model.model.to_dict(),
                                 runtime=RuntimeConfig.for_inference("float32")))
  tokens, _, _ = common.real_batch(2, row_bytes)
  model = TransformerLM(ecfg)
  params = sharding.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
  pc = PatchingConfig("entropy", 1.335442066192627, None, False, None, None)
  ent = patcher.entropies_fn(model)
  fn = jax.jit(lambda t: patching.cut_rows(t, ent(params, t), pc, max(2, row_bytes // 3)))
  jax.block_until_ready(fn(tokens))
  seconds = common.median_time(lambda: jax.block_until_ready(fn(tokens)), 3)
  print(f"@{tokens.size / seconds}", flush=True)


def run(*, configs: list[str], row_bytes: int, corpus_gb: float, part: str = "all",
        batch: int = 4, seconds: float = 8.0):
  """Prints how a pod of each of `configs` is fed (`part` 'all'), or one host measurement alone:
  'host', the host pipeline's bytes/s on one core (rows of the first config's seq_len, `batch`
  rows per batch, `seconds` per measurement); 'startup', its start-up time and memory on a
  synthetic corpus of `corpus_gb` GB per format."""
  if part == "startup":
    host.startup(corpus_gb)
    return
  first = experiment.load(configs[0])
  if part == "host":
    host.host_pipeline(first.data.seq_len, batch=batch, seconds=seconds)
    return
  out = subprocess.run([sys.executable, "-m", "bltjax.bench", "_pipeline",
                        f"--configs={configs[0]}", f"--row_bytes={row_bytes}"],
                       check=True, capture_output=True, text=True).stdout
  patch_core = float([line for line in out.splitlines() if line.startswith("@")][0][1:])
  host_core = host.host_pipeline(first.data.seq_len, batch=batch, seconds=seconds)
  print(f"\nper host CPU core: host entropy patching {patch_core:,.0f} bytes/s (the released "
        f"100M model, fp32); host pipeline without the model (read + pack + hash + batch) "
        f"{host_core:,.0f} bytes/s")
  for path in configs:
    c = experiment.load(path)
    step_fpb = flops_lib.blt_flops_per_byte(experiment.model_config(c), c.data.seq_len,
                                            4.5)["total"]
    ent_cfg = experiment.model_config(experiment.entropy_stage_config(c))
    ent_fpb = flops_lib.lm_flops_per_byte(ent_cfg, c.data.seq_len, training=False)
    print(f"\n{path}: step {step_fpb / 1e9:.2f} GFLOP/byte, entropy model forward "
          f"{ent_fpb / 1e9:.3f} GFLOP/byte = {100 * ent_fpb / step_fpb:.1f}% of the step")
    for chip, chips in HOSTS:
      # Accelerator patching adds the entropy model's FLOPs to the same chips.
      per_host = 0.4 * flops_lib.PEAK_FLOPS[chip] / (step_fpb + ent_fpb) * chips
      print(f"  {chip:12s} ({chips} chips/host) at 40% MFU: {per_host:,.0f} bytes/s per host; "
            f"host patching would need {per_host / patch_core:,.0f} cores, accelerator patching "
            f"{per_host / host_core:.2f} core(s) of input pipeline "
            f"({host_core / per_host:.1f}x margin per core)")
  print()
  host.startup(corpus_gb)
