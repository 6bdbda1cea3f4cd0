"""Pictures: next-byte entropy and the patches it cuts (the paper's Fig. 4), and training curves.

    python -m bltjax.plot entropy --checkpoint=DIR --text="..." --out=entropy.png
        [--text_file=PATH] [--threshold=F] [--monotonic] [--max_bytes=300] [--entropy_dir=DIR]
    python -m bltjax.plot curves --workdirs=runs/a,runs/b --x=flops|bytes|step --y=eval_bpb|bpb
        --out=curves.png [--labels=A,B] [--logx]

`entropy_figure_data` / `curve_data` compute what `draw_entropy` / `draw_curves` draw. Matplotlib
is imported only to draw, without pyplot (a Figure on the Agg canvas: headless, no global state),
so nothing else in bltjax needs it. `TrainingFigure` logs the entropy figure of a held-out snippet
to TensorBoard (`patches/entropy`) at each evaluation of a BLT run with an entropy model.
"""

import dataclasses
import functools
import importlib.util
import io
import json
import logging
import math

import numpy as np
from etils import epath

from bltjax.model import patching, tokenizer
from bltjax.runtime import storage
from bltjax.train import metrics

MISSING = 'plotting needs matplotlib: pip install "bltjax[plot]"'
DPI = 100
ROW_BYTES, INCH_PER_BYTE, ROW_INCHES = 100, 0.12, 1.9  # entropy figure: bytes per row, sizes
TAG = "patches/entropy"  # the TensorBoard image of training runs
SNIPPET_BYTES = 200      # held-out bytes drawn during training; SNIPPET when the run has none
SNIPPET = (b'def patch(text):\n    """Byte Latent Transformer: a new patch starts where the next '
           b'byte is hard to predict."""\n    return [len(p) for p in text.split(" ")]\n')
X_AXES = {"step": "training step", "bytes": "training bytes", "flops": "training FLOPs"}
Y_LABELS = {"bpb": "training bits per byte", "eval_bpb": "held-out bits per byte"}


def have_matplotlib() -> bool:
  return importlib.util.find_spec("matplotlib") is not None


def _figure(**kw):
  """A matplotlib Figure on the Agg canvas; ImportError(MISSING) without matplotlib."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError(MISSING) from e
  fig = Figure(dpi=DPI, **kw)
  FigureCanvasAgg(fig)
  return fig


def figure_png(fig) -> bytes:
  """The figure as PNG bytes, its size in inches x DPI pixels."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI)
  return buf.getvalue()


def _save(fig, out):
  if out is not None:
    epath.Path(out).write_bytes(figure_png(fig))
  return fig


# -- entropy and patches -------------------------------------------------------------------------


def patching_with(pc, threshold: float | None = None, monotonic: bool = False):
  """PatchingConfig `pc` with `threshold` as its threshold, or with the approximate monotonic
  constraint (then `threshold` is θ_r, the rise in entropy that starts a patch)."""
  if monotonic:
    if threshold is None and not (pc.mode == "entropy" and pc.monotonic):
      raise ValueError("--monotonic needs --threshold (θ_r: the increase in entropy over the "
                       "previous byte that starts a patch)")
    return dataclasses.replace(pc, mode="entropy", monotonic=True, threshold_add=None,
                               threshold=pc.threshold if threshold is None else threshold)
  return pc if threshold is None else dataclasses.replace(pc, mode="entropy",
                                                          threshold=float(threshold))


def figure_data(data: bytes, entropies, pc) -> dict:
  """What `draw_entropy` draws, from the entropies [len(data) + 1] of BOS + `data`:
  entropies[i], the entropy (nats) of byte i given BOS and the bytes before it; patch_starts[i],
  byte i starts a patch under `pc` (the training rule, `patching.row_start_mask`: with a global
  threshold, iff entropies[i] > threshold); threshold, None where the mode has no global one."""
  n = len(data)
  tokens = tokenizer.encode(data, add_bos=True, add_eos=False)[None]
  ent = np.asarray(entropies, np.float32).reshape(1, -1)
  mask = np.asarray(patching.row_start_mask(tokens, ent, pc))[0]
  has_threshold = pc.mode == "entropy" and not pc.monotonic
  return dict(bytes=data, entropies=ent[0, :n], patch_starts=mask[1:n + 1],
              threshold=float(pc.threshold) if has_threshold else None,
              mode=("monotonic " if pc.monotonic else "") + pc.mode)


def _as_bytes(text) -> bytes:
  data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
  if not data:
    raise ValueError("no text to plot")
  return data


def entropy_figure_data(blt, text, threshold: float | None = None,
                        monotonic: bool = False) -> dict:
  """dict(bytes, entropies [n] f32, patch_starts [n] bool, threshold, mode) of `text` (str or
  bytes) under `blt`'s entropy model and patching (overridden as in `patching_with`).
  `entropies` is `blt.entropies` of BOS + text without its last entry (after the text)."""
  data = _as_bytes(text)
  pc = patching_with(blt.patching_config, threshold, monotonic)
  tokens = tokenizer.encode(data, add_bos=True, add_eos=False)[None]
  return figure_data(data, blt.entropies(tokens)[0], pc)


@functools.lru_cache(maxsize=None)
def _font_has(char: str) -> bool:
  from matplotlib import font_manager, ft2font
  return ft2font.FT2Font(font_manager.findfont("DejaVu Sans Mono")).get_char_index(ord(char)) > 0


def byte_labels(data: bytes) -> list[str]:
  """A tick label per byte: '␣' space, '⏎' newline, '⇥' tab, a UTF-8 character on its first
  byte and '·' on the others, hex for everything else."""
  special = {0x20: "␣", 0x0A: "⏎", 0x09: "⇥"}
  labels, i = [], 0
  while i < len(data):
    b, size = data[i], 1
    if b in special or 0x21 <= b < 0x7F:
      labels.append(special.get(b, chr(b)))
    else:
      size = 2 if 0xC2 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF5 else 1
      char = data[i:i + size].decode("utf-8", "replace") if size > 1 else ""
      if len(char) == 1 and char.isprintable() and char != "\ufffd" and _font_has(char):
        labels += [char] + ["·"] * (size - 1)
      else:
        labels.append(f"{b:02x}")
        size = 1
    i += size
  return labels


def figure_size(n_bytes: int) -> tuple[float, float]:
  """(width, height) in inches of the entropy figure of `n_bytes` bytes."""
  rows = max(1, math.ceil(n_bytes / ROW_BYTES))
  return max(6.0, INCH_PER_BYTE * min(n_bytes, ROW_BYTES) + 1.0), ROW_INCHES * rows + 0.5


def draw_entropy(data: dict, out=None, *, title: str | None = None):
  """The entropy figure of `data` (`entropy_figure_data`): the entropy per byte, the global
  threshold dashed, patch starts in red, the bytes along x, ROW_BYTES bytes a row. Written as PNG
  to `out` (local or gs://) unless None. Returns the matplotlib Figure."""
  raw, h = data["bytes"], np.asarray(data["entropies"], np.float64)
  starts, threshold, n = np.asarray(data["patch_starts"], bool), data.get("threshold"), len(raw)
  (width, height), rows = figure_size(n), max(1, math.ceil(n / ROW_BYTES))
  fig = _figure(figsize=(width, height))
  fig.subplots_adjust(left=0.6 / width, right=1 - 0.4 / width, top=1 - 0.35 / height,
                      bottom=0.25 / height, hspace=0.45)
  labels, top = byte_labels(raw), 1.08 * max(float(h.max(initial=0.0)), threshold or 0.0, 1e-3)
  for r, ax in enumerate(fig.subplots(rows, 1, squeeze=False)[:, 0]):
    x = np.arange(r * ROW_BYTES, min(n, (r + 1) * ROW_BYTES))
    ax.plot(x, h[x], color="tab:blue", lw=1.0, marker=".", ms=2.5, zorder=2)
    for s in x[starts[x]]:
      ax.axvline(s - 0.5, color="tab:red", lw=0.6, alpha=0.35, zorder=1)
    ax.scatter(x[starts[x]], h[x][starts[x]], color="tab:red", s=9, zorder=3)
    if threshold is not None:
      ax.axhline(threshold, ls="--", color="0.2", lw=0.8, zorder=1)
    ax.set_xlim(x[0] - 0.5, x[0] + (ROW_BYTES if rows > 1 else len(x)) - 0.5)
    ax.set_ylim(0.0, top)
    ax.set_xticks(x, labels[x[0]:x[-1] + 1], fontsize=7, family="DejaVu Sans Mono")
    for tick in ax.get_xticklabels():
      if len(tick.get_text()) > 1:  # hex
        tick.set_fontsize(4.5)
    ax.tick_params(axis="x", length=2, pad=1)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel("H (nats)", fontsize=7)
    if r == 0:
      count = int(starts.sum())
      ax.set_title(title or (f"next-byte entropy, {count} patch{'es' * (count != 1)} over {n} "
                             f"bytes ({data.get('mode')})" + (
                                 f", threshold {threshold:.3g} nats (dashed)"
                                 if threshold is not None else "")), fontsize=8)
  return _save(fig, out)


# -- during training ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _entropies_fn(entropy_cfg):
  import jax
  from bltjax.train import patcher
  from bltjax.model.lm import TransformerLM
  return jax.jit(patcher.entropies_fn(TransformerLM(entropy_cfg)))


def training_figure_png(entropy_params, entropy_cfg, patching_cfg, text, *,
                        title: str | None = None) -> bytes:
  """PNG of the entropy figure of `text` under entropy model params (of `entropy_cfg`) and a
  run's patching (`patching_cfg`): one forward pass over the text."""
  data = _as_bytes(text)
  tokens = tokenizer.encode(data, add_bos=True, add_eos=False)[None]
  ent = np.asarray(_entropies_fn(entropy_cfg)(entropy_params, tokens))[0]
  return figure_png(draw_entropy(figure_data(data, ent, patching_cfg), title=title))


def eval_snippet(evaluator, max_bytes: int = SNIPPET_BYTES) -> bytes:
  """The first bytes of the first held-out document of a `heldout.Evaluator` that has
  evaluated (row 0 of its first batch, up to an EOS), else SNIPPET."""
  for row in evaluator.first_rows():
    eos = np.flatnonzero(row[1:] == tokenizer.EOS_ID)
    data = tokenizer.decode_bytes(row[:eos[0] + 1] if len(eos) else row)[:max_bytes]
    if data:
      return data
  return SNIPPET


class TrainingFigure:
  """Logs the entropy figure of a held-out snippet at each evaluation (`bltjax.train.trainer`), with the
  run's frozen entropy model and patching: one forward over <= SNIPPET_BYTES bytes, on the host
  CPU where JAX has one. Never fails the run."""

  def __init__(self, patching_):  # a bltjax.train.patcher.Patching with an entropy model
    self.patching, self.params, self.off = patching_, None, False

  @classmethod
  def create(cls, patching_):
    """A TrainingFigure, or None without an entropy model or without matplotlib."""
    if patching_ is None or getattr(patching_, "entropy", None) is None:
      return None
    if not have_matplotlib():
      logging.info("no %s image in TensorBoard: %s", TAG, MISSING)
      return None
    return cls(patching_)

  def log(self, writer, step: int, evaluator):
    """Called by every process (reading the checkpoint may synchronise them); process 0 draws."""
    import jax
    if self.off:
      return
    try:
      if self.params is None:
        from bltjax.train import patcher
        from bltjax.model.config import LMConfig
        _, params = patcher.load_entropy_model(self.patching.entropy)
        self.cfg = LMConfig.from_dict(self.patching.entropy.model)
        try:
          device = jax.local_devices(backend="cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS without cpu
          device = jax.local_devices()[0]
        self.params = () if jax.process_index() else jax.device_put(params, device)
      if jax.process_index() == 0:
        writer.write_image(step, TAG, training_figure_png(
            self.params, self.cfg, self.patching.config, eval_snippet(evaluator),
            title=f"step {step}: next-byte entropy and patches of a held-out snippet"))
    except Exception as e:  # noqa: BLE001 (a picture never stops training)
      self.off = True
      logging.warning("no %s image from now on: %s: %s", TAG, type(e).__name__, e)


# -- training curves -----------------------------------------------------------------------------


def _last_per_step(records) -> list[dict]:
  """One record per step, by step (a resumed run logs the steps after its checkpoint again: the
  later record wins)."""
  return [r for _, r in sorted({int(r["step"]): r for r in records}.items())]


def _cumulative(steps, window_ends, rates) -> np.ndarray:
  """At `steps`, the sum from step 0 of a per-step rate, rates[k] over the steps
  (window_ends[k-1], window_ends[k]], and the last rate after them."""
  at = np.concatenate([[0.0], window_ends])
  cum = np.concatenate([[0.0], np.cumsum(np.diff(at) * rates)])
  return np.where(steps > at[-1], cum[-1] + (steps - at[-1]) * rates[-1],
                  np.interp(steps, at, cum))


def curve_data(workdir: str, x: str = "step", y: str = "eval_bpb") -> tuple[np.ndarray, np.ndarray]:
  """(xs, ys) of one run, from WORKDIR/metrics.jsonl (and config.json).

  y: `bpb`, the training loss in bits per byte (the records' bpb, else loss / ln 2), or any
  metric the records have (eval_bpb, eval/<set>/bpb, ...). x: `step`; `bytes`, the training bytes
  so far: train.batch_size x data.seq_len per step (records log no byte count; packed rows are
  full), times each logged window's bytes_per_token where records have one (a token model);
  `flops`, the training FLOPs so far: each logged window's flops_per_byte x its bytes. Both grow
  linearly within a window, and after the last logged step at its rate.
  """
  if x not in X_AXES:
    raise ValueError(f"--x={x!r}: must be one of {', '.join(X_AXES)}")
  try:
    records = metrics.read_metrics(workdir)
  except FileNotFoundError:
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl (not a training workdir?)") from None
  where = storage.join(workdir, "metrics.jsonl")
  train = _last_per_step(r for r in records if "loss" in r)
  if y == "bpb":
    points = [(r["step"], r.get("bpb", r["loss"] / math.log(2.0))) for r in train]
  else:
    points = [(r["step"], r[y]) for r in _last_per_step(
        r for r in records if isinstance(r.get(y), (int, float)))]
  if not points:
    raise ValueError(f"{where}: no record has {y!r}")
  steps, ys = np.array(points, np.float64).T
  if x == "step":
    return steps, ys
  path = epath.Path(storage.join(workdir, "config.json"))
  try:
    config = json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file (needed for --x={x})") from None
  per_step = int(config["train"]["batch_size"]) * int(config["data"]["seq_len"])
  ends = np.array([r["step"] for r in train], np.float64)
  byte_rate = per_step * np.array([r.get("bytes_per_token", 1.0) for r in train], np.float64)
  if x == "bytes":
    tokens = any("bytes_per_token" in r for r in train)
    return (_cumulative(steps, ends, byte_rate) if tokens else steps * per_step), ys
  if not train or any("flops_per_byte" not in r for r in train):
    raise ValueError(f"{where}: {'some training records lack' if train else 'no training record'}"
                     " flops_per_byte")
  return _cumulative(steps, ends, byte_rate * [r["flops_per_byte"] for r in train]), ys


def draw_curves(series, x: str, y: str, out=None, *, logx: bool = False):
  """One line per (label, xs, ys) of `series`; written as PNG to `out` unless None."""
  fig = _figure(figsize=(7.0, 4.5))
  ax = fig.add_subplot()
  for label, xs, ys in series:
    ax.plot(xs, ys, label=label, marker="." if len(xs) <= 30 else None, lw=1.2)
  ax.set(xlabel=X_AXES.get(x, x), ylabel=Y_LABELS.get(y, y), xscale="log" if logx else "linear")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, out)


# -- command line ---------------------------------------------------------------------------------


def define_flags():
  from absl import flags as d
  d.DEFINE_string("out", None, "The PNG to write (local or gs://).")
  d.DEFINE_string("checkpoint", None, "entropy: a BLT directory or training workdir (BLT.load).")
  d.DEFINE_string("entropy_dir", None, "entropy: a Meta BLT's entropy model directory.")
  d.DEFINE_string("text", None, "entropy: the text to draw.")
  d.DEFINE_string("text_file", None, "entropy: draw the bytes of this file.")
  d.DEFINE_integer("max_bytes", 300, "entropy: draw at most this many bytes.")
  d.DEFINE_float("threshold", None, "entropy: a global threshold (nats) in place of the "
                 "checkpoint's; with --monotonic, θ_r.")
  d.DEFINE_bool("monotonic", False, "entropy: the approximate monotonic constraint (a patch "
                "starts where the entropy rises by more than --threshold).")
  d.DEFINE_list("workdirs", None, "curves: training workdirs, one line each.")
  d.DEFINE_list("labels", None, "curves: a label per workdir (default: the workdir's name).")
  d.DEFINE_enum("x", "step", list(X_AXES), "curves: the x axis.")
  d.DEFINE_string("y", "eval_bpb", "curves: eval_bpb, bpb (training) or a metrics.jsonl name.")
  d.DEFINE_bool("logx", False, "curves: logarithmic x axis.")
  d.mark_flag_as_required("out")


def main(argv):
  from absl import app, flags
  from bltjax.runtime import logs
  logs.quiet_libraries()
  f = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ("entropy", "curves"):
    raise app.UsageError(f"usage: python -m bltjax.plot entropy|curves --flags (got {argv[1:]})")
  if not have_matplotlib():
    raise ValueError(MISSING)  # one line (bltjax.runtime.cli)
  if argv[1] == "entropy":
    if not f.checkpoint or (f.text is None) == (f.text_file is None):
      raise app.UsageError("entropy needs --checkpoint and one of --text, --text_file")
    from bltjax import BLT
    data = (epath.Path(f.text_file).read_bytes() if f.text_file is not None
            else f.text.encode("utf-8", "surrogateescape"))
    blt = BLT.load(f.checkpoint, entropy_dir=f.entropy_dir)
    keep = min(f.max_bytes, blt.max_context - 1)
    if len(data) > keep:
      logging.info("drawing the first %d of the text's %d bytes", keep, len(data))
    draw_entropy(entropy_figure_data(blt, data[:keep], f.threshold, f.monotonic), f.out)
  else:
    if not f.workdirs:
      raise app.UsageError("curves needs --workdirs")
    labels = f.labels or [epath.Path(w.rstrip("/")).name or w for w in f.workdirs]
    if len(labels) != len(f.workdirs):
      raise app.UsageError(f"--labels names {len(labels)} runs, --workdirs {len(f.workdirs)}")
    draw_curves([(label, *curve_data(w, f.x, f.y)) for label, w in zip(labels, f.workdirs)],
                f.x, f.y, f.out, logx=f.logx)
  logging.info("wrote %s", f.out)


if __name__ == "__main__":
  from bltjax.runtime import cli, process_setup
  process_setup.set_defaults()
  define_flags()
  cli.run(main)  # errors as one line (--verbose: traceback), exit 1
