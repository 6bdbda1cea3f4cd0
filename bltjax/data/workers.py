"""grain worker processes that end with the process that started them, quietly.

grain's `mp_prefetch` spawns its workers as daemonic `multiprocessing` children: they are stopped
when the training process exits normally, but not when it is SIGKILLed (or OOM-killed, or leaves
with `os._exit`). A worker then blocks on its full output queue forever, re-parented to PID 1,
holding its memory. `init_worker` prevents this.

Why poll `os.getppid()` rather than `prctl(PR_SET_PDEATHSIG)`: the death signal fires when the
*thread* that forked the worker exits, and grain starts workers from whichever thread first
calls `next()` (an interleave thread, or our prefetch thread, which restarts on restore).
"""

import multiprocessing
import os
import signal
import threading
import time

POLL_S = 0.5  # how soon an orphaned worker notices; getppid() is one cheap syscall


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
