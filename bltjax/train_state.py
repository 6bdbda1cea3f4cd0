"""Train state, batch layout and sharded initialisation (never materialising unsharded state).

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

from bltjax import configs, sharding
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.entropy_model import EntropyModel


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # number of optimizer updates applied so far
  params: Any
  opt_state: Any


def build_model(config) -> nn.Module:
  cfg = configs.model_config(config)
  return ByteLatentTransformer(cfg) if config.model_type == "blt" else EntropyModel(cfg)


def batch_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one (global) batch as produced by the data pipeline.

  tokens/targets/mask: [B, N]; BLT adds patch_lengths [B, P] (rows sum to N + 1) and, when the
  pipeline computes them on the host, hash_ids [B, N, T].
  """
  n = config.data.seq_len
  spec = dict(tokens=jax.ShapeDtypeStruct((batch_size, n), jnp.int32),
              targets=jax.ShapeDtypeStruct((batch_size, n), jnp.int32),
              mask=jax.ShapeDtypeStruct((batch_size, n), jnp.float32))
  if config.model_type == "blt":
    spec["patch_lengths"] = jax.ShapeDtypeStruct((batch_size, config.patching.max_patches),
                                                 jnp.int32)
    if config.data.host_hash_ids:
      cfg = configs.model_config(config)
      spec["hash_ids"] = jax.ShapeDtypeStruct((batch_size, n, cfg.num_hash_tables), jnp.int32)
  return spec


def model_inputs(config, batch) -> tuple:
  if config.model_type == "blt":
    return batch["tokens"], batch["patch_lengths"], batch.get("hash_ids")
  return (batch["tokens"],)


def _example_inputs(config):
  spec = batch_spec(config, 1)
  dummy = {k: jnp.ones(v.shape, v.dtype) for k, v in spec.items()}
  return model_inputs(config, dummy)


def make_init_fn(config, model, optimizer: optax.GradientTransformation):
  """rng -> boxed TrainState (params and optimizer state keep their logical-axis boxes)."""
  def init(rng):
    params = model.init(rng, *_example_inputs(config))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
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
    return jax.jit(lambda rng: nn.meta.unbox(init(rng)), out_shardings=shardings)(
        jax.random.key(seed))


def batch_shardings(config, mesh, batch_size: int):
  return {k: sharding.batch_sharding(mesh, len(v.shape))
          for k, v in batch_spec(config, batch_size).items()}


def param_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_state_from(config, optimizer, mesh, abstract, shardings, path: str):
  """A fresh train state (step 0, new optimizer state) whose params come from `path` (an
  exported/converted model or another workdir), restored directly onto their shards."""
  from bltjax import checkpoint  # Orbax import kept out of model-only uses of this module
  params = checkpoint.restore_params(path, abstract.params)
  with sharding.mesh_context(mesh):
    return jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                        opt_state=optimizer.init(p)),
                   in_shardings=(shardings.params,), out_shardings=shardings)(params)
