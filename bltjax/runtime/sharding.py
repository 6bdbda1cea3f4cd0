"""Mesh construction and the one logical-axis rules table.

Parameters carry logical axis names (`nn.with_logical_partitioning`) and activations are
constrained at block boundaries (`nn.with_logical_constraint`); `RULES` maps those names onto the
('data', 'fsdp', 'tensor') mesh. Constraints only apply inside `mesh_context(mesh)`.
"""

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

RULES = (
    # Activations.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    # Parameters: FSDP over the model width, tensor parallelism over heads and MLP width.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", None),       # 260 rows: too small to shard.
    ("hash_vocab", None),  # rows are gathered; the tables are sharded on 'embed' instead.
    ("norm", None),
    ("layers", None),
)


def make_mesh(shape, devices=None) -> jax.sharding.Mesh:
  """Mesh with axes ('data', 'fsdp', 'tensor'); one entry may be -1 (fill with what is left).

  Axis types are explicitly Auto: `jax.make_mesh` defaults to Explicit, which breaks GSPMD-style
  logical constraints.
  """
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape must have 3 entries {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  slices = num_slices(devices)
  if slices > 1 and shape[0] == 1 and -1 in shape[1:]:
    shape[0] = slices  # several slices: data parallel across them by default
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % rest:
      raise ValueError(f"mesh {shape}: {len(devices)} devices are not divisible by {rest}")
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, "
                     f"but {len(devices)} are available")
  if slices > 1:
    # Only 'data' crosses slices (DCN: gradients once per step); fsdp and tensor stay on ICI.
    if shape[0] % slices:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: 'data' must be a multiple of the "
                       f"{slices} slices (it is the one axis over the data-center network)")
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, shape[1], shape[2]),
                                               (slices, 1, 1), devices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return jax.make_mesh(tuple(shape), MESH_AXES, (AxisType.Auto,) * 3, devices=devices)


def num_slices(devices) -> int:
  """TPU slices the devices span (multi-slice runs connect slices over DCN); 1 elsewhere."""
  return len({getattr(d, "slice_index", 0) for d in devices})


@contextlib.contextmanager
def mesh_context(mesh, rules=RULES):
  """Activates `mesh` and the rules so that logical constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_shardings(abstract_boxed_tree, mesh, rules=RULES):
  """NamedShardings for a tree of (boxed) abstract values from `jax.eval_shape(init)`."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def unbox(tree):
  """Strips `nn.Partitioned` boxes without applying constraints (safe on ShapeDtypeStructs).
  The one way bltjax unboxes params and train states."""
  boxed = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if boxed(x) else x, tree,
                      is_leaf=boxed)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  """Batch-major arrays: the leading axis over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
