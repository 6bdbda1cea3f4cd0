"""What the benchmarks measure with: rows of real bytes and a median timer (these machines are
noisy; a median over several timed calls holds up)."""

import os
import time

import numpy as np

from bltjax.data import sources
from bltjax.model import patching, tokenizer

# The default experiment of `generate` (its architecture) and `compress` (its held-out bytes).
DEBUG_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "debug.py")


def real_batch(batch: int, seq_len: int):
  """Rows of standard-library source bytes and their space patching (the same for both)."""
  src = sources.StdlibSource()
  stream = np.concatenate([tokenizer.encode(src[i].data) for i in range(40)])
  tokens = stream[:batch * (seq_len + 1)].reshape(batch, seq_len + 1).astype(np.int32)
  lengths = patching.space_patch_lengths(tokens[:, :-1])
  return tokens[:, :-1], tokens[:, 1:], lengths


def median_time(fn, steps: int) -> float:
  """The median wall time of `steps` calls of `fn`, in seconds."""
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))
