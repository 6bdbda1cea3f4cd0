"""The train and eval steps of bltjax.step as XLA programs: the one place that jits them, for
training (bltjax.train), the compile-only check (bltjax.aot) and the benchmarks (bltjax.bench).

    with sharding.mesh_context(mesh):  # where the model's logical sharding constraints apply
      train, evaluate = compile_steps.lower_steps(
          abstract_state, batch_spec, loss_fn=step.make_loss_fn(config, model),
          optimizer=optimizer, shardings=compile_steps.StepShardings(mesh, state_sh, batch_sh),
          with_eval=True, **compile_steps.train_options(config))
      train_fn, eval_fn = train.compile(), evaluate.compile()

train_fn: (state, batch) -> (state, metrics), the state donated; eval_fn: (params, batch) ->
dict(ce_sum, target_bytes).
"""

import functools
from typing import Any, NamedTuple

import jax

from bltjax import optim, sharding
from bltjax import step as step_lib


class StepShardings(NamedTuple):
  """Where the steps' arrays live; the metrics come back replicated over `mesh`."""
  mesh: jax.sharding.Mesh
  state: Any  # a TrainState of NamedShardings (train_state.abstract_state)
  batch: dict  # name -> NamedSharding (batch.shardings)


def train_options(config) -> dict:
  """The train step's settings from config.train and config.optim: keywords of lower_steps."""
  t = config.train
  return dict(lr_fn=optim.lr_schedule(config.optim, t.steps), microbatches=t.microbatches,
              loss_spike_factor=t.loss_spike_factor, loss_spike_horizon=t.loss_spike_horizon)


def lower_steps(state, batch, *, loss_fn, optimizer, shardings: StepShardings | None = None,
                with_eval: bool = False, **options) -> tuple[Any, Any]:
  """(train step, eval step or None), lowered for the shapes of `state` (a TrainState) and
  `batch` (arrays or ShapeDtypeStructs); `.compile()` gives the programs.

  `options` are step.train_step's (lr_fn, microbatches, loss_spike_*). With `shardings` the
  programs take and return arrays on those shardings; without, jit places them as their
  arguments are placed.
  """
  train = functools.partial(step_lib.train_step, loss_fn=loss_fn, optimizer=optimizer, **options)
  evaluate = functools.partial(step_lib.eval_step, loss_fn=loss_fn)
  if shardings is None:
    train_jit, eval_jit = jax.jit(train, donate_argnums=0), jax.jit(evaluate)
  else:
    metrics = sharding.replicated(shardings.mesh)
    train_jit = jax.jit(train, in_shardings=(shardings.state, shardings.batch),
                        out_shardings=(shardings.state, metrics), donate_argnums=0)
    eval_jit = jax.jit(evaluate, in_shardings=(shardings.state.params, shardings.batch),
                       out_shardings=metrics)
  return (train_jit.lower(state, batch),
          eval_jit.lower(state.params, batch) if with_eval else None)
