"""Preemption: on SIGTERM (how spot TPU/GPU capacity is reclaimed) stop at the next step boundary.

The train loop asks `should_stop(step)` after every step; when it says yes the loop saves a
checkpoint, waits for it to be written and returns, and `main` exits 0 (re-running resumes).
Multi-process runs use JAX's preemption sync point (the coordination service agrees on one step
for every host, with no device synchronisation); a single process handles the signal itself.
"""

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionGuard:

  def __init__(self):
    self.requested = False
    self._distributed = jax.process_count() > 1
    self._previous = None
    if not self._distributed and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("received signal %d: saving a checkpoint at the next step boundary", signum)
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self._distributed:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
