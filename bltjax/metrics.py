"""Metric sinks: `metrics.jsonl`, TensorBoard event files and a console progress bar.

Only process 0 writes. Values arrive one step late from the train loop, so nothing here blocks
the device.
"""

import json
import os
import sys
import time

import jax
import tqdm
from tensorboardX import SummaryWriter


class MetricWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl (and TensorBoard)."""

  def __init__(self, workdir: str, *, prefix: str = ""):
    self.enabled = jax.process_index() == 0
    self.prefix = prefix
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self.path = os.path.join(workdir, "metrics.jsonl")
      self._file = open(self.path, "a", buffering=1)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    record = {"step": int(step)} | {k: _plain(v) for k, v in values.items()}
    self._file.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(self.prefix + k, v, step)

  def close(self):
    if self.enabled:
      self._file.close()
      self._tb.close()


def _plain(v):
  if hasattr(v, "item"):
    v = v.item()
  return float(v) if isinstance(v, float) else v


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """tqdm bar over the steps of a stage: step, loss, bpb, bytes/s, bytes per patch, ETA."""

  def __init__(self, total: int, initial: int, desc: str):
    self.enabled = jax.process_index() == 0
    self.bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                         dynamic_ncols=True, disable=not self.enabled, mininterval=1.0)

  def update(self, step: int, values: dict):
    if not self.enabled:
      return
    shown = {k: values[k] for k in ("loss", "bpb", "bytes_per_sec", "bytes_per_patch", "eval_bpb")
             if k in values}
    self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
    self.bar.update(step - self.bar.n)

  def close(self):
    self.bar.close()


class Timer:
  """Accumulates wall time of named sections between `reset`s (data wait vs. the whole step)."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.start, self.sections = time.perf_counter(), {}

  def add(self, name: str, seconds: float):
    self.sections[name] = self.sections.get(name, 0.0) + seconds

  def elapsed(self) -> float:
    return time.perf_counter() - self.start
