"""Multi-host initialisation: `jax.distributed.initialize` when launched on several processes."""

import os

import jax
from absl import flags, logging

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs without a cluster "
                                   "environment that JAX detects by itself).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")

# Environment variables that mean "this is one process of a multi-process job".
_CLUSTER_ENV = ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                "JAX_COORDINATOR_ADDRESS")


def initialize():
  """Explicit flags win; otherwise let JAX detect a SLURM job or a TPU VM (pod slices find
  their other hosts through the TPU metadata); a plain machine runs as one process."""
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif any(os.environ.get(k) for k in _CLUSTER_ENV) and _multi_process_env():
    jax.distributed.initialize()
  elif os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"):  # a TPU VM
    try:
      jax.distributed.initialize()
    except ValueError as e:  # a single-host TPU VM has nothing to join
      logging.info("jax.distributed not initialised (%s): single process", e)
      return
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def _multi_process_env() -> bool:
  if "SLURM_NTASKS" in os.environ:
    return int(os.environ["SLURM_NTASKS"]) > 1
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or "JAX_COORDINATOR_ADDRESS" in os.environ or \
      "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def process_index() -> int:
  return jax.process_index()
