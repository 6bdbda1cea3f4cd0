"""A background thread that keeps the next batches ready.

grain's multiprocess prefetch hands batches to the training process in shared memory; this thread
takes them from there, copies them out (`workers.in_process_memory`), transforms them and queues
them, so the step loop only waits when the input pipeline really is behind. It remembers the
grain iterator state *after* each batch it queued, and its `get_state()` returns the state after
the last batch the loop *consumed*: checkpoints record exactly where the loop is, however far the
thread has read ahead. `close` ends it all and leaves no shared memory behind.
"""

import json
import queue
import threading
from typing import Any, Callable

from bltjax.data import workers

_END = object()


class ThreadPrefetcher:
  """Iterator over `transform(batch)` with grain-style get_state/set_state (for Orbax)."""

  def __init__(self, iterator, transform: Callable[[Any], Any], buffer_size: int = 2):
    self._it, self._transform, self._size = iterator, transform, buffer_size
    self._state = iterator.get_state()
    self._start()

  def _start(self):
    self._queue = queue.Queue(maxsize=self._size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, name="bltjax-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item):
    """Blocks until there is room or close() is called (a full queue must not hang close)."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return
      except queue.Full:
        continue

  def _work(self):
    try:
      while not self._stop.is_set():
        batch = workers.in_process_memory(next(self._it))
        self._put((self._transform(batch), self._it.get_state()))
    except StopIteration:
      self._put((_END, None))
    except BaseException as e:  # surfaced in the training thread by __next__
      self._put((e, None))

  def __iter__(self):
    return self

  def __next__(self):
    item, state = self._queue.get()
    if item is _END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    self._state = state
    return item

  # grain's Orbax handler treats non-DatasetIterator items as "legacy" iterators whose state is
  # JSON bytes, and calls start_prefetch() after a restore.
  def get_state(self) -> bytes:
    return json.dumps(self._state).encode()

  def set_state(self, state: bytes):
    self._stop_thread()
    self._state = json.loads(state)
    self._it.set_state(self._state)
    self._start()

  def start_prefetch(self):
    pass  # the thread is already running

  def _stop_thread(self):
    self._stop.set()
    self._thread.join()

  def close(self):
    """Stops the thread, then the grain iterator's own threads and worker processes; returns
    once the shared memory of the batches they had read ahead is released."""
    self._stop_thread()
    self._drop_queued()
    if hasattr(self._it, "close"):
      self._it.close()  # grain drops its buffered batches: their blocks are queued for deletion
    workers.release_shared_memory()

  def _drop_queued(self):
    """Batches read ahead and never consumed: their memory goes with the stage."""
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        return
