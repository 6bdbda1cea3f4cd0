"""The canvas every picture of bltjax is drawn on: a matplotlib Figure on the Agg canvas, without
pyplot (headless, no global state), saved as PNG bytes.

Matplotlib (the `[plot]` extra) is imported only here and only to draw.
"""

import importlib.util
import io

from etils import epath

MISSING = 'plotting needs matplotlib: pip install "bltjax[plot]"'
DPI = 100


def have_matplotlib() -> bool:
  return importlib.util.find_spec("matplotlib") is not None


def figure(**kw):
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


def save(fig, out):
  """Writes `fig` as PNG to `out` (local or gs://) unless None; returns `fig`."""
  if out is not None:
    epath.Path(out).write_bytes(figure_png(fig))
  return fig
