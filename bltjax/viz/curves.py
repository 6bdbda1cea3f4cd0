"""Training curves from metrics records (the dicts of a run's metrics.jsonl, bltjax.train.metrics):
y against the training step, the training bytes or the training FLOPs so far, and the figure of
several runs.

`points` picks a metric's (step, value) pairs; `x_values` turns their steps into bytes or FLOPs
from what the training records logged. Reading a workdir is bltjax.train.run_curves's.
"""

import math

import numpy as np

from bltjax.viz import canvas

X_AXES = {"step": "training step", "bytes": "training bytes", "flops": "training FLOPs"}
Y_LABELS = {"bpb": "training bits per byte", "eval_bpb": "held-out bits per byte"}


def check_x(x: str):
  if x not in X_AXES:
    raise ValueError(f"--x={x!r}: must be one of {', '.join(X_AXES)}")


def _last_per_step(records) -> list[dict]:
  """One record per step, by step (a resumed run logs the steps after its checkpoint again: the
  later record wins)."""
  return [r for _, r in sorted({int(r["step"]): r for r in records}.items())]


def _training(records) -> list[dict]:
  """The training records (those with a loss), one per step."""
  return _last_per_step(r for r in records if "loss" in r)


def _cumulative(steps, window_ends, rates) -> np.ndarray:
  """At `steps`, the sum from step 0 of a per-step rate, rates[k] over the steps
  (window_ends[k-1], window_ends[k]], and the last rate after them."""
  at = np.concatenate([[0.0], window_ends])
  cum = np.concatenate([[0.0], np.cumsum(np.diff(at) * rates)])
  return np.where(steps > at[-1], cum[-1] + (steps - at[-1]) * rates[-1],
                  np.interp(steps, at, cum))


def points(records, y: str, where: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, ys) of metric `y`: `bpb`, the training loss in bits per byte (the records' bpb,
  else loss / ln 2), or any metric the records have (eval_bpb, eval/<set>/bpb, ...). `where`
  names the records in errors."""
  if y == "bpb":
    pts = [(r["step"], r.get("bpb", r["loss"] / math.log(2.0))) for r in _training(records)]
  else:
    pts = [(r["step"], r[y]) for r in _last_per_step(
        r for r in records if isinstance(r.get(y), (int, float)))]
  if not pts:
    raise ValueError(f"{where}: no record has {y!r}")
  steps, ys = np.array(pts, np.float64).T
  return steps, ys


def x_values(records, steps, x: str, bytes_per_step: int, where: str) -> np.ndarray:
  """`steps` as x axis `x` (X_AXES). `bytes`: the training bytes so far, `bytes_per_step`
  (train.batch_size x data.seq_len: records log no byte count; packed rows are full) times each
  logged window's bytes_per_token where records have one (a token model); `flops`: the training
  FLOPs so far, each logged window's flops_per_byte x its bytes. Both grow linearly within a
  window, and after the last logged step at its rate."""
  check_x(x)
  if x == "step":
    return steps
  train = _training(records)
  ends = np.array([r["step"] for r in train], np.float64)
  byte_rate = bytes_per_step * np.array([r.get("bytes_per_token", 1.0) for r in train],
                                        np.float64)
  if x == "bytes":
    tokens = any("bytes_per_token" in r for r in train)
    return _cumulative(steps, ends, byte_rate) if tokens else steps * bytes_per_step
  if not train or any("flops_per_byte" not in r for r in train):
    raise ValueError(f"{where}: {'some training records lack' if train else 'no training record'}"
                     " flops_per_byte")
  return _cumulative(steps, ends, byte_rate * [r["flops_per_byte"] for r in train])


def draw_curves(series, x: str, y: str, out=None, *, logx: bool = False):
  """One line per (label, xs, ys) of `series`; written as PNG to `out` unless None."""
  fig = canvas.figure(figsize=(7.0, 4.5))
  ax = fig.add_subplot()
  for label, xs, ys in series:
    ax.plot(xs, ys, label=label, marker="." if len(xs) <= 30 else None, lw=1.2)
  ax.set(xlabel=X_AXES.get(x, x), ylabel=Y_LABELS.get(y, y), xscale="log" if logx else "linear")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return canvas.save(fig, out)
