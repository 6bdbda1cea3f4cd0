"""Training: `run(config, workdir)` trains the entropy model if needed, then the configured model.

The paper's recipe is two stages on the same data: a small byte LM (the entropy model), then the
BLT with patches cut where that model's next-byte entropy is high. `run` does both in one command
and resumes either stage from `WORKDIR[/entropy_model]/checkpoints` when re-run.
"""

import functools
import json
import logging
import math
import os
import time

import jax
import numpy as np

from bltjax import checkpoint, configs, flops, metrics, optim, preemption, sharding
from bltjax import step as step_lib
from bltjax import train_state as ts
from bltjax.data import pipeline
from bltjax.data.patcher import EntropySpec, PatchBatch, calibrate_threshold
from bltjax.data.prefetch import ThreadPrefetcher
from bltjax.model.config import EntropyModelConfig
from bltjax.model.entropy_model import EntropyModel, entropies_from_logits

ENTROPY_STAGE_DIR = "entropy_model"


class Preempted(Exception):
  """Training stopped on a preemption notice after checkpointing; re-running resumes."""


def run(config, workdir: str, *, stop_at_step: int | None = None):
  """Both stages. Returns the final train state of the last stage.

  `stop_at_step` stops the last stage early (after checkpointing) without changing anything else,
  e.g. the learning-rate schedule: re-running continues as if never interrupted.
  """
  configs.validate(config, jax.device_count())
  entropy_ckpt = None
  if config.model_type == "blt" and config.patching.mode == "entropy":
    entropy_ckpt = config.patching.entropy_model_checkpoint
    if not entropy_ckpt and config.init_from:
      entropy_ckpt = checkpoint.recorded_entropy_model(config.init_from)
      if entropy_ckpt:
        logging.info("patching with the entropy model recorded in init_from: %s", entropy_ckpt)
    if not entropy_ckpt:
      entropy_ckpt = os.path.join(workdir, ENTROPY_STAGE_DIR)
      stage = configs.entropy_stage_config(config)
      logging.info("patching.mode='entropy' and no patching.entropy_model_checkpoint: training "
                   "the entropy model first (stage 1) in %s", entropy_ckpt)
      train_stage(stage, entropy_ckpt)
      logging.info("Stage 1 done: entropy model saved under %s", entropy_ckpt)
  return train_stage(config, workdir, entropy_checkpoint=entropy_ckpt, stop_at_step=stop_at_step)


# -- patching setup --------------------------------------------------------------------------------


def prepare_patching(config, entropy_checkpoint, resumed_meta: dict | None):
  """(PatchBatch transform or None, metadata recorded in checkpoints)."""
  if config.model_type != "blt":
    return None, {}
  p = config.patching
  threshold, meta, entropy = p.threshold, {}, None
  if p.mode == "entropy":
    params, ent_config, _, ent_step = checkpoint.load_params(entropy_checkpoint)
    entropy = EntropySpec(os.path.abspath(entropy_checkpoint), ent_config["model"])
    meta["entropy_model"] = dict(path=entropy.checkpoint, step=ent_step,
                                 sha256=checkpoint.params_hash(params))
    if resumed_meta and resumed_meta.get("entropy_model") != meta["entropy_model"]:
      raise ValueError(f"the checkpoint's patches were cut by entropy model "
                       f"{resumed_meta.get('entropy_model')}, but this run would use "
                       f"{meta['entropy_model']}")
    if threshold is None:
      threshold = (resumed_meta or {}).get("patching_threshold") or _calibrate(
          config, EntropyModel(EntropyModelConfig.from_dict(entropy.model)), params,
          p.target_patch_size)
    meta["patching_threshold"] = threshold
  hash_cfg = None
  if config.data.host_hash_ids:
    m = configs.model_config(config)
    hash_cfg = dict(group_sizes=m.hash_group_sizes, num_functions=m.hash_functions,
                    vocab=m.hash_vocab)
  pc = configs.patching_config(config, threshold)
  return PatchBatch(pc, p.max_patches, entropy, hash_cfg), meta


def _calibrate(config, model, params, target: float) -> float:
  """Threshold for `target` bytes per patch, from the entropy model on held-out windows."""
  split = "eval" if config.data.eval_fraction > 0 else "train"
  it = iter(pipeline.packed_windows(config.data, split, seed=config.seed, process_index=0,
                                    process_count=1, shuffle=False))
  tokens = np.stack([next(it)["tokens"] for _ in range(16)])
  ent = jax.jit(lambda t: entropies_from_logits(model.apply({"params": params}, t)))(tokens)
  threshold = calibrate_threshold(np.asarray(ent)[:, 1:], target)
  logging.info("patching: calibrated global threshold %.4f nats for ~%.2f bytes per patch",
               threshold, target)
  return threshold


# -- one stage ------------------------------------------------------------------------------------


def train_stage(config, workdir: str, *, entropy_checkpoint: str | None = None,
                stop_at_step: int | None = None):
  """Trains one model (BLT or entropy model) to `config.train.steps`, resuming if possible."""
  configs.validate(config, jax.device_count())
  t = config.train
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.shape)
  model = ts.build_model(config)
  optimizer = optim.make_optimizer(config.optim, t.steps)
  abstract, state_sh = ts.abstract_state(config, model, optimizer, mesh)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=t.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None and start >= t.steps:
    logging.info("%s: already trained to step %d (train.steps=%d)", workdir, start, t.steps)
    ckpt.close()
    return None
  resumed_meta = ckpt.metadata(start)[1] if start is not None else None
  patch, meta = prepare_patching(config, entropy_checkpoint, resumed_meta)

  local_batch = t.batch_size // jax.process_count()
  batch_sh = ts.batch_shardings(config, mesh, t.batch_size)
  # Started before compiling, so that worker start-up and the first batches overlap compilation.
  train_it = ThreadPrefetcher(
      iter(pipeline.make_dataset(config, "train", local_batch_size=local_batch, patch=patch)),
      _host_stats, buffer_size=config.data.prefetch)
  if start is not None:
    state, train_it = ckpt.restore(start, abstract, train_it)
    logging.info("Resumed %s from step %d", workdir, start)
  elif config.init_from:
    state = ts.init_state_from(config, optimizer, mesh, abstract, state_sh, config.init_from)
    logging.info("Initialised %s from the params of %s", workdir, config.init_from)
    start = 0
  else:
    state = ts.init_state(config, model, optimizer, mesh, state_sh, config.seed)
    start = 0
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
  logging.info("%s: %s with %.2fM parameters on mesh %s", workdir, config.model_type,
               ts.param_count(state.params) / 1e6, dict(mesh.shape))

  loss_fn = step_lib.make_loss_fn(config, model)
  # Both steps are compiled ahead of time inside the mesh context (where the logical sharding
  # constraints apply); the loop then runs outside it, so that host-side work such as patching
  # in the input pipeline stays on this process's own devices.
  with sharding.mesh_context(mesh):
    t0 = time.perf_counter()
    train_fn = jax.jit(
        functools.partial(step_lib.train_step, loss_fn=loss_fn, optimizer=optimizer,
                          lr_fn=optim.lr_schedule(config.optim, t.steps),
                          microbatches=t.microbatches),
        in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0).lower(abstract, ts.batch_spec(config, t.batch_size)).compile()
    logging.info("Compiled the train step in %.1fs", time.perf_counter() - t0)
    eval_fn = None
    if t.eval_batches:
      eval_fn = jax.jit(functools.partial(step_lib.eval_step, loss_fn=loss_fn),
                        in_shardings=(state_sh.params, batch_sh),
                        out_shardings=sharding.replicated(mesh)).lower(
                            abstract.params, ts.batch_spec(config, t.batch_size)).compile()
  evaluator = Evaluator(config, eval_fn, patch, local_batch, batch_sh)
  loop = _Loop(config, workdir, ckpt, meta, state, train_it, train_fn, evaluator, batch_sh)
  end = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
  state = loop.run(start, end)
  if loop.preempted:
    raise Preempted(f"{workdir}: preempted at step {int(state.step)} (checkpoint saved)")
  return state


class Evaluator:
  """Held-out bits per byte over the first `train.eval_batches` batches of the eval split."""

  def __init__(self, config, eval_fn, patch, local_batch, batch_sh):
    self.config, self.eval_fn, self.batch_sh = config, eval_fn, batch_sh
    self._batches = None
    self._patch, self._local_batch = patch, local_batch

  def _load(self):
    ds = pipeline.make_dataset(self.config, "eval", local_batch_size=self._local_batch,
                               patch=self._patch, num_workers=0)
    it = iter(ds)
    # The same batches every time: fetched once and kept (they are small).
    self._batches = [next(it) for _ in range(self.config.train.eval_batches)]

  def __call__(self, params) -> dict:
    if not self.config.train.eval_batches:
      return {}
    if self._batches is None:
      self._load()
    ce = count = 0.0
    for local in self._batches:
      device = pipeline.global_batch(local, self.batch_sh)
      out = jax.device_get(self.eval_fn(params, device))
      ce, count = ce + float(out["ce_sum"]), count + float(out["target_bytes"])
    return dict(eval_loss=ce / count, eval_bpb=ce / count / math.log(2.0))


class _Loop:
  """The step loop: dispatch step s+1, then fetch step s's metrics (one step late).

  Throughput is measured between the completions of logged steps (a metrics fetch returns when
  its step is done), so asynchronous dispatch does not distort it; evaluation time is excluded.
  """

  def __init__(self, config, workdir, ckpt, meta, state, train_it, train_fn, evaluator,
               batch_sh):
    self.config, self.workdir, self.ckpt, self.meta = config, workdir, ckpt, meta
    self.state, self.train_it, self.train_fn = state, train_it, train_fn
    self.evaluator, self.batch_sh = evaluator, batch_sh
    desc = "entropy model" if config.model_type == "entropy_model" else "BLT"
    self.model_cfg = configs.model_config(config)
    self.peak = flops.device_peak_flops(jax.devices()[0], self.model_cfg.runtime.dtype)
    self.writer = metrics.MetricWriter(workdir)
    self.progress = metrics.Progress(config.train.steps, 0, desc)
    self.window = self._new_window()
    self.t_done = time.perf_counter()
    self.preemption, self.preempted = preemption.PreemptionGuard(), False

  @staticmethod
  def _new_window():
    return dict(bytes=0.0, data=0.0, excluded=0.0, stats=[])

  def run(self, start: int, end: int):
    t = self.config.train
    self.progress.update(start, {})
    pending = None
    try:
      device, stats = self._next()
      self.t_done = time.perf_counter()
      for s in range(start, end):
        self.state, step_metrics = self.train_fn(self.state, device)
        self.window["bytes"] += stats.pop("target_bytes")
        self.window["stats"].append(stats)
        done = s + 1
        if pending is not None:  # The previous logged step: fetch it now that `done` is queued.
          self._log(*pending)
          pending = None
        if done % t.log_every == 0 or done == end:
          pending, self.window = (done, step_metrics, self.window), self._new_window()
        if self.preemption.should_stop(done):
          logging.warning("preempted: checkpointing step %d and stopping", done)
          self._save(done)
          self.ckpt.wait()
          self.preempted = True
          break
        if done % t.checkpoint_every == 0 or done == end:
          self._save(done)
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
          self._evaluate(done, pending)
          pending = None
        if done < end:
          device, stats = self._next()
      if pending is not None:
        self._log(*pending)
    finally:
      self.preemption.close()
      self.train_it.close()
      self.ckpt.close()
      self.writer.close()
      self.progress.close()
    return self.state

  def _save(self, step):
    self.ckpt.save(step, self.state, self.train_it, self.config.to_dict(), self.meta)

  def _evaluate(self, step, pending):
    if pending is not None:
      self._log(*pending)
    t0 = time.perf_counter()
    evals = self.evaluator(self.state.params)
    if evals:
      self.writer.write(step, evals)
      self.progress.update(step, evals)
      logging.info("step %d: %s", step, {k: round(v, 4) for k, v in evals.items()})
    self.window["excluded"] += time.perf_counter() - t0

  def _next(self):
    """(global batch, host stats). Only the wait for the input pipeline counts as data wait; the
    host-to-device transfer is not (on CPU it queues behind the running step)."""
    t0 = time.perf_counter()
    local, stats = next(self.train_it)
    self.window["data"] += time.perf_counter() - t0
    return pipeline.global_batch(local, self.batch_sh), stats

  def _throughput(self, values) -> dict:
    """FLOPs per byte (bltjax.flops, with this window's mean patch size), per-device FLOP/s
    and bytes/s, and MFU against the device's peak."""
    n = self.config.data.seq_len
    if self.config.model_type == "blt":
      fpb = flops.blt_flops_per_byte(self.model_cfg, n, values["bytes_per_patch"])["total"]
    else:
      fpb = flops.lm_flops_per_byte(self.model_cfg, n)
    per_device = values["bytes_per_sec"] / jax.device_count()
    return dict(flops_per_byte=fpb, bytes_per_sec_per_device=per_device,
                flops_per_sec_per_device=fpb * per_device, mfu=fpb * per_device / self.peak)

  def _log(self, step, device_metrics, window):
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.perf_counter()  # `step` has completed: its metrics are on the host.
    elapsed = max(now - self.t_done - window["excluded"], 1e-9)
    self.t_done = now
    values |= dict(bytes_per_sec=window["bytes"] / elapsed,
                   data_wait_fraction=min(window["data"] / elapsed, 1.0))
    stats = window["stats"]
    for key in stats[0] if stats else ():
      vals = [x[key] for x in stats]
      values[key] = float(np.mean(vals)) if key == "bytes_per_patch" else float(np.sum(vals))
    values |= self._throughput(values)
    self.writer.write(step, values)
    self.progress.update(step, values)


def _host_stats(local):
  """In the prefetch thread: the batch plus its host-side statistics for the logs."""
  stats = pipeline.host_stats(local)
  stats["target_bytes"] = float(local["mask"].sum()) * jax.process_count()
  return local, stats
