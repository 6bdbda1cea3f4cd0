"""The pure train and eval steps.

train_step(state, batch) -> (state, metrics): gradient accumulation is a `lax.scan` over
microbatches inside the step; the loss is normalised by the number of target bytes of the whole
batch (not averaged per microbatch). Logits, cross-entropy and the loss are fp32.
"""

import math

import jax
import jax.numpy as jnp
import optax

from bltjax import batch as batch_lib
from bltjax import train_state as ts
from bltjax.model.layers import constrain

LN2 = math.log(2.0)


def loss_sums(logits_BxNxV, targets_BxN, mask_BxN):
  """(sum of masked cross-entropy in nats, number of target bytes), both fp32 scalars."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BxNxV.astype(jnp.float32),
                                                       targets_BxN)
  mask = mask_BxN.astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(mask)


def make_loss_fn(config, model):
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, *batch_lib.model_inputs(config, batch))
    return loss_sums(logits, batch["targets"], batch["mask"])
  return loss_fn


def _split_microbatches(batch, num):
  """[B, ...] -> [num, B/num, ...]; microbatch m takes rows m, m+num, ... so that every device
  keeps its own rows (the sharded batch axis stays sharded, no communication)."""
  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
    x = constrain(x, ("batch",) + (None,) * (x.ndim - 1))
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def train_step(state: ts.TrainState, batch, *, loss_fn, optimizer, lr_fn, microbatches: int):
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
        micro, (zeros, jnp.float32(0), jnp.float32(0)), _split_microbatches(batch, microbatches))
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  loss = ce / denom
  metrics = dict(loss=loss, bpb=loss / LN2, grad_norm=optax.tree.norm(grads),
                 lr=lr_fn(state.step), target_bytes=count)
  return ts.TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, loss_fn):
  """Sums, so that evaluation over several batches is exact: (ce_sum, target_bytes)."""
  ce, count = loss_fn(params, batch)
  return dict(ce_sum=ce, target_bytes=count)
