"""Compiling the real train step for a target topology from any CPU machine, and what it needs
(`python -m bltjax.aot`).

TPU topologies (v4-N, v5e-N, v5p-N, v6e-N: Cloud TPU names, N TensorCores; v4/v5p have two per
chip) compile through libtpu (`pip install -e ".[tpu]"`), no TPU needed. GPU meshes
(`h100x64`, `a100x8`, `h200xN`) compile on N fake host devices: their memory figures come from
the CPU compiler's buffer assignment, a guide rather than the GPU's exact numbers.

`compile_report` gives per-device memory (arguments = params + optimizer state + batch, outputs,
temporaries) against the device's memory, the sharding coverage of parameters and optimizer
state, SPMD "involuntary full rematerialization" warnings, FLOPs per step (analytic: XLA's cost
analysis counts a scanned layer once) and the step time a given MFU would give; with accelerator
patching, the entropy model compiled next to the step (`patching_report`). Everything is
abstract: no parameter is ever allocated. `check` is the command: this process set up as a
compile host, the report printed, and whether the step fits.
"""

import math
import os
import re
import sys
import tempfile

import jax
from jax.experimental import topologies
import numpy as np

from bltjax.model import fused_attention
from bltjax.model.lm import TransformerLM
from bltjax.runtime import sharding
from bltjax.train import (batch as batch_lib, experiment, flops, optim, patcher, roofline,
                          step as step_lib, train_state as ts)

_GPU = re.compile(r"^(h100|h200|a100)x(\d+)$")
_TPU = re.compile(r"^(v4|v5e|v5p|v6e)-(\d+)$")
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "h200": 141, "a100": 80}
# Cloud TPU names count TensorCores; v4 and v5p chips have two (one JAX device per chip).
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}


def prepare_environment(topology: str):
  """Sets this process up to compile for `topology`: the CPU backend only (libtpu must not try to
  grab a TPU on this host), and for a GPU mesh its N fake host devices. Call before JAX starts a
  backend."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")  # jax read JAX_PLATFORMS when it was imported
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  m = _GPU.match(topology)
  if m:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={m.group(2)}"


def topology_devices(topology: str, slices: int = 1):
  """(devices, device kind for the peak table, per-device memory in bytes); `slices` TPU slices
  of `topology` joined over DCN."""
  m = _TPU.match(topology)
  if slices != 1 and not m:
    raise ValueError(f"--slices={slices}: several slices are a TPU topology's (got {topology!r})")
  if slices < 1:
    raise ValueError(f"--slices={slices} must be >= 1")
  if m:
    gen, cores = m.group(1), int(m.group(2))
    chips = cores // _CORES_PER_CHIP[gen]
    shape = {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4",
             64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16",
             2048: "8x16x16", 4096: "16x16x16"} if gen in ("v4", "v5p") else {
                 1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                 256: "16x16"}
    if chips not in shape:
      raise ValueError(f"--topology={topology}: {chips} chips is not a known slice shape")
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen}:{shape[chips]}",
                                        num_slices=slices)
    return desc.devices, f"tpu {gen}", HBM_GIB[gen] * 2**30
  m = _GPU.match(topology)
  if m:
    n = int(m.group(2))
    if jax.device_count() != n:
      raise ValueError(f"--topology={topology} needs {n} fake devices; run bltjax.aot as a "
                       "program (it sets them before JAX starts)")
    return jax.devices(), f"nvidia {m.group(1)}", HBM_GIB[m.group(1)] * 2**30
  raise ValueError(f"--topology={topology!r}: expected v4-N, v5e-N, v5p-N, v6e-N or "
                   "h100xN / h200xN / a100xN")


def sharded_fraction(abstract_tree) -> tuple[float, int, int]:
  """(share of bytes that are sharded, sharded bytes, total bytes) over a tree of abstract
  arrays with shardings; a leaf counts as sharded if its partition spec splits any dimension."""
  total = sharded = 0
  for leaf in jax.tree.leaves(abstract_tree):
    nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    total += nbytes
    if any(p is not None for p in leaf.sharding.spec):
      sharded += nbytes
  return sharded / max(total, 1), sharded, total


class _CaptureStderr:
  """Captures what XLA's C++ logging writes to fd 2 (SPMD partitioner warnings)."""

  def __enter__(self):
    self.file = tempfile.TemporaryFile(mode="w+b")
    sys.stderr.flush()
    self.saved = os.dup(2)
    os.dup2(self.file.fileno(), 2)
    return self

  def __exit__(self, *exc):
    sys.stderr.flush()
    os.dup2(self.saved, 2)
    os.close(self.saved)
    self.file.seek(0)
    self.text = self.file.read().decode(errors="replace")
    self.file.close()


def compile_report(config, topology: str, mfu: float, bytes_per_patch: float,
                   slices: int = 1) -> dict:
  """Compiles `config`'s train step for `topology` (abstract state and batch, the run's mesh):
  its per-device memory, sharding coverage, FLOPs and the step time at `mfu`, assuming
  `bytes_per_patch` bytes per patch for a BLT's FLOPs. A failed compilation (e.g. out of memory)
  is reported as `error`, not raised."""
  devices, kind, hbm = topology_devices(topology, slices)
  cfg, _ = experiment.validate(config, len(devices))  # the frozen model config
  mesh = sharding.make_mesh(config.mesh.shape, devices=devices)
  model = ts.build_model(config, cfg)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  abstract, state_sh = ts.abstract_state(config, model, optimizer, mesh)
  t = config.train
  spec = batch_lib.spec(config, t.batch_size)
  batch_sh = batch_lib.shardings(mesh, spec)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
           for k, v in spec.items()}
  report = dict(topology=topology if slices == 1 else f"{slices} x {topology}",
                devices=len(devices), mesh=dict(mesh.shape), hbm=hbm, slices=slices)
  # Kernels are built for the target: splash as a Mosaic kernel for a TPU. A GPU mesh compiles
  # on host devices, where cuDNN kernels cannot: its attention is xla here.
  platform = "tpu" if _TPU.match(topology) else "cpu"
  report["attention"] = _attention_backends(config, platform)
  with (sharding.mesh_context(mesh), fused_attention.compiling_for(platform),
        _CaptureStderr() as log):
    lowered, _ = step_lib.lower_steps(
        abstract, batch, loss_fn=step_lib.make_loss_fn(config, model), optimizer=optimizer,
        shardings=step_lib.StepShardings(mesh, state_sh, batch_sh),
        **step_lib.train_options(config, len(devices)))
    try:
      compiled = lowered.compile()
      report["error"] = None
    except Exception as e:  # noqa: BLE001  (XLA reports out-of-memory as a runtime error)
      compiled, report["error"] = None, str(e).splitlines()[0]
  report["involuntary_remat"] = log.text.count("Involuntary full rematerialization")
  report["state_per_device"] = per_device_bytes(abstract)
  report["batch_per_device"] = per_device_bytes(batch)
  if compiled is not None:
    report["kernels"] = count_kernels(compiled.as_text())
    m = compiled.memory_analysis()
    report.update(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                  temporaries=m.temp_size_in_bytes, aliased=m.alias_size_in_bytes,
                  code=m.generated_code_size_in_bytes)
    report["total"] = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                       + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  report["patching"] = (patching_report(config, mesh, platform)
                        if batch_lib.device_patching(config) else None)
  if compiled is not None and report["patching"] and not report["patching"]["error"]:
    pr = report["patching"]
    # Patching runs between steps: its params and output (patch_lengths) stay resident during
    # the step; its temporaries only exist while the step's state sits in memory.
    resident = pr["arguments"] - pr["batch"] + pr["outputs"]
    report["total"] = max(report["total"] + resident,
                          m.argument_size_in_bytes + pr["arguments"] + pr["outputs"] +
                          pr["temporaries"])
  # Across slices only 'data' crosses DCN: each chip all-reduces its fp32 gradient shard with
  # its peers in the other slices once per step, 2 (S - 1) / S of the shard in a ring.
  grad_bytes = per_device_bytes(jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, np.float32, sharding=p.sharding), abstract.params))
  report["dcn_bytes_per_chip"] = 2 * (slices - 1) / slices * grad_bytes
  report["hash_tables"] = hash_table_layout(abstract, cfg, t.batch_size, config.data.seq_len)
  report["params_sharded"] = sharded_fraction(abstract.params)
  report["state_sharded"] = sharded_fraction((abstract.params, abstract.opt_state))
  bytes_per_step = t.batch_size * config.data.seq_len
  fpb = (flops.blt_flops_per_byte(cfg, config.data.seq_len, bytes_per_patch)["total"]
         if config.model_type == "blt" else flops.lm_flops_per_byte(cfg, config.data.seq_len))
  peak = flops.PEAK_FLOPS[kind]
  report.update(flops_per_byte=fpb, flops_per_step=fpb * bytes_per_step, peak=peak,
                bytes_per_step=bytes_per_step)
  report["step_time"] = fpb * bytes_per_step / (mfu * peak * len(devices))
  report["roofline"] = None
  if platform == "tpu" and compiled is not None:
    micro = experiment.microbatches(config, len(devices))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    report["roofline"] = roofline.step_estimate(
        config, cfg, devices[0], peak, micro, rows=t.batch_size // micro // shards,
        flops_per_step_per_device=report["flops_per_step"] / len(devices))
  return report


def _attention_backends(config, platform: str) -> dict:
  """{'model': backend, 'entropy_model': backend} that `auto` resolves to on `platform`."""
  out = {}
  for name, section in (("model", config.model),
                        ("entropy_model", (config.get("entropy_model") or {}).get("model"))):
    if section and "runtime" in section:
      backend = section.runtime.get("attention", "xla")
      with fused_attention.compiling_for(platform):
        out[name] = fused_attention.resolve(backend, head_dim=128, dtype="bfloat16",
                                            length=0)[0]
  return out


def hash_table_layout(abstract, model_cfg, batch_size: int, seq_len: int) -> dict | None:
  """The fused hash-embedding table's layout per chip: its shard's shape, its bytes with the
  optimizer's two moments, and what one step scatter-adds into it (a BLT; None otherwise)."""
  if not getattr(model_cfg, "num_hash_tables", 0):
    return None
  table = abstract.params["embed"]["hash_embeddings"]["embedding"]
  shard = table.sharding.shard_shape(table.shape)
  nbytes = math.prod(shard) * table.dtype.itemsize
  return dict(shape=tuple(table.shape), shard=tuple(shard), with_adam=3 * nbytes,
              lookups=batch_size * seq_len * model_cfg.num_hash_tables)


def per_device_bytes(tree) -> int:
  """Bytes of one device's shards of a tree of abstract arrays with shardings."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(tree))


_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def count_kernels(hlo_text: str) -> dict:
  """Fused attention kernels in compiled HLO text, counted by kind: Mosaic TPU kernels
  ('tpu_custom_call', named by the kernel: splash's forward, dq and dkv) and cuDNN attention
  custom calls. XLA's own runtime custom calls (buffers, async collectives) are not counted. A
  scanned layer's kernels appear once (in the loop body), not once per layer."""
  counts = {}
  for target in _CUSTOM_CALL.finditer(hlo_text):
    kind = target.group(1)
    if kind == "tpu_custom_call":
      line = hlo_text[hlo_text.rfind("\n", 0, target.start()) + 1:
                      hlo_text.find("\n", target.start())]
      name = re.search(r"(splash|flash)[a-z_]*", line)
      kind = name.group(0) if name else "tpu_custom_call"
    elif "cudnn" not in kind.lower() and "fmha" not in kind.lower():
      continue
    counts[kind] = counts.get(kind, 0) + 1
  return counts


def patching_report(config, mesh, platform: str = "cpu") -> dict:
  """Compiles accelerator patching (the entropy model of `config.entropy_model` + the cut) on
  the same mesh: per-device memory, and its FLOPs per byte."""
  stage = experiment.entropy_stage_config(config)
  ent_cfg = experiment.model_config(stage)
  model = TransformerLM(ent_cfg) if config.patching.mode == "entropy" else None
  specs = batch_lib.input_spec(config, config.train.batch_size, with_entropies=False)
  pc = experiment.patching_config(config, threshold=0.0)  # the value does not change the program
  with fused_attention.compiling_for(platform):
    lowered, _, _ = patcher.lower(model, pc, config.patching.max_patches, mesh, specs,
                                  experiment.microbatches(config, mesh.size))
  per_device = len(mesh.devices.flat)
  r = dict(batch=sum(math.prod(v.shape) * v.dtype.itemsize for v in specs.values()) // per_device)
  try:
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    r.update(error=None, arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             temporaries=m.temp_size_in_bytes, kernels=count_kernels(compiled.as_text()))
  except Exception as e:  # noqa: BLE001  (out of memory is reported as a runtime error)
    r["error"] = str(e).splitlines()[0]
  # The entropy model's forward pass over every byte (no backward), vs the step's FLOPs.
  r["flops_per_byte"] = (flops.lm_flops_per_byte(ent_cfg, config.data.seq_len, training=False)
                         if model else 0.0)
  return r


def print_report(r: dict, mfu: float):
  gib = 2**30
  print(f"topology {r['topology']}: {r['devices']} devices, mesh {r['mesh']}, "
        f"{r['hbm'] / gib:.0f} GiB per device")
  if r["error"]:
    print(f"  COMPILE FAILED: {r['error']}")
  else:
    print(f"  per-device memory: arguments {r['arguments'] / gib:.2f} GiB (params + optimizer "
          f"state + batch), outputs {r['outputs'] / gib:.2f} GiB ({r['aliased'] / gib:.2f} GiB "
          f"aliased to donated inputs), temporaries {r['temporaries'] / gib:.2f} GiB, code "
          f"{r['code'] / gib:.2f} GiB")
    batch = r["batch_per_device"]
    print(f"  of which: parameters + optimizer state {r['state_per_device'] / gib:.2f} GiB, batch "
          f"{batch / gib:.3f} GiB, activations and other temporaries {r['temporaries'] / gib:.2f}"
          f" GiB")
    print(f"  attention: {', '.join(f'{k} {v}' for k, v in r['attention'].items())}; fused "
          f"kernels in the compiled step (custom calls; a scanned layer's once): "
          f"{', '.join(f'{k} x{n}' for k, n in sorted(r['kernels'].items())) or 'none'}")
    print(f"  total {r['total'] / gib:.2f} GiB of {r['hbm'] / gib:.0f} GiB: "
          f"{'fits' if r['total'] <= r['hbm'] else 'DOES NOT FIT'}")
  pr = r.get("patching")
  if pr:
    if pr["error"]:
      print(f"  accelerator patching: COMPILE FAILED: {pr['error']}")
    else:
      print(f"  accelerator patching (entropy model + cut, per device): arguments "
            f"{pr['arguments'] / gib:.2f} GiB, outputs {pr['outputs'] / gib:.3f} GiB, temporaries "
            f"{pr['temporaries'] / gib:.2f} GiB, fused kernels "
            f"{', '.join(f'{k} x{n}' for k, n in sorted(pr['kernels'].items())) or 'none'}; "
            f"{pr['flops_per_byte'] / 1e9:.3f} GFLOP per byte = "
            f"{100 * pr['flops_per_byte'] / r['flops_per_byte']:.1f}% of the step's")
  if not r["error"]:
    print(f"  step + patching: {r['total'] / gib:.2f} GiB of {r['hbm'] / gib:.0f} GiB, "
          f"headroom {100 * (1 - r['total'] / r['hbm']):.0f}%")
  if r["slices"] > 1:
    print(f"  DCN between the {r['slices']} slices ('data' axis, gradient all-reduce once per "
          f"step; analytic): {r['dcn_bytes_per_chip'] / 2**20:.0f} MiB per chip per step, "
          f"{r['dcn_bytes_per_chip'] * r['devices'] / r['slices'] / gib:.1f} GiB per slice")
  ht = r.get("hash_tables")
  if ht:
    v, d = ht["shape"]
    print(f"  hash tables: [{v:,}, {d}] as [{ht['shard'][0]:,}, {ht['shard'][1]}] per chip "
          f"(columns over fsdp: every chip gathers its columns of every lookup, one [B, N] "
          f"lookup per table); with Adam {ht['with_adam'] / 2**20:.0f} MiB per chip; the "
          f"backward scatter-adds {ht['lookups']:,} rows of {ht['shard'][1]} per chip per step "
          "(every lookup of the global batch, its columns)")
  frac, shard, total = r["state_sharded"]
  print(f"  sharded: {100 * r['params_sharded'][0]:.2f}% of parameter bytes, {100 * frac:.2f}% of "
        f"parameter + optimizer bytes ({(total - shard) / 2**20:.1f} MiB replicated)")
  print(f"  SPMD involuntary full rematerializations: {r['involuntary_remat']}")
  print(f"  FLOPs: {r['flops_per_byte'] / 1e9:.2f} GFLOP per byte (training), "
        f"{r['flops_per_step'] / 1e15:.2f} PFLOP per step of {r['bytes_per_step'] / 2**20:.1f} "
        f"MiB")
  rf = r.get("roofline")
  if rf:
    print("  TPU compiler's roofline (an estimate, not a measurement; bltjax/train/roofline.py): "
          "one block forward + backward on one chip, attention kernels at peak")
    for name, layer in rf["layers"].items():
      print(f"    {name} block: {1e3 * layer['seconds']:.2f} ms ({1e3 * layer['compiler_s']:.2f} "
            f"ms compiler + {1e3 * layer['kernel_s']:.2f} ms attention kernels) x "
            f"{layer['count']} layers")
    if rf["step_s"] is None:
      print("    no step estimate: the compiler's optimal_seconds is not positive for this chip")
    else:
      print(f"    implies a step of {rf['step_s']:.2f} s, {100 * rf['mfu']:.0f}% MFU (without "
            "exposed collectives, embeddings, cross-attention and the optimizer update)")
  print(f"  at {100 * mfu:.0f}% MFU ({r['peak'] / 1e12:.0f} TFLOP/s peak per device): step "
        f"{r['step_time']:.2f} s, {r['bytes_per_step'] / r['step_time'] / 1e6:.2f} MB/s, "
        f"{r['bytes_per_step'] / r['step_time'] / r['devices'] / 1e3:.1f} kB/s per device")


def fits(r: dict) -> bool:
  """The step (and accelerator patching, if any) compiled and fits the device's memory."""
  return not (r["error"] or r["total"] > r["hbm"] or (r.get("patching") or {}).get("error"))


def check(config, topology: str, *, mfu: float, bytes_per_patch: float, slices: int = 1) -> bool:
  """What `python -m bltjax.aot` does: sets this process up as a compile host for `topology`
  (`prepare_environment`: before JAX starts a backend), compiles the step, prints the report
  and returns whether the step fits."""
  prepare_environment(topology)
  r = compile_report(config, topology, mfu, bytes_per_patch, slices)
  print_report(r, mfu)
  return fits(r)
