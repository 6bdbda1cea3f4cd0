"""Process set-up bltjax does before JAX starts: XLA flags and the host allocator.

Only what the user has not chosen themselves is changed:

- XLA flags (each unless already in XLA_FLAGS / LIBTPU_INIT_ARGS; each backend reads only its
  own, so all are set on every machine):
  - CPU: XLA's YNNPACK fusions run the fused softmax-backward of attention (a batched dot with
    a reduction inside) an order of magnitude slower than unfused code; restricting them to
    individual dots keeps the fast YNNPACK matmuls.
  - GPU: collectives overlapped with compute (the FSDP all-gathers of the next layer and the
    reduce-scatters of the last one): the latency-hiding scheduler, pipelined all-gather,
    reduce-scatter and all-reduce in the layer loops, and while-loop double buffering (the
    flags of JAX's GPU performance tips, MaxText and Levanter).
  - TPU (LIBTPU_INIT_ARGS): async collective fusion (all-gathers fused into the compute that
    hides them, over several steps of the layer loop), compute/collective overlap on the
    TensorCore, and the data-parallel all-reduce optimisation (MaxText's v5p/v6e defaults).
  All were checked against this jax/libtpu: XLA and libtpu abort on a flag they do not know.
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
GPU_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",
             "--xla_gpu_enable_pipelined_all_gather=true",
             "--xla_gpu_enable_pipelined_reduce_scatter=true",
             "--xla_gpu_enable_pipelined_all_reduce=true",
             "--xla_gpu_enable_while_loop_double_buffering=true")
TPU_FLAGS = ("--xla_tpu_enable_async_collective_fusion=true",
             "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
             "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
             "--xla_tpu_overlap_compute_collective_tc=true",
             "--xla_enable_async_all_gather=true",
             "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
             "--xla_tpu_data_parallel_opt_different_sized_ops=true")

MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=68719476736")


def set_defaults():
  """Call before importing JAX (the entry points do it first thing)."""
  _add_flags("XLA_FLAGS", CPU_FLAGS + GPU_FLAGS)
  _add_flags("LIBTPU_INIT_ARGS", TPU_FLAGS)


def _add_flags(variable: str, flags):
  """Appends to the environment variable each of `flags` whose name it does not have yet."""
  value = os.environ.get(variable, "")
  names = {f.split("=")[0] for f in value.split()}
  for flag in flags:
    if flag.split("=")[0] not in names:
      value = f"{value} {flag}".strip()
  os.environ[variable] = value


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
