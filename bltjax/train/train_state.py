"""Train state and sharded initialisation (never materialising unsharded state).

eval_shape(init) -> logical partition specs -> NamedShardings -> jit(init, out_shardings). The same
abstract, sharded state drives initialisation, checkpoint restore and compile-only checks.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.lm import TransformerLM
from bltjax.runtime import sharding
from bltjax.train import batch as batch_lib, experiment


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of train steps taken so far (skipped updates included)
  params: Any
  opt_state: Any
  guard: Any  # counters of the update guard (new_guard; bltjax.train.step)


def new_guard() -> dict:
  """Counters of skipped updates, kept on the devices and checkpointed with the state:
  non-finite and loss-spike skips so far, the current run of consecutive skips, the last
  skipped step (1-based), and the running loss mean for spike detection."""
  def zero():  # one buffer each: the state is donated to the step, buffer by buffer
    return jnp.zeros((), jnp.int32)
  return dict(nonfinite_steps=zero(), spike_steps=zero(), skip_streak=zero(),
              last_skipped_step=zero(), loss_ema=jnp.zeros((), jnp.float32),
              loss_ema_steps=zero())


def build_model(config, model_cfg=None) -> nn.Module:
  """The module of `config`; `model_cfg` is its experiment.model_config where already built."""
  cfg = experiment.model_config(config) if model_cfg is None else model_cfg
  return ByteLatentTransformer(cfg) if config.model_type == "blt" else TransformerLM(cfg)


def make_init_fn(config, model, optimizer: optax.GradientTransformation):
  """rng -> boxed TrainState (params and optimizer state keep their logical-axis boxes)."""
  def init(rng):
    params = model.init(rng, *batch_lib.example_inputs(config))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), guard=new_guard())
  return init


def abstract_state(config, model, optimizer, mesh):
  """(abstract unboxed state with shardings attached, state shardings)."""
  init = make_init_fn(config, model, optimizer)
  rng = jax.eval_shape(lambda: jax.random.key(0))  # abstract: the mesh may be a remote topology
  with sharding.mesh_context(mesh):
    boxed = jax.eval_shape(init, rng)
    shardings = sharding.logical_to_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          sharding.unbox(boxed), shardings)
  return abstract, shardings


def init_state(config, model, optimizer, mesh, shardings, seed: int):
  """Initialises every array directly into its shards (jit with out_shardings)."""
  init = make_init_fn(config, model, optimizer)
  with sharding.mesh_context(mesh):
    return jax.jit(lambda rng: sharding.unbox(init(rng)), out_shardings=shardings)(
        jax.random.key(seed))


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_state_from(config, optimizer, mesh, abstract, shardings, path: str):
  """A fresh train state (step 0, new optimizer state) whose params come from `path` (an
  exported/converted model or another workdir), restored directly onto their shards."""
  from bltjax.checkpoint import checkpointer  # Orbax: kept out of model-only uses of this module
  params = checkpointer.restore_params(path, abstract.params)
  with sharding.mesh_context(mesh):
    return jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                        opt_state=optimizer.init(p), guard=new_guard()),
                   in_shardings=(shardings.params,), out_shardings=shardings)(params)
