"""Held-out evaluation during training: bits per byte over fixed batches of the eval split and
of each named eval set (`train.eval_sets`), reported at every `train.eval_every` steps
(`Evaluator.report`, with the entropy figure of bltjax.train.entropy_figure).

    train.eval_sets = dict(
        wiki=dict(source="jsonl", paths=("/data/wiki/*.jsonl",), text_field="text"),
        code=dict(source="text", paths=("/data/code/**/*.py",)))

An eval set is any `data.source` kind (fields source, paths, text_field, as a data.mixture
component without name and weight), read whole (nothing held out, unshuffled, cycled like the
eval split when short) with the run's data.seq_len, shards and max_document_bytes, batch layout
and patching. Each process reads its own data shards of it. Metrics: eval/<name>/bpb and
eval/<name>/loss (nats per target byte) next to eval_bpb/eval_loss of the eval split.
"""

import copy
import logging
import math

import jax
import numpy as np

from bltjax.data import pipeline
from bltjax.train import entropy_figure, experiment


def eval_set_config(config, es: experiment.EvalSet):
  """`config` reading eval set `es` as its (only) data source; `pipeline.make_dataset(...,
  'all', ...)` then reads it whole."""
  c = copy.deepcopy(config)
  c.unlock()  # configs from the command line are locked
  c.data.update(source=es.source, paths=es.paths, text_field=es.text_field, mixture=())
  return c


def _first(ds, n: int) -> list:
  it = iter(ds)
  # The same batches every time: fetched once and kept (they are small).
  return [next(it) for _ in range(n)]


def stage_evaluator(config, eval_fn, run_patcher, patch, local_batch: int,
                    feed) -> "Evaluator":
  """The Evaluator of a training stage (bltjax.train.trainer): `eval_fn` is the compiled eval step
  (bltjax.train.step; None without train.eval_batches), `run_patcher` the stage's
  patcher.Patcher or None, `patch` its host transform. With an entropy model and
  train.entropy_figure, its reports also draw the entropy figure."""
  figure = None
  if run_patcher is not None and run_patcher.entropy is not None and config.train.entropy_figure:
    figure = entropy_figure.TrainingFigure.create(run_patcher)
  return Evaluator(config, eval_fn, patch, local_batch, feed, figure=figure)


class Evaluator:
  """Held-out bits per byte over the first `train.eval_batches` batches of the eval split (with a
  data mixture, also per named source: `eval_bpb/<name>`) and of each eval set
  (`eval/<name>/bpb`). `feed` turns a local host batch into (global batch, stats)."""

  def __init__(self, config, eval_fn, patch, local_batch, feed, figure=None):
    self.config, self.eval_fn, self.feed = config, eval_fn, feed
    self._split = self._sets = None  # name -> local batches, once loaded
    self._patch, self._local_batch = patch, local_batch
    self.figure = figure  # an entropy_figure.TrainingFigure, or None

  def _dataset(self, config, split, source=None):
    return pipeline.make_dataset(config, split, local_batch_size=self._local_batch,
                                 patch=self._patch, num_workers=0, source=source)

  def _load(self):
    n = self.config.train.eval_batches
    self._split, self._sets = {}, {}
    if self.config.data.eval_fraction > 0:  # else only eval sets (configs.validate)
      names = pipeline.source_names(self.config.data)
      for name in names:
        self._split[name] = _first(
            self._dataset(self.config, "eval", name if len(names) > 1 else None), n)
    for es in experiment.eval_sets(self.config):
      try:
        self._sets[es.name] = _first(self._dataset(eval_set_config(self.config, es), "all"), n)
      except (ValueError, OSError, StopIteration) as e:
        raise ValueError(f"train.eval_sets.{es.name} ({es.source} {list(es.paths)}): "
                         f"{str(e) or 'no batch'}") from e

  def _sums(self, params, groups: dict) -> dict:
    """name -> (cross-entropy sum in nats, target bytes); every batch dispatched, one fetch."""
    sums = jax.device_get({name: [self.eval_fn(params, self.feed(local)[0]) for local in batches]
                           for name, batches in groups.items()})
    return {name: (sum(float(x["ce_sum"]) for x in xs), sum(float(x["target_bytes"]) for x in xs))
            for name, xs in sums.items()}

  def __call__(self, params) -> dict:
    if not self.config.train.eval_batches:
      return {}
    if self._split is None:
      self._load()
    out, ce_all, count_all = {}, 0.0, 0.0
    split = self._sums(params, self._split)
    for name, (ce, count) in split.items():
      if len(split) > 1:
        out[f"eval_bpb/{name}"] = ce / count / math.log(2.0)
      ce_all, count_all = ce_all + ce, count_all + count
    if split:
      out = dict(eval_loss=ce_all / count_all, eval_bpb=ce_all / count_all / math.log(2.0)) | out
    for name, (ce, count) in self._sums(params, self._sets).items():
      out[f"eval/{name}/bpb"] = ce / count / math.log(2.0)
      out[f"eval/{name}/loss"] = ce / count
    return out

  def first_rows(self) -> list:
    """Row 0 of the first batch of the eval split's sources, then of each eval set: token
    arrays [N], as loaded by the first evaluation (none before it)."""
    groups = [*(self._split or {}).values(), *(self._sets or {}).values()]
    return [np.asarray(batches[0]["tokens"])[0] for batches in groups if batches]

  def report(self, step: int, params, writer, progress):
    """Evaluates `params` at `step` and reports it: the metrics (metrics.MetricWriter), the
    progress line and the log, then the entropy figure (never fails the run; only process 0
    writes)."""
    evals = self(params)
    if evals:
      writer.write(step, evals)
      progress.update(step, evals)
      logging.info("step %d: %s", step, {k: round(v, 4) for k, v in evals.items()})
    if self.figure is not None:
      self.figure.log(writer, step, self)
