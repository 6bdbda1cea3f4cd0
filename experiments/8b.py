"""The paper's 8B BLT, released by Meta as "blt-7b": 10.55B parameters, 3.84B in hash tables.

Naming: the paper calls it 8B (its latent transformer is the size of an 8B Llama); Meta's release
and the Hugging Face conversion call it blt-7b. Its latent is 4096 wide, 32 layers, 32 heads (MHA)
with a SwiGLU width of 11008, the dimensions of the released weights, which this config loads
(`BLT.from_hf`, `python -m bltjax.convert`).

    python -m bltjax.main --config=experiments/8b.py --config.data.source=jsonl \
        --config.data.paths="('/data/corpus/*.jsonl',)"
    python -m bltjax.main --config=experiments/8b.py:tiny      # same structure, smoke-run size

experiments/1b.py with the 8B's sizes: the architecture, its patching, data, schedule and
optimizer are written once there.
"""

import os

from bltjax.train import experiment


def get_config(arg=None):
  c = experiment.load(os.path.join(os.path.dirname(__file__), "1b.py"))  # all else as there
  for stack in (c.model.encoder, c.model.decoder):  # the local models
    stack.update(dim=1280, n_heads=20, n_kv_heads=20,
                 ffn_dim=3584)  # int(2*4*1280/3) rounded up to 256
  c.model.decoder.n_layers = 6
  c.model.latent.update(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,  # Llama-2-7B shaped
                        ffn_dim=11008)
  c.model.cross_attn_k = 4  # k*D_E = 5120 -> Linear(5120, 4096) into the latent
  c.model.cross_attn_nheads = 20  # the local head count (as the HF conversion)
  if arg == "tiny":
    return experiment.tiny(c)
  if arg:
    raise ValueError(f"unknown config argument {arg!r} (valid: tiny)")
  return c
