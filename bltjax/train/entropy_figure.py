"""The entropy figure of a training run (`train.entropy_figure`): at each evaluation of a BLT run
with an entropy model, the next-byte entropies and patches of a held-out snippet under the run's
frozen entropy model and patching, logged to TensorBoard as `patches/entropy`
(bltjax.viz.entropy draws it).
"""

import functools
import logging

import jax
import numpy as np

from bltjax.model import tokenizer
from bltjax.model.config import LMConfig
from bltjax.model.lm import TransformerLM
from bltjax.train import patcher
from bltjax.viz import canvas, entropy

TAG = "patches/entropy"  # the TensorBoard image of training runs
SNIPPET_BYTES = 200      # held-out bytes drawn during training; SNIPPET when the run has none
SNIPPET = (b'def patch(text):\n    """Byte Latent Transformer: a new patch starts where the next '
           b'byte is hard to predict."""\n    return [len(p) for p in text.split(" ")]\n')


@functools.lru_cache(maxsize=4)
def _entropies_fn(entropy_cfg):
  return jax.jit(patcher.entropies_fn(TransformerLM(entropy_cfg)))


def training_figure_png(entropy_params, entropy_cfg, patching_cfg, text, *,
                        title: str | None = None) -> bytes:
  """PNG of the entropy figure of `text` under entropy model params (of `entropy_cfg`) and a
  run's patching (`patching_cfg`): one forward pass over the text."""
  fn = _entropies_fn(entropy_cfg)
  data = entropy.text_figure_data(text, lambda tokens: fn(entropy_params, tokens), patching_cfg)
  return canvas.figure_png(entropy.draw_entropy(data, title=title))


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
  """Logs the entropy figure of a held-out snippet at each evaluation (`bltjax.train.trainer`),
  with the run's frozen entropy model and patching: one forward over <= SNIPPET_BYTES bytes, on
  the host CPU where JAX has one. Never fails the run."""

  def __init__(self, run_patcher: patcher.Patcher):  # with an entropy model
    self.patcher, self.params, self.off = run_patcher, None, False

  @classmethod
  def create(cls, run_patcher: patcher.Patcher | None):
    """A TrainingFigure, or None without an entropy model or without matplotlib."""
    if run_patcher is None or run_patcher.entropy is None:
      return None
    if not canvas.have_matplotlib():
      logging.info("no %s image in TensorBoard: %s", TAG, canvas.MISSING)
      return None
    return cls(run_patcher)

  def log(self, writer, step: int, evaluator):
    """Called by every process (reading the checkpoint may synchronise them); process 0 draws."""
    if self.off:
      return
    try:
      if self.params is None:
        _, params = patcher.load_entropy_model(self.patcher.entropy)
        self.cfg = LMConfig.from_dict(self.patcher.entropy.model)
        try:
          device = jax.local_devices(backend="cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS without cpu
          device = jax.local_devices()[0]
        self.params = () if jax.process_index() else jax.device_put(params, device)
      if jax.process_index() == 0:
        writer.write_image(step, TAG, training_figure_png(
            self.params, self.cfg, self.patcher.config, eval_snippet(evaluator),
            title=f"step {step}: next-byte entropy and patches of a held-out snippet"))
    except Exception as e:  # noqa: BLE001 (a picture never stops training)
      self.off = True
      logging.warning("no %s image from now on: %s: %s", TAG, type(e).__name__, e)
