"""The pure train and eval steps, and the one place that jits them (`lower_steps`: for training,
the compile-only check `bltjax.aot` and the benchmarks).

train_step(state, batch) -> (state, metrics): gradient accumulation is a `lax.scan` over
microbatches inside the step; the loss is normalised by the number of target bytes of the whole
batch (not averaged per microbatch). Logits, cross-entropy and the loss are fp32.

The update guard lives in the step, so that it costs no host sync: an update whose loss, gradient
norm or new params are not finite (or, optionally, whose loss spikes above k times its running
mean) is not applied; params and optimizer state stay as they were, the step counter moves on
(the batch is consumed) and `state.guard` counts it. The host reads the counters with the
metrics, one step late, and stops or warns (`train.nonfinite`, `train.max_skipped_steps`).

    with sharding.mesh_context(mesh):  # where the model's logical sharding constraints apply
      train, evaluate = step.lower_steps(
          abstract_state, batch_spec, loss_fn=step.make_loss_fn(config, model),
          optimizer=optimizer, shardings=step.StepShardings(mesh, state_sh, batch_sh),
          with_eval=True, **step.train_options(config, mesh.size))
      train_fn, eval_fn = train.compile(), evaluate.compile()

train_fn: (state, batch) -> (state, metrics), the state donated; eval_fn: (params, batch) ->
dict(ce_sum, target_bytes).
"""

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bltjax.runtime import sharding
from bltjax.train import batch as batch_lib, experiment, optim, train_state as ts

LN2 = math.log(2.0)


def loss_sums(logits_BxNxV, targets_BxN, mask_BxN, target_bytes_BxN=None):
  """(sum of masked cross-entropy in nats, number of target bytes), both fp32 scalars.

  Byte models: a target is one byte. BPE (token_lm): `target_bytes_BxN` gives the text bytes of
  each target token, so that ce_sum / count is nats per byte of text (bltjax.data.bpe)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxNxV.astype(jnp.float32),
                                                       targets_BxN)
  mask = mask_BxN.astype(jnp.float32)
  count = mask if target_bytes_BxN is None else mask * target_bytes_BxN.astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(count)


def make_loss_fn(config, model):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, *batch_lib.model_inputs(config, batch))
    return loss_sums(logits, batch["targets"], batch["mask"], batch.get("target_bytes"))
  return loss_fn


def all_finite(tree) -> jax.Array:
  """One bool: every array of `tree` is finite (also checked before each checkpoint is written)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _guard(guard, ok, nonfinite, spike, loss, step, decay: float):
  """The next guard counters (see `train_state.new_guard`). The loss mean for spike detection is
  an exponential moving average over accepted steps only."""
  skipped = ~ok
  ema = jnp.where(ok, decay * guard["loss_ema"] + (1.0 - decay) * loss, guard["loss_ema"])
  return dict(
      nonfinite_steps=guard["nonfinite_steps"] + nonfinite.astype(jnp.int32),
      spike_steps=guard["spike_steps"] + spike.astype(jnp.int32),
      skip_streak=jnp.where(skipped, guard["skip_streak"] + 1, 0),
      last_skipped_step=jnp.where(skipped, step + 1, guard["last_skipped_step"]),
      loss_ema=ema, loss_ema_steps=guard["loss_ema_steps"] + ok.astype(jnp.int32))


def train_step(state: ts.TrainState, batch, *, loss_fn, optimizer, lr_fn, microbatches: int,
               loss_spike_factor: float = 0.0, loss_spike_horizon: int = 100):
  """`loss_spike_factor` > 0 also skips updates whose loss exceeds that many times the running
  mean, once `loss_spike_horizon` updates have been accepted (train.loss_spike_*)."""
  # loss_fn returns (ce_sum, count): differentiate the sum, carry the count along.
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro(carry, mb):
    grads, ce, count = carry
    (mb_ce, mb_count), g = grad_fn(state.params, mb)
    return (jax.tree.map(jnp.add, grads, g), ce + mb_ce, count + mb_count), None

  if microbatches == 1:
    (ce, count), grads = grad_fn(state.params, batch)
  else:
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, ce, count), _ = jax.lax.scan(
        micro, (zeros, jnp.float32(0), jnp.float32(0)),
        batch_lib.split_microbatches(batch, microbatches))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  loss = ce / denom
  grad_norm = optax.tree.norm(grads)
  nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params))
  g = state.guard
  decay = 1.0 - 1.0 / max(loss_spike_horizon, 1)  # the EMA's horizon, in accepted updates
  mean = g["loss_ema"] / (1.0 - decay ** g["loss_ema_steps"])  # bias-corrected
  spike = ~nonfinite & (loss_spike_factor > 0) & (g["loss_ema_steps"] >= loss_spike_horizon) & (
      loss > loss_spike_factor * mean)
  ok = ~(nonfinite | spike)
  keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731 (a select: no extra copy)
  guard = _guard(g, ok, nonfinite, spike, loss, state.step, decay)
  metrics = dict(loss=loss, bpb=loss / LN2, grad_norm=grad_norm, lr=lr_fn(state.step),
                 target_bytes=count, skipped_steps=guard["nonfinite_steps"] + guard["spike_steps"],
                 **{k: guard[k] for k in ("nonfinite_steps", "spike_steps", "skip_streak",
                                          "last_skipped_step")})
  return ts.TrainState(step=state.step + 1, params=jax.tree.map(keep, params, state.params),
                       opt_state=jax.tree.map(keep, opt_state, state.opt_state),
                       guard=guard), metrics


def eval_step(params, batch, *, loss_fn):
  """Sums, so that evaluation over several batches is exact: (ce_sum, target_bytes)."""
  ce, count = loss_fn(params, batch)
  return dict(ce_sum=ce, target_bytes=count)


# -- compilation -----------------------------------------------------------------------------------


class StepShardings(NamedTuple):
  """Where the steps' arrays live; the metrics come back replicated over `mesh`."""
  mesh: jax.sharding.Mesh
  state: Any  # a TrainState of NamedShardings (train_state.abstract_state)
  batch: dict  # name -> NamedSharding (batch.shardings)


def train_options(config, num_devices: int) -> dict:
  """The train step's settings from config.train and config.optim on `num_devices` (the number of
  microbatches may follow from it): keywords of lower_steps."""
  t = config.train
  return dict(lr_fn=optim.lr_schedule(config.optim, t.steps),
              microbatches=experiment.microbatches(config, num_devices),
              loss_spike_factor=t.loss_spike_factor, loss_spike_horizon=t.loss_spike_horizon)


def lower_steps(state, batch, *, loss_fn, optimizer, shardings: StepShardings | None = None,
                with_eval: bool = False, **options) -> tuple[Any, Any]:
  """(train step, eval step or None), lowered for the shapes of `state` (a TrainState) and
  `batch` (arrays or ShapeDtypeStructs); `.compile()` gives the programs.

  `options` are step.train_step's (lr_fn, microbatches, loss_spike_*). With `shardings` the
  programs take and return arrays on those shardings; without, jit places them as their
  arguments are placed.
  """
  train = functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, **options)
  evaluate = functools.partial(eval_step, loss_fn=loss_fn)
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
