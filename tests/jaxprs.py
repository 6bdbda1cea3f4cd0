"""Walking jaxprs in tests that check what a computation does (shapes, dtypes), not its values."""

import jax
import jax.extend  # jaxprs_in_params (not imported by `import jax`)


def all_eqns(jaxpr):
  """Equations of a jaxpr and of every sub-jaxpr (custom_vjp bodies, scans, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from all_eqns(sub)
