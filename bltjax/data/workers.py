"""grain's worker processes: they end with the process that started them, quietly, and the
shared memory they hand batches over in is released before that process exits.

grain's `mp_prefetch` spawns its workers as daemonic `multiprocessing` children: they are stopped
when the training process exits normally, but not when it is SIGKILLed (or OOM-killed, or leaves
with `os._exit`). A worker then blocks on its full output queue forever, re-parented to PID 1,
holding its memory. `init_worker` prevents this.

Why poll `os.getppid()` rather than `prctl(PR_SET_PDEATHSIG)`: the death signal fires when the
*thread* that forked the worker exits, and grain starts workers from whichever thread first
calls `next()` (an interleave thread, or our prefetch thread, which restarts on restore).

Shared memory (grain 0.2.18): a worker copies each array of a batch into a shared-memory block
of its own and queues the block's name; the training process maps it as a `SharedMemoryArray`,
which unlinks the block when it is deleted, asynchronously, in a thread pool of grain's. Every
block is registered with multiprocessing's resource tracker, which reports the ones still
linked when the training process exits ("leaked shared_memory objects"). A block outlives a
stage when something still refers to its array (a batch read ahead; a device array, which on
CPU may alias the host buffer until jaxlib lets go of it, on some later JAX call), or when its
deletion is still queued at exit: multiprocessing stops grain's pool with whatever is queued.
So the prefetch thread copies each batch out (`in_process_memory`: blocks live only as long as
grain's own buffers) and a stage ends with `release_shared_memory`, once grain's iterator is
closed (`bltjax.data.prefetch.ThreadPrefetcher.close`).
"""

import multiprocessing
import os
import signal
import threading
import time

from grain.multiprocessing import SharedMemoryArray
import numpy as np

POLL_S = 0.5  # how soon an orphaned worker notices; getppid() is one cheap syscall
RELEASE_TIMEOUT_S = 60.0  # at most this long for grain's queued deletions (each is 2 syscalls)


def init_worker(worker_index: int, worker_count: int):
  """grain's `worker_init_fn(worker_index, worker_count)`, run in each worker before it reads
  data. Module-level, so that grain's cloudpickle sends it by reference.

  Ctrl-C reaches the whole process group: the worker ignores it and is stopped by the training
  process (otherwise every worker prints a KeyboardInterrupt traceback and leaves its shared
  memory behind). A daemon thread ends the worker once its parent is gone."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = multiprocessing.parent_process()  # the PID at spawn time, even if it already died
  parent_pid = parent.pid if parent is not None else os.getppid()
  threading.Thread(target=_exit_with_parent, args=(parent_pid,),
                   name="bltjax-exit-with-parent", daemon=True).start()


def _exit_with_parent(parent_pid: int):
  while os.getppid() == parent_pid:
    time.sleep(POLL_S)
  # Re-parented: the trainer is gone and nobody will read this worker's output. os._exit skips
  # the interpreter's shutdown, which could block on the queues and threads of the dead parent.
  os._exit(1)


def in_process_memory(batch):
  """`batch` (a dict of arrays, as grain yields it) with the arrays grain handed over in shared
  memory copied into this process's own: nothing downstream (the prefetch queue, the step loop,
  device arrays aliasing host buffers) keeps a block alive. The blocks are released as the
  shared arrays are dropped. Anything else is returned as it is."""
  if not isinstance(batch, dict):
    return batch
  return {k: np.array(v) if isinstance(v, SharedMemoryArray) else v for k, v in batch.items()}


def release_shared_memory(timeout: float = RELEASE_TIMEOUT_S):
  """Returns once grain has unlinked the blocks of every shared array already deleted.

  grain queues each deletion to a pool of one thread (`SharedMemoryArray.enable_async_del(1)`),
  which runs them in order: a no-op queued behind them returns when they are done. Call it once
  nothing refers to the arrays any more (grain's iterator closed, batches dropped)."""
  pool = getattr(SharedMemoryArray, "_del_thread_pool", None)  # private: may go away
  if pool is None:  # no shared array was ever deleted asynchronously
    return
  try:
    pool.apply_async(int).wait(timeout)
  except ValueError:  # the pool is stopped already (interpreter exit): nothing left to wait for
    pass
