"""Orbax checkpoints of a training workdir: train state + grain iterator state + config + metadata.

Layout: `WORKDIR/checkpoints/<step>/{state, data, config, meta}` (`meta`: the metadata, e.g. which
entropy model cut the patches and the patching threshold). Saves are asynchronous; restores
take an abstract target that carries the *current* mesh's shardings, so a run saved on 8 devices
restores on 4 (or 1). Every path may be local or gs:// (Orbax writes through epath and tensorstore).

Integrity (bltjax/checkpoint/repair.py): a resumed run reads the newest checkpoint that reads
back (`restore_latest`); newer ones that cannot be read (truncated or missing files) are moved
aside to `<step>.corrupt`, never deleted, and Orbax's step listing ignores them. A checkpoint that
reads but does not fit the model (the config changed) is an error, not a fallback. Read-only uses
(`load_params`, ...) do not fall back: they raise `CheckpointError` naming the checkpoint and the
older steps there.
"""

import contextlib
import hashlib
import logging
import os
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bltjax.checkpoint import repair
from bltjax.runtime import errors, storage


class Restored(NamedTuple):
  """What `Checkpointer.restore_latest` read: the step it resumed from and its items."""
  step: int
  state: Any
  data_iter: Any
  config: dict
  metadata: dict  # the `meta` item


class CheckpointNotFound(errors.CheckpointError, FileNotFoundError):
  """No checkpoint at all under a path; also a FileNotFoundError for callers that catch that."""


class _Unreadable(Exception):
  """A checkpoint item is missing or empty (as opposed to an error from a reader)."""


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; local workdirs made absolute, gs:// URLs kept intact."""
  return storage.join(storage.abspath(workdir), "checkpoints")


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with the items bltjax saves."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3):
    storage.check_access(workdir, write=True)
    self.directory = checkpoint_dir(workdir)
    # cleanup_tmp_directories: a save killed mid-write (SIGKILL during an async save) leaves
    # `<step>.orbax-checkpoint-tmp` (local) or a step without its commit file (gs://); process 0
    # deletes those here, so that they can never block or confuse a later save or restore.
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True),
        item_handlers=_handlers())
    # Orbax runs that clean-up in a thread and only waits for it in the first save; wait now, so
    # that it cannot race restore_latest moving a step aside (pinned orbax-checkpoint 0.12.8).
    getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, config: dict, metadata: dict):
    """Asynchronous: returns once device arrays are copied; files are written in the background."""
    args = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config),
                meta=ocp.args.JsonSave(metadata))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    """One step, no fallback: (state on the shardings of `abstract_state`, the iterator)."""
    r = self._read(step, abstract_state, data_iter)
    return r.state, r.data_iter

  def metadata(self, step: int) -> tuple[dict, dict]:
    """(config, metadata) of one step, no fallback."""
    return self._read_json(step)[1:]

  def restore_latest(self, abstract_state, data_iter=None) -> Restored | None:
    """The newest checkpoint that reads back: state on `abstract_state`'s shardings, the data
    iterator restored in place, config and metadata. None when there is no checkpoint.

    A step that cannot be read (truncated or missing files, bad metadata) is logged and the next
    older one tried; once one reads, the unreadable newer ones are moved aside to
    `<step>.corrupt`. Nothing is moved when none reads: that raises CheckpointError listing every
    step and why. So does a checkpoint that reads but does not fit `abstract_state` (other tree
    or shapes: the config changed), and a storage error (unreachable, permission denied), both
    before anything is moved. Every process calls this; they agree on each step.
    """
    return repair.newest_readable(self.manager, self.directory,
                                  lambda step: self._read(step, abstract_state, data_iter),
                                  "restore")

  def latest_metadata(self) -> tuple[int, dict, dict] | None:
    """(step, config, metadata) of the newest checkpoint whose JSON items (and state metadata) read
    back, with the fallback of `restore_latest`; None when there is no checkpoint. Cheap: no
    arrays are read, so `restore_latest` may still fall back further (compare its step)."""
    return repair.newest_readable(self.manager, self.directory, self._read_json,
                                  "read the metadata of")

  def _read(self, step: int, abstract_state, data_iter) -> Restored:
    self._check_fits(step, abstract_state)
    args = dict(state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore())
    if data_iter is not None:  # grain's handler calls set_state again on a retry: that is fine
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    r = self.manager.restore(step, args=ocp.args.Composite(**args))
    return Restored(step, r["state"], r.get("data", data_iter), *_json_items(r))

  def _read_json(self, step: int) -> tuple[int, dict, dict]:
    _state_metadata(self.manager, step)
    r = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                           meta=ocp.args.JsonRestore()))
    return (step, *_json_items(r))

  def _check_fits(self, step: int, abstract_state):
    """CheckpointError (nothing moved) when an intact checkpoint's tree or shapes differ from
    the model's; reader errors propagate (the caller counts them as an unreadable checkpoint)."""
    problems = _mismatches(_flat(abstract_state), _flat(_state_metadata(self.manager, step)))
    if problems and all(p.startswith("missing guard/") for p in problems):
      raise errors.CheckpointError(
          f"{self._step_dir(step)}: saved by a bltjax without the update guard (its state has no "
          "guard counters), so it cannot be resumed; continue from its params in a new workdir "
          f"with --config.init_from={self._step_dir(step)}; nothing was moved")
    if problems:
      raise errors.CheckpointError(
          f"{self._step_dir(step)}: the checkpoint does not fit this model (the config changed "
          f"since it was saved): {'; '.join(problems[:20])}. Resume with the config it was "
          "saved with (WORKDIR/config.json), or train the new config in another workdir (with "
          "init_from= to start from these params where they fit); nothing was moved")

  def _step_dir(self, step: int) -> str:
    return storage.join(self.directory, str(step))

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _handlers():
  return dict(state=ocp.StandardCheckpointHandler(), data=grain.checkpoint.CheckpointHandler(),
              config=ocp.JsonCheckpointHandler(), meta=ocp.JsonCheckpointHandler())


def _json_items(restored, names=("config", "meta")) -> tuple[dict, ...]:
  for name in names:
    if not isinstance(restored.get(name), dict):
      raise _Unreadable(f"the {name} item is missing or not a JSON object")
  if "config" in names:
    _add_new_runtime_fields(restored["config"])
  return tuple(restored[name] for name in names)


# model.runtime fields that configs saved before them lack, with the value those runs computed
# with (bltjax.model.config.RuntimeConfig requires every field).
ADDED_RUNTIME_FIELDS = {"attention": "xla", "attn_block": 512}


def _add_new_runtime_fields(config: dict):
  for section in (config, config.get("entropy_model")):
    runtime = ((section or {}).get("model") or {}).get("runtime")
    if isinstance(runtime, dict):
      for field, value in ADDED_RUNTIME_FIELDS.items():
        runtime.setdefault(field, value)


def _state_metadata(manager, step: int):
  """The saved state's tree of array metadata (shapes), read from its _METADATA file."""
  saved = manager.item_metadata(step).get("state")
  if saved is None:
    raise _Unreadable("the state item has no readable metadata")
  return saved


def _params_metadata(manager, step: int):
  saved = _state_metadata(manager, step)
  if "params" not in saved:
    raise _Unreadable(f"its state has no params (it has {', '.join(sorted(saved))})")
  return saved["params"]


def _flat(tree) -> dict:
  """{'params/a/kernel': leaf}: names on which a live pytree (attributes, dicts, tuples) and
  Orbax's saved metadata tree (dicts, lists) agree."""
  return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
          leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _mismatches(want: dict, have: dict) -> list[str]:
  """Missing, unexpected and misshaped leaves, by name."""
  problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
  problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
  problems += [f"{k}: saved {tuple(have[k].shape)}, model needs {tuple(want[k].shape)}"
               for k in sorted(set(want) & set(have))
               if tuple(have[k].shape) != tuple(want[k].shape)]
  return problems


def _steps(directory: str) -> list[int]:
  """Step directories under a checkpoints dir, newest first: finished ones only on gs://
  (where a killed save leaves the step without its commit file)."""
  root = epath.Path(directory)
  steps = [int(d.name) for d in root.iterdir() if d.name.isdigit() and d.is_dir()]
  if storage.is_remote(directory) and os.fspath(directory).startswith("gs://"):
    steps = [s for s in steps if (root / str(s) / repair.COMMIT_FILE).exists()]
  return sorted(steps, reverse=True)


@contextlib.contextmanager
def _reading(directory: str, step: int):
  """Errors while reading one checkpoint -> one-line CheckpointError naming it and the older
  steps that could be used instead (read-only uses do not fall back on their own)."""
  try:
    yield
  except errors.CheckpointError:
    raise
  except Exception as e:
    repair.let_go(e)
    older = [s for s in _steps(directory) if s < step]
    hint = (f"older steps there: {', '.join(map(str, older))} (pass "
            f"{storage.join(directory, str(older[0]))} to use one)" if older else
            "no older step there")
    raise errors.CheckpointError(
        f"{storage.join(directory, str(step))}: cannot read this checkpoint "
        f"({repair.describe(e)}); {hint}") from e


def find_checkpoint(path: str) -> tuple[str, int]:
  """A training workdir, its checkpoints/ dir, or one step dir -> (checkpoints dir, step)."""
  path = storage.abspath(path)
  root = epath.Path(path)
  for directory in (root / "checkpoints", root, root.parent):
    if not directory.is_dir():
      continue
    if directory == root.parent and root.name.isdigit():
      return os.fspath(directory), int(root.name)
    steps = _steps(os.fspath(directory))
    if steps:
      return os.fspath(directory), steps[0]
  raise CheckpointNotFound(f"{path}: no Orbax checkpoint found (expected a training workdir with "
                           "checkpoints/<step>/)")


def load_params(path: str) -> tuple[dict, dict, dict, int]:
  """Params (numpy, host memory) + config + metadata of the latest checkpoint under `path`.

  Only the params are read (partial restore), not the optimizer state.
  """
  directory, step = find_checkpoint(path)
  with _reading(directory, step):
    manager = _reader(directory)
    try:
      saved = _params_metadata(manager, step)
      item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved)}
      restore_args = {"params": jax.tree.map(
          lambda m: ocp.RestoreArgs(restore_type=np.ndarray), saved)}
      r = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                       partial_restore=True),
          config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
      config, metadata = _json_items(r)
    finally:
      manager.close()
  logging.info("Loaded params of step %d from %s", step, directory)
  return r["state"]["params"], config, metadata, step


def _reader(directory: str):
  return ocp.CheckpointManager(directory, item_handlers=dict(
      state=ocp.PyTreeCheckpointHandler(), config=ocp.JsonCheckpointHandler(),
      meta=ocp.JsonCheckpointHandler(), data=grain.checkpoint.CheckpointHandler()))


def params_hash(params) -> str:
  """sha256 over every parameter (path, dtype, shape, bytes): which model cut the patches."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{arr.dtype}:{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def save_params(directory: str, params, config: dict, metadata: dict, step: int = 0):
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
      meta=ocp.args.JsonSave(metadata)), force=True)
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
  with _reading(directory, step):
    manager = _reader(directory)
    try:
      problems = _mismatches(_flat(abstract_params), _flat(_params_metadata(manager, step)))
      if problems:
        raise errors.CheckpointError(
            f"{storage.join(directory, str(step))}: params do not fit this model: "
            + "; ".join(problems[:20]))
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
  with _reading(directory, step):
    manager = ocp.CheckpointManager(directory, item_handlers=dict(
        meta=ocp.JsonCheckpointHandler()))
    try:
      r = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      metadata, = _json_items(r, ("meta",))
    finally:
      manager.close()
  recorded = (metadata.get("entropy_model") or {}).get("path")
  return resolve(storage.abspath(path), recorded) if recorded else None
