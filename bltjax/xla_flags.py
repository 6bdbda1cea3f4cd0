"""XLA flags bltjax sets before JAX starts (only flags the user has not set themselves).

On CPU, XLA's YNNPACK fusions run the fused softmax-backward of attention (a batched dot with a
reduction inside) an order of magnitude slower than unfused code; restricting them to individual
dots keeps the fast YNNPACK matmuls (see `python -m bltjax.bench train`). The flag only affects
the CPU backend.
"""

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)


def set_defaults():
  flags = os.environ.get("XLA_FLAGS", "")
  for flag in CPU_FLAGS:
    if flag.split("=")[0] not in flags:
      flags = f"{flags} {flag}".strip()
  os.environ["XLA_FLAGS"] = flags
