"""Compile the real train step for a target topology from any CPU machine, and print what it needs.

    python -m bltjax.aot --config=experiments/8b.py --topology=v5p-256
    python -m bltjax.aot --config=experiments/1b.py --topology=h100x64 --mfu=0.35
    python -m bltjax.aot --config=experiments/8b.py --topology=v5p-256 --slices=2

TPU topologies (v4-N, v5e-N, v5p-N, v6e-N: Cloud TPU names, N TensorCores; v4/v5p have two per
chip) compile through libtpu (`pip install -e ".[tpu]"`), no TPU needed. GPU meshes
(`h100x64`, `a100x8`, `h200xN`) compile on N fake host devices: their memory figures come from
the CPU compiler's buffer assignment, a guide rather than the GPU's exact numbers.

Prints per-device memory (arguments = params + optimizer state + batch, outputs, temporaries)
against the device's memory, the sharding coverage of parameters and optimizer state, SPMD
"involuntary full rematerialization" warnings, FLOPs per step (analytic: XLA's cost analysis
counts a scanned layer once) and the step time and bytes/s a given MFU would give. Exits 1 when
the step does not fit. Everything is abstract: no parameter is ever allocated. The library:
`bltjax.train.aot`.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from bltjax.runtime import cli
from bltjax.train import aot

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-256, v5e-256, v4-128, v6e-64, h100x64, ...")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the time estimate.")
_BYTES_PER_PATCH = flags.DEFINE_float("bytes_per_patch", 4.5, "Mean patch size assumed for FLOPs.")
_SLICES = flags.DEFINE_integer("slices", 1, "TPU slices of --topology joined over DCN (the mesh's "
                               "'data' axis spans them).")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  cli.no_arguments(argv)
  if not aot.check(_CONFIG.value, _TOPOLOGY.value, mfu=_MFU.value,
                   bytes_per_patch=_BYTES_PER_PATCH.value, slices=_SLICES.value):
    sys.exit(1)
  logging.info("done")


if __name__ == "__main__":
  cli.run(main)  # errors as one line (--verbose: traceback), exit 1
