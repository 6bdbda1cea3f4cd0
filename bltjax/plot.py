"""Pictures: next-byte entropy and the patches it cuts (the paper's Fig. 4), and training curves.

    python -m bltjax.plot entropy --checkpoint=DIR --text="..." --out=entropy.png
        [--text_file=PATH] [--threshold=F] [--monotonic] [--max_bytes=300] [--entropy_dir=DIR]
    python -m bltjax.plot curves --workdirs=runs/a,runs/b --x=flops|bytes|step --y=eval_bpb|bpb
        --out=curves.png [--labels=A,B] [--logx]

The drawing is `bltjax.viz` (matplotlib, the `[plot]` extra, only imported to draw); the curves
of workdirs are read by `bltjax.train.run_curves`. Training logs the same entropy figure of a
held-out snippet to TensorBoard (`patches/entropy`, bltjax.train.entropy_figure).
"""

import logging

from absl import app, flags
from etils import epath

from bltjax.inference import api
from bltjax.runtime import cli
from bltjax.train import run_curves
from bltjax.viz import canvas, curves, entropy

_OUT = flags.DEFINE_string("out", None, "The PNG to write (local or gs://).")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "entropy: a BLT directory or training workdir (BLT.load).")
_ENTROPY_DIR = flags.DEFINE_string(
    "entropy_dir", None, "entropy: a Meta BLT's entropy model directory.")
_TEXT = flags.DEFINE_string("text", None, "entropy: the text to draw.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "entropy: draw the bytes of this file.")
_MAX_BYTES = flags.DEFINE_integer("max_bytes", 300, "entropy: draw at most this many bytes.")
_THRESHOLD = flags.DEFINE_float(
    "threshold", None, "entropy: a global threshold (nats) in place of the checkpoint's; with "
    "--monotonic, θ_r.")
_MONOTONIC = flags.DEFINE_bool(
    "monotonic", False, "entropy: the approximate monotonic constraint (a patch starts where the "
    "entropy rises by more than --threshold).")
_WORKDIRS = flags.DEFINE_list("workdirs", None, "curves: training workdirs, one line each.")
_LABELS = flags.DEFINE_list(
    "labels", None, "curves: a label per workdir (default: the workdir's name).")
_X = flags.DEFINE_enum("x", "step", list(curves.X_AXES), "curves: the x axis.")
_Y = flags.DEFINE_string(
    "y", "eval_bpb", "curves: eval_bpb, bpb (training) or a metrics.jsonl name.")
_LOGX = flags.DEFINE_bool("logx", False, "curves: logarithmic x axis.")
flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) != 2 or argv[1] not in ("entropy", "curves"):
    raise app.UsageError(f"usage: python -m bltjax.plot entropy|curves --flags (got {argv[1:]})")
  if not canvas.have_matplotlib():
    raise ValueError(canvas.MISSING)  # one line (bltjax.runtime.cli)
  if argv[1] == "entropy":
    if not _CHECKPOINT.value or (_TEXT.value is None) == (_TEXT_FILE.value is None):
      raise app.UsageError("entropy needs --checkpoint and one of --text, --text_file")
    data = (epath.Path(_TEXT_FILE.value).read_bytes() if _TEXT_FILE.value is not None
            else _TEXT.value.encode("utf-8", "surrogateescape"))
    blt = api.BLT.load(_CHECKPOINT.value, entropy_dir=_ENTROPY_DIR.value)
    entropy.draw_text(blt, data, _OUT.value, max_bytes=_MAX_BYTES.value,
                      threshold=_THRESHOLD.value, monotonic=_MONOTONIC.value)
  else:
    if not _WORKDIRS.value:
      raise app.UsageError("curves needs --workdirs")
    run_curves.draw(_WORKDIRS.value, _OUT.value, labels=_LABELS.value, x=_X.value, y=_Y.value,
                    logx=_LOGX.value)
  logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
  cli.run(main)  # errors as one line (--verbose: traceback), exit 1
