"""Next-byte entropy and the patches it cuts, the paper's Fig. 4: the figure data from the
entropies of a text and a patching config (the training rule, `patching.row_start_mask`), and
the figure drawn from it.

`figure_data` / `entropy_figure_data` compute what `draw_entropy` draws. The entropies come from
the caller: a `BLT` handle (`entropy_figure_data`, `draw_text`: `python -m bltjax.plot entropy`)
or a training run's entropy model (bltjax.train.entropy_figure, the TensorBoard image).
"""

import dataclasses
import functools
import logging
import math

import numpy as np

from bltjax.model import patching, tokenizer
from bltjax.viz import canvas

ROW_BYTES, INCH_PER_BYTE, ROW_INCHES = 100, 0.12, 1.9  # bytes per row, sizes


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


def as_bytes(text) -> bytes:
  """`text` (str or bytes) as bytes; ValueError when empty."""
  data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
  if not data:
    raise ValueError("no text to plot")
  return data


def text_figure_data(text, entropies_of, pc) -> dict:
  """`figure_data` of `text` (str or bytes), its entropies from `entropies_of(tokens_1xN)` -> [1,
  N] over BOS + text (the entry after the text is dropped)."""
  data = as_bytes(text)
  tokens = tokenizer.encode(data, add_bos=True, add_eos=False)[None]
  return figure_data(data, np.asarray(entropies_of(tokens))[0], pc)


def entropy_figure_data(blt, text, threshold: float | None = None,
                        monotonic: bool = False) -> dict:
  """dict(bytes, entropies [n] f32, patch_starts [n] bool, threshold, mode) of `text` (str or
  bytes) under `blt`'s entropy model and patching (overridden as in `patching_with`).
  `entropies` is `blt.entropies` of BOS + text without its last entry (after the text)."""
  data = as_bytes(text)
  pc = patching_with(blt.patching_config, threshold, monotonic)
  return text_figure_data(data, blt.entropies, pc)


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
  fig = canvas.figure(figsize=(width, height))
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
  return canvas.save(fig, out)


def draw_text(blt, data: bytes, out, *, max_bytes: int = 300, threshold: float | None = None,
              monotonic: bool = False):
  """What `python -m bltjax.plot entropy` draws: the entropy figure of the first `max_bytes` of
  `data` (at most what `blt` reads after its BOS) under `blt`, written as PNG to `out`."""
  keep = min(max_bytes, blt.max_context - 1)
  if len(data) > keep:
    logging.info("drawing the first %d of the text's %d bytes", keep, len(data))
  return draw_entropy(entropy_figure_data(blt, data[:keep], threshold, monotonic), out)
