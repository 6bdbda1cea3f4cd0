"""Test setup: 8 fake CPU devices, set before JAX initialises its backend."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

from bltjax.runtime import process_setup  # noqa: E402

process_setup.set_defaults()

from absl import flags  # noqa: E402

# grain's multiprocess workers read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402

assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.device_count()}"
