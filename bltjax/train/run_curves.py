"""The training curves of workdirs: WORKDIR/metrics.jsonl (and config.json, for the bytes a step
trains on) read back as bltjax.viz.curves draws them; `draw` is `python -m bltjax.plot curves`.
"""

import json

from etils import epath

from bltjax.runtime import storage
from bltjax.train import metrics
from bltjax.viz import curves


def curve_data(workdir: str, x: str = "step", y: str = "eval_bpb"):
  """(xs, ys) of one run, from WORKDIR/metrics.jsonl (and config.json).

  y: `bpb`, the training loss in bits per byte, or any metric the records have (eval_bpb,
  eval/<set>/bpb, ...); x: `step`, `bytes` or `flops`, the training bytes or FLOPs so far
  (`curves.points`, `curves.x_values`).
  """
  curves.check_x(x)
  try:
    records = metrics.read_metrics(workdir)
  except FileNotFoundError:
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl (not a training workdir?)") from None
  where = storage.join(workdir, "metrics.jsonl")
  steps, ys = curves.points(records, y, where)
  if x == "step":
    return steps, ys
  return curves.x_values(records, steps, x, _bytes_per_step(workdir, x), where), ys


def _bytes_per_step(workdir: str, x: str) -> int:
  """train.batch_size x data.seq_len of the run's config.json (packed rows are full)."""
  path = epath.Path(storage.join(workdir, "config.json"))
  try:
    config = json.loads(path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such file (needed for --x={x})") from None
  return int(config["train"]["batch_size"]) * int(config["data"]["seq_len"])


def draw(workdirs, out, *, labels=None, x: str = "step", y: str = "eval_bpb",
         logx: bool = False):
  """One line per workdir (labelled with `labels`, default each workdir's name): y against x,
  as in `curve_data`. Written as PNG to `out` (local or gs://) unless None."""
  labels = labels or [epath.Path(w.rstrip("/")).name or w for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f"--labels names {len(labels)} runs, --workdirs {len(workdirs)}")
  return curves.draw_curves([(label, *curve_data(w, x, y)) for label, w in zip(labels, workdirs)],
                            x, y, out, logx=logx)
