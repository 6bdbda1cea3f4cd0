"""Process set-up bltjax does before JAX starts: XLA flags and the host allocator.

Only what the user has not chosen themselves is changed:

- XLA flags (unless already in XLA_FLAGS). On CPU, XLA's YNNPACK fusions run the fused
  softmax-backward of attention (a batched dot with a reduction inside) an order of magnitude
  slower than unfused code; restricting them to individual dots keeps the fast YNNPACK matmuls.
  The flag only affects the CPU backend.
- glibc malloc, for programs (`reexec_with_malloc_tuning`, called by the entry points under
  `__main__`; skipped if BLTJAX_MALLOC_TUNING=0 or GLIBC_TUNABLES is already set). XLA:CPU
  allocates each step's temporaries (hundreds of MB to GBs) with malloc from its worker threads;
  glibc serves blocks that large from fresh mmaps and unmaps them on free, so every step
  page-faults all of them in again (~600k faults per step of `python -m bltjax.bench train`,
  ~15% of its step time). One arena, no mmap and a high trim threshold keep that memory in the
  process. glibc reads these settings only at start-up (mallopt cannot raise the trim threshold
  past 2 GiB), hence the re-exec. The cost: freed heap is not returned to the OS.
"""

import os
import platform
import sys

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)

MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=68719476736")


def set_defaults():
  """Call before importing JAX (the entry points do it first thing)."""
  xla_flags = os.environ.get("XLA_FLAGS", "")
  for flag in CPU_FLAGS:
    if flag.split("=")[0] not in xla_flags:
      xla_flags = f"{xla_flags} {flag}".strip()
  os.environ["XLA_FLAGS"] = xla_flags


def reexec_with_malloc_tuning():
  """Replaces this process by the same command with MALLOC_TUNABLES (same PID, argv and
  environment otherwise); returns if tuning is off, already applied or not glibc."""
  if (os.environ.get("BLTJAX_MALLOC_TUNING", "1") == "0" or "GLIBC_TUNABLES" in os.environ
      or not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc"):
    return
  os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
