"""One writer per workdir: `hold(path)` keeps PATH/.lock for the life of a run, so that a second run
on the directory (a requeued job while the old allocation lives) stops with one line naming the
holder instead of both writing checkpoints and metrics.

The lock (JSON) names its holder: host, PID and process start time (a reused PID is not taken for
it), command line, a token and a heartbeat a daemon thread refreshes. It is stale, and taken over
with a WARNING, when its process is gone (read in /proc, on the machine it ran on) or, elsewhere,
when its heartbeat is older than `stale_after`. Creation is atomic locally (O_EXCL); on gs:// it is
a create-only-if-absent upload (ifGenerationMatch=0) re-read after a delay, which also catches lost
races where the precondition is ignored (the emulator) or in a takeover (delete, then create)."""

import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import jax
from etils import epath

from bltjax.runtime import errors, storage

LOCK_NAME = ".lock"
# A lock that does not parse is from a writer killed between creating and writing it (or garbage).
# Locally those are two steps, so a young one may be mid-write: wait until its mtime is this old,
# which no writer needs, then treat it as stale. (gs:// objects appear whole: this is just safe.)
CORRUPT_GRACE_S = 30.0
GCS_SETTLE_S = 2.0  # gs://: re-read our new lock after this long (>> one request's latency)
_ATTEMPTS = 5
_HOST = socket.gethostname()
_HAS_PROC = os.path.exists("/proc/self/stat")
_held: dict = {}  # path -> the WorkdirLock holding it in this process (a nested hold is a no-op)


class WorkdirLock:
  """An exclusive lock on a local or gs:// directory, as a context manager (see `hold`).
  `enabled=None`: JAX process 0 only (so construct it after jax.distributed.initialize). `lost`
  turns True if the heartbeat finds that another run took the lock (forced, or judged us stale)."""

  def __init__(self, path, *, force: bool = False, what: str = "training run",
               enabled: bool | None = None, stale_after: float = 600.0,
               heartbeat_every: float = 60.0):
    if heartbeat_every >= stale_after:
      raise ValueError(f"heartbeat_every ({heartbeat_every} s) must be shorter than stale_after "
                       f"({stale_after} s), or a live holder looks stale")
    if enabled is None:
      enabled = jax.process_index() == 0
    self.path, self.force, self.what, self.enabled = storage.abspath(path), force, what, enabled
    self.stale_after, self.heartbeat_every, self.lost = stale_after, heartbeat_every, False
    self._store = self._record = self._data = self._thread = self._owner = None
    self._stop, self._mutex = threading.Event(), threading.Lock()

  def __enter__(self):
    if self.enabled:
      self._owner = _held.get(self.path)
      if self._owner is None:
        self.acquire()
        _held[self.path] = self
    return self

  def __exit__(self, *exc):
    if self.enabled and self._owner is None:
      _held.pop(self.path, None)
      self.release()

  def acquire(self):
    """Takes the lock, or raises errors.WorkdirLocked naming its live holder."""
    self._store = _Gcs(self.path) if storage.is_remote(self.path) else _Local(self.path)
    self._record = _record(self.what)
    self._data = json.dumps(self._record).encode()
    for _ in range(_ATTEMPTS):
      raw, mtime = self._store.read()  # first: a store ignoring the precondition would overwrite
      if raw is None:
        if self._store.create(self._data) and self._settled():
          break
        continue
      if raw == self._data:  # ours: an upload retried after it had succeeded
        break
      while raw is not None and _parse(raw) is None and not self.force and \
          time.time() - mtime < CORRUPT_GRACE_S:
        time.sleep(min(1.0, CORRUPT_GRACE_S - (time.time() - mtime)))
        raw, mtime = self._store.read()
      if raw is None:
        continue  # released meanwhile
      holder = _parse(raw)
      reason = "forced" if self.force else "unreadable lock file" if holder is None else \
          _stale(holder, self.stale_after)
      if reason is None:
        raise errors.WorkdirLocked(
            f"{self.path} is in use by {_describe(holder)}; wait for it to finish, stop it, or "
            "rerun with --force_unlock if you are sure it is dead")
      logging.warning("%s: taking over the lock of %s (%s)", self.path, _describe(holder), reason)
      self._store.remove(raw)
    else:
      raise errors.WorkdirLocked(f"{self.path}: could not take the lock in {_ATTEMPTS} attempts, "
                                 "other runs keep taking it; stop them")
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()
    logging.info("%s: locked for this %s", self.path, self.what)

  def _settled(self) -> bool:
    """Whether our new lock is still ours after a delay (no delay locally: O_EXCL is atomic)."""
    if not self._store.settle_s:
      return True
    try:
      time.sleep(self._store.settle_s)
      return self._store.read()[0] == self._data
    except BaseException:  # KeyboardInterrupt while waiting: do not leave the lock behind
      self._store.remove(self._data)
      raise

  def release(self):
    """Stops the heartbeat, removes the lock if it is still ours. Never raises: it runs while
    another exception may be propagating."""
    if self._thread is None:
      return
    self._stop.set()
    with self._mutex:  # waits for a heartbeat in flight: none is written after this
      try:
        raw, _ = self._store.read()
        if raw is not None and _token(raw) == self._record["token"]:
          self._store.remove(raw)
        else:
          logging.warning("%s: not removing the lock: another run holds it now", self.path)
      except Exception as e:  # noqa: BLE001
        logging.warning("%s: could not remove the lock (%s); the next run will find it stale "
                        "(dead PID, or no heartbeat)", self.path, e)
    self._thread.join(timeout=5)
    self._thread = None

  def _beat(self):
    """Rewrites the heartbeat every `heartbeat_every` seconds; logs failures, never raises."""
    while not self._stop.wait(self.heartbeat_every):
      with self._mutex:
        if self._stop.is_set():
          return
        try:
          raw, _ = self._store.read()
          if raw is None or _token(raw) != self._record["token"]:
            self.lost = True
            logging.error("%s: lost the lock, now %s; another run may write here", self.path,
                          "removed" if raw is None else f"held by {_describe(_parse(raw))}")
            return
          self._record["heartbeat"] = _now()
          self._store.write(json.dumps(self._record).encode())
        except Exception as e:  # noqa: BLE001
          logging.warning("%s: lock heartbeat failed (%s); retrying", self.path, e)


def hold(path, **kwargs) -> WorkdirLock:
  """`with hold(workdir, force=..., what="training run"):` holds PATH/.lock for the block;
  keyword arguments as WorkdirLock."""
  return WorkdirLock(path, **kwargs)


def check(path):
  """Raises errors.WorkdirLocked if another run took the lock this process holds on `path` or a
  directory above it (e.g. forced while we were alive): called before writing a checkpoint."""
  path = storage.abspath(path)
  for held_path, lock in list(_held.items()):
    if lock.lost and (path == held_path or path.startswith(held_path.rstrip("/") + "/")):
      raise errors.WorkdirLocked(
          f"{held_path}: another run took this directory's lock while this one was running; "
          "stopping without writing more, so that the two runs do not overwrite each other")


class _Local:
  settle_s = 0.0

  def __init__(self, directory: str):
    os.makedirs(directory, exist_ok=True)
    self.path = os.path.join(directory, LOCK_NAME)

  def create(self, data: bytes) -> bool:
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    try:
      os.write(fd, data)
      os.fsync(fd)
    finally:
      os.close(fd)
    return True

  def read(self) -> tuple[bytes | None, float | None]:
    try:
      with open(self.path, "rb") as f:
        return f.read(), os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
      return None, None

  def write(self, data: bytes):  # readers see the old or the new lock, never half of one
    tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

  def remove(self, expected: bytes):
    """Removes the lock if it still reads `expected`: moved aside first (of two runs taking over
    one stale lock only one can move it), and put back if it was another run's new lock."""
    aside = f"{self.path}.{uuid.uuid4().hex}.old"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    with open(aside, "rb") as f:
      if f.read() != expected:
        try:
          os.link(aside, self.path)
        except FileExistsError:  # a third run created one meanwhile; the heartbeat of the
          pass  # run whose lock this was reports it lost
        except OSError:  # no hard links (some FUSE mounts)
          if not os.path.exists(self.path):
            os.rename(aside, self.path)
            return
    os.unlink(aside)


class _Gcs:
  settle_s = GCS_SETTLE_S

  def __init__(self, directory: str):
    self.path = storage.join(directory, LOCK_NAME)
    self.fs = epath.backend.fsspec_backend.fs(self.path)  # the gcsfs instance epath uses

  def create(self, data: bytes) -> bool:
    try:
      self.fs.pipe_file(self.path, data, mode="create")  # ifGenerationMatch=0: HTTP 412 if present
    except FileExistsError:
      return False
    return True

  def read(self) -> tuple[bytes | None, float | None]:
    self.fs.invalidate_cache(self.path)  # other processes write it: no cached listing
    try:
      mtime = self.fs.info(self.path)["mtime"].timestamp()
      return self.fs.cat_file(self.path), mtime
    except FileNotFoundError:
      return None, None

  def write(self, data: bytes):
    self.fs.pipe_file(self.path, data)

  def remove(self, expected: bytes):
    """Deletes the lock if it still reads `expected` (not atomic: `_settled` catches the race)."""
    if self.read()[0] == expected:
      self.fs.rm_file(self.path)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _machine() -> str | None:
  """Boot id and PID namespace: PIDs are compared only where both match (a container with the
  same host name sees other processes; after a reboot old PIDs mean nothing)."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f"{f.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
  except OSError:
    return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks since boot) of process `pid`; None if there is none."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except FileNotFoundError:
    return None
  fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parens
  return fields[0], int(fields[19])


def _record(what: str) -> dict:
  now, pid = _now(), os.getpid()
  return {"host": _HOST, "pid": pid, "process_start": _HAS_PROC and _proc_stat(pid)[1] or None,
          "machine": _machine(), "started": now, "heartbeat": now, "what": what,
          "argv": list(sys.argv), "token": uuid.uuid4().hex}


def _parse(raw: bytes) -> dict | None:
  """The holder, with "age" (seconds since its heartbeat) added; None for a corrupt lock."""
  try:
    h = json.loads(raw)
    if not isinstance(h["pid"], int) or not isinstance(h["host"], str) or not h["token"]:
      return None
    return h | {"age": time.time() - datetime.datetime.fromisoformat(h["heartbeat"]).timestamp()}
  except (ValueError, TypeError, KeyError):
    return None


def _token(raw: bytes) -> str | None:
  return (_parse(raw) or {}).get("token")


def _stale(h: dict, stale_after: float) -> str | None:
  """Why the lock `h` is stale, or None while its holder may be alive. On this machine the PID
  decides (a live holder with a late heartbeat is no reason to start a second writer); elsewhere,
  or without /proc (macOS), the heartbeat."""
  if _HAS_PROC and h["host"] == _HOST and h.get("machine") == _machine():
    proc = _proc_stat(h["pid"])
    if proc is None or proc[0] in ("Z", "X"):
      return f"process {h['pid']} has exited"
    if h.get("process_start") is not None and proc[1] != h["process_start"]:
      return f"PID {h['pid']} now belongs to another process"
    return None
  if h["age"] > stale_after:
    return f"no heartbeat for {h['age']:.0f} s"
  return None


def _describe(h: dict | None) -> str:
  if h is None:
    return "an unknown run (unreadable lock file)"
  command = " ".join(map(str, h.get("argv") or []))[:200]
  return (f"a {h.get('what', 'run')} on host {h['host']}, PID {h['pid']}, started "
          f"{h.get('started')}, last heartbeat {h['heartbeat']} ({h['age']:.0f} s ago)"
          + (f", command: {command}" if command else ""))
