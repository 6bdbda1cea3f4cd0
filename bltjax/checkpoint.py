"""Orbax checkpoints of a training workdir: train state + grain iterator state + config + metadata.

Layout: `WORKDIR/checkpoints/<step>/{state, data, config, meta}`. Saves are asynchronous; restores
take an abstract target that carries the *current* mesh's shardings, so a run saved on 8 devices
restores on 4 (or 1). Every path may be local or gs:// (Orbax writes through epath and tensorstore).
"""

import hashlib
import logging
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bltjax import storage


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; local workdirs made absolute, gs:// URLs kept intact."""
  return storage.join(storage.abspath(workdir), "checkpoints")


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items bltjax saves."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3):
    storage.check_access(workdir, write=True)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=True),
        item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config: dict, meta: dict):
    """Asynchronous: returns once device arrays are copied; files are written in the background."""
    args = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
                meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores the state onto the shardings of `abstract_state` (and the iterator in place)."""
    args = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], restored.get("data", data_iter)

  def metadata(self, step: int) -> tuple[dict, dict]:
    r = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                           meta=ocp.args.JsonRestore()))
    return r["config"], r["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _handlers():
  return dict(state=ocp.StandardCheckpointHandler(), data=grain.checkpoint.CheckpointHandler(),
              config=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler())


def find_checkpoint(path: str) -> tuple[str, int]:
  """A training workdir, its checkpoints/ dir, or one step dir -> (checkpoints dir, step)."""
  path = storage.abspath(path)
  root = epath.Path(path)
  for directory in (root / "checkpoints", root, root.parent):
    if not directory.is_dir():
      continue
    if directory == root.parent and root.name.isdigit():
      return os.fspath(directory), int(root.name)
    steps = [int(d.name) for d in directory.iterdir() if d.name.isdigit()]
    if steps:
      return os.fspath(directory), max(steps)
  raise FileNotFoundError(f"{path}: no Orbax checkpoint found (expected a training workdir with "
                          "checkpoints/<step>/)")


def load_params(path: str) -> tuple[dict, dict, dict, int]:
  """Params (numpy, host memory) + config + meta of the latest checkpoint under `path`.

  Only the params are read (partial restore), not the optimizer state.
  """
  directory, step = find_checkpoint(path)
  manager = ocp.CheckpointManager(directory, item_handlers=dict(
      state=ocp.PyTreeCheckpointHandler(), config=ocp.JsonCheckpointHandler(),
      meta=ocp.JsonCheckpointHandler(), data=grain.checkpoint.CheckpointHandler()))
  try:
    meta_tree = manager.item_metadata(step)["state"]
    params_meta = meta_tree["params"]
    item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), params_meta)}
    restore_args = {"params": jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray),
                                           params_meta)}
    r = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  logging.info("Loaded params of step %d from %s", step, directory)
  return r["state"]["params"], r["config"], r["meta"], step


def params_hash(params) -> str:
  """sha256 over every parameter (path, dtype, shape, bytes): which model cut the patches."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{arr.dtype}:{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def save_params(directory: str, params, config: dict, meta: dict, step: int = 0):
  """A params-only checkpoint in the training layout (checkpoints/<step>/{state, config, meta}),
  so that everything that reads a training workdir (BLT.from_checkpoint, init_from, the patching
  entropy model) reads it too. No optimizer or data-iterator state."""
  storage.check_access(directory, write=True)
  manager = ocp.CheckpointManager(
      checkpoint_dir(directory), options=ocp.CheckpointManagerOptions(create=True),
      item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                         config=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler()))
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params}), config=ocp.args.JsonSave(config),
      meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()
  manager.close()


def resolve(base: str, path: str) -> str:
  """Paths recorded in an exported directory are relative to it (`base` local or gs://)."""
  if os.path.isabs(path) or storage.is_remote(path):
    return path
  if storage.is_remote(base):
    return storage.join(base, path)
  return os.path.normpath(os.path.join(base, path))


def restore_params(path: str, abstract_params):
  """Params of the checkpoint under `path`, restored straight onto the shardings of
  `abstract_params` (ShapeDtypeStructs with .sharding); names every missing or misshaped one."""
  directory, step = find_checkpoint(path)
  manager = ocp.CheckpointManager(directory, item_handlers=dict(
      state=ocp.PyTreeCheckpointHandler(), config=ocp.JsonCheckpointHandler(),
      meta=ocp.JsonCheckpointHandler(), data=grain.checkpoint.CheckpointHandler()))
  try:
    saved = manager.item_metadata(step)["state"]["params"]
    want = {jax.tree_util.keystr(k): v for k, v in
            jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    have = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: saved {tuple(have[k].shape)}, model needs {tuple(want[k].shape)}"
                 for k in sorted(set(want) & set(have))
                 if tuple(have[k].shape) != tuple(want[k].shape)]
    if problems:
      raise ValueError(f"{path}: params do not fit this model: " + "; ".join(problems[:20]))
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), abstract_params)
    r = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args},
        partial_restore=True)))
  finally:
    manager.close()
  return r["state"]["params"]


def recorded_entropy_model(path: str) -> str | None:
  """The entropy model recorded in the metadata of the checkpoint under `path`, if any."""
  directory, step = find_checkpoint(path)
  manager = ocp.CheckpointManager(directory, item_handlers=dict(
      meta=ocp.JsonCheckpointHandler()))
  try:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    manager.close()
  recorded = (meta.get("entropy_model") or {}).get("path")
  return resolve(storage.abspath(path), recorded) if recorded else None
