"""Metric sinks: `metrics.jsonl`, TensorBoard event files and a console progress bar.

Only process 0 writes. Values arrive one step late from the train loop, so nothing here blocks
the device. A gs:// workdir cannot be appended to: there the records are kept in memory (with
those of earlier runs, read at start) and the whole object is rewritten from a background thread,
at most every `flush_secs`; TensorBoard writes into a local temporary directory whose event files
are copied to WORKDIR/tensorboard/ at the same times. A failed upload is logged and retried (the
records stay in memory); `flush()` and `close()` upload at once and raise if that fails.
"""

import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid

import jax
import numpy as np
import tqdm
from etils import epath
from tensorboardX import SummaryWriter

from bltjax.runtime import storage


class MetricWriter:
  """Appends one JSON object per logged step to WORKDIR/metrics.jsonl (and TensorBoard)."""

  def __init__(self, workdir: str, *, flush_secs: float = 2.0):
    self.enabled = jax.process_index() == 0
    self.remote = storage.is_remote(workdir)
    if not self.enabled:
      return
    self.path = storage.join(workdir, "metrics.jsonl")
    if not self.remote:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(self.path, "a", buffering=1)
      if self._file.tell() and not _ends_with_newline(self.path):
        self._file.write("\n")  # after a record cut short: the next one starts on its own line
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      return
    storage.check_access(workdir, write=True)
    self._tb_remote = epath.Path(workdir) / "tensorboard"
    self._local = tempfile.mkdtemp(prefix="bltjax-metrics-")
    self._tb_local = os.path.join(self._local, "tensorboard")
    # Event files are named by second and host: a suffix keeps two sessions' files apart.
    self._tb = SummaryWriter(self._tb_local, filename_suffix=f".{uuid.uuid4().hex[:8]}")
    previous = epath.Path(self.path)
    text = previous.read_text() if previous.exists() else ""  # a resumed run's earlier records
    self._lines = [text if text.endswith("\n") else text + "\n"] if text else []
    self._lock = threading.Lock()  # guards _lines, _dirty, _tb
    self._upload_lock = threading.Lock()  # one upload at a time: a stale snapshot never wins
    self._dirty = False
    self._flush_secs, self._closing = flush_secs, threading.Event()
    self._thread = threading.Thread(target=self._uploader, daemon=True, name="metrics-upload")
    self._thread.start()

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    record = {"step": int(step)} | {k: _plain(v) for k, v in values.items()}
    line = json.dumps(record) + "\n"
    if not self.remote:
      self._file.write(line)
      self._add_scalars(record, step)
      return
    with self._lock:
      self._lines.append(line)
      self._add_scalars(record, step)
      self._dirty = True

  def write_image(self, step: int, tag: str, png: bytes):
    """A PNG (e.g. `bltjax.viz.canvas.figure_png`) as TensorBoard image `tag` at `step`."""
    if not self.enabled:
      return
    from PIL import Image  # comes with matplotlib; tensorboardX encodes images with it too
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # HWC uint8
    if not self.remote:
      self._tb.add_image(tag, image, step, dataformats="HWC")
      return
    with self._lock:
      self._tb.add_image(tag, image, step, dataformats="HWC")
      self._dirty = True

  def _add_scalars(self, record, step):
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def flush(self):
    """Makes every record written so far durable (uploads now for gs:// workdirs)."""
    if not self.enabled:
      return
    if not self.remote:
      self._file.flush()
      self._tb.flush()
      return
    self._upload()

  def _snapshot(self):
    """(metrics bytes, {event file name: bytes}) under the lock, or None when nothing changed."""
    with self._lock:
      if not self._dirty:
        return None
      self._tb.flush()
      events = {}
      for name in os.listdir(self._tb_local):
        with open(os.path.join(self._tb_local, name), "rb") as f:
          events[name] = f.read()
      self._dirty = False
      return "".join(self._lines).encode(), events

  def _upload(self):
    with self._upload_lock:
      snapshot = self._snapshot()
      if snapshot is None:
        return
      data, events = snapshot
      try:
        epath.Path(self.path).write_bytes(data)
        for name, blob in events.items():
          (self._tb_remote / name).write_bytes(blob)
      except Exception:
        with self._lock:
          self._dirty = True  # retried by the next upload
        raise

  def _uploader(self):
    """Uploads whenever records changed, at most every flush_secs (longer if uploads are slow)."""
    interval = self._flush_secs
    while not self._closing.wait(interval):
      start = time.monotonic()
      try:
        self._upload()
      except Exception as e:  # noqa: BLE001 (kept dirty: retried next time; close() raises)
        logging.warning("%s: upload failed, will retry: %s", self.path, e)
      # Each upload rewrites the whole file: keep it under ~10% of the thread's time.
      interval = max(self._flush_secs, 10 * (time.monotonic() - start))

  def close(self):
    if not self.enabled:
      return
    if not self.remote:
      try:
        self._file.close()  # may fail (a full disk): the TensorBoard thread still stops
      finally:
        _close_tensorboard(self._tb)
      return
    self._closing.set()
    self._thread.join()
    with self._lock:
      _close_tensorboard(self._tb)
      self._dirty = True  # the event files' last bytes
    try:
      self._upload()
    except Exception as e:
      with open(os.path.join(self._local, "metrics.jsonl"), "w") as f:
        f.write("".join(self._lines))
      raise OSError(f"{self.path}: the last upload failed ({e}); metrics.jsonl and tensorboard/ "
                    f"are kept in {self._local}") from e
    shutil.rmtree(self._local, ignore_errors=True)


def _close_tensorboard(tb: SummaryWriter):
  """Closes `tb`; if its last flush fails (a full disk), still stops its writer threads, which
  would otherwise outlive the run (tensorboardX stops them only after a successful flush)."""
  try:
    tb.close()
  except Exception:
    for writer in getattr(tb, "all_writers", {}).values():
      worker = getattr(getattr(writer, "event_writer", None), "_worker", None)
      if worker is not None:
        worker.stop()
    raise


def _plain(v):
  if hasattr(v, "item"):
    v = v.item()
  return float(v) if isinstance(v, float) else v


def _ends_with_newline(path: str) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_metrics(workdir: str) -> list[dict]:
  """Every record of WORKDIR/metrics.jsonl (local or gs://), in the order written."""
  path = storage.join(workdir, "metrics.jsonl")
  try:
    text = epath.Path(path).read_text()
  except FileNotFoundError:  # (gcsfs names the object by its API path)
    raise FileNotFoundError(f"{path}: no such file") from None
  records, bad = [], 0
  for line in text.splitlines():
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # a record cut short (a full disk, a killed writer)
        bad += 1
  if bad:
    logging.warning("%s: skipped %d unreadable record(s)", path, bad)
  return records


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

