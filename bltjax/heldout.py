"""Held-out evaluation during training: bits per byte over fixed batches of the eval split."""

import math

import jax

from bltjax.data import pipeline


class Evaluator:
  """Held-out bits per byte over the first `train.eval_batches` batches of the eval split; with a
  data mixture, also per named source (`eval_bpb/<name>`)."""

  def __init__(self, config, eval_fn, patch, local_batch, feed):
    self.config, self.eval_fn, self.feed = config, eval_fn, feed
    self._batches = None
    self._patch, self._local_batch = patch, local_batch

  def _load(self):
    names = pipeline.source_names(self.config.data)
    self._batches = {}
    for name in names:
      ds = pipeline.make_dataset(self.config, "eval", local_batch_size=self._local_batch,
                                 patch=self._patch, num_workers=0,
                                 source=name if len(names) > 1 else None)
      it = iter(ds)
      # The same batches every time: fetched once and kept (they are small).
      self._batches[name] = [next(it) for _ in range(self.config.train.eval_batches)]

  def __call__(self, params) -> dict:
    if not self.config.train.eval_batches:
      return {}
    if self._batches is None:
      self._load()
    out, ce_all, count_all = {}, 0.0, 0.0
    for name, batches in self._batches.items():
      sums = [self.eval_fn(params, self.feed(local)[0]) for local in batches]
      sums = jax.device_get(sums)
      ce = sum(float(x["ce_sum"]) for x in sums)
      count = sum(float(x["target_bytes"]) for x in sums)
      if len(self._batches) > 1:
        out[f"eval_bpb/{name}"] = ce / count / math.log(2.0)
      ce_all, count_all = ce_all + ce, count_all + count
    return dict(eval_loss=ce_all / count_all, eval_bpb=ce_all / count_all / math.log(2.0)) | out
