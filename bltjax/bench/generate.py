"""`python -m bltjax.bench generate`: cached generation against full recomputation (the
reference's way: re-running the model over the whole text for every new byte; see
bltjax.inference.generator), bytes/s at the start and at the end of a long generation."""

import time

import jax
import numpy as np

from bltjax.bench import common
from bltjax.inference import api, generator as gen_lib
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.config import BLTConfig, LMConfig, PatchingConfig, RuntimeConfig
from bltjax.model.lm import TransformerLM
from bltjax.runtime import sharding
from bltjax.train import experiment

def debug_model() -> api.BLT:
  """experiments/debug.py's BLT and entropy model, random init, threshold at the median entropy."""
  cfg = experiment.load(common.DEBUG_CONFIG)
  runtime = RuntimeConfig.for_inference("float32")
  model = BLTConfig.from_dict(dict(cfg.model.to_dict(), runtime=runtime))
  ent = LMConfig.from_dict(dict(cfg.entropy_model.model.to_dict(), runtime=runtime))
  tokens, _, _ = common.real_batch(2, 256)
  params = sharding.unbox(jax.jit(ByteLatentTransformer(model).init)(
      jax.random.key(0), tokens, np.ones((2, 257), np.int32))["params"])
  eparams = sharding.unbox(jax.jit(TransformerLM(ent).init)(jax.random.key(1), tokens)["params"])
  byte = PatchingConfig("byte", None, None, False, None, None)
  threshold = float(np.quantile(api.BLT(model, params, patching_cfg=byte, entropy_cfg=ent,
                                        entropy_params=eparams).entropies(tokens), 1 - 1 / 3))
  pc = PatchingConfig("entropy", threshold, None, False, None, None)
  return api.BLT(model, params, patching_cfg=pc, entropy_cfg=ent, entropy_params=eparams,
                 max_context=4096)


def run(*, checkpoint: str | None, new_bytes: int):
  """Generates `new_bytes` bytes after a short prompt with `checkpoint` (default: the debug
  architecture, randomly initialised), cached and recomputed, and prints bytes/s of each."""
  blt = api.BLT.load(checkpoint) if checkpoint else debug_model()
  new = new_bytes
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
