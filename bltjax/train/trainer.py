"""Training: `run(config, workdir)` trains the entropy model if needed, then the configured model.

The paper's recipe is two stages on the same data: a small byte LM (the entropy model), then the
BLT with patches cut where that model's next-byte entropy is high. `run` does both in one command
and resumes either stage from `WORKDIR[/entropy_model]/checkpoints` when re-run. `train` is
`python -m bltjax.main`: `run` with the command's default workdir, logging and last line.
"""

import contextlib
import copy
import json
import logging
import os
import shlex
import time

from absl import logging as absl_logging
from etils import epath
import jax
import numpy as np

from bltjax.checkpoint import checkpointer, workdir_lock
from bltjax.data import bpe, pipeline
from bltjax.data.prefetch import ThreadPrefetcher
from bltjax.runtime import errors, sharding, storage
from bltjax.train import (batch as batch_lib, experiment, feed as feed_lib, flops, heldout, metrics,
                          optim, patcher, preemption, step as step_lib, train_state as ts)

ENTROPY_STAGE_DIR = patcher.ENTROPY_STAGE_DIR
# Patch statistics averaged over a logging interval's batches (the others are counts, summed).
MEAN_STATS = ("bytes_per_patch", "patch_padding")


class Preempted(Exception):
  """Training stopped on a preemption notice after checkpointing; re-running resumes."""


def train(config, workdir: str | None, *, config_file: str, force_unlock: bool = False):
  """`python -m bltjax.main`, once this host's process is connected to the others: `run` into
  `workdir` (default: workdir/<name of `config_file`>), process 0 logging for everyone. A
  preemption is a warning (re-running resumes); a finished run ends with one line on stdout,
  where the model is and a command to try on it."""
  if jax.process_index() > 0:
    absl_logging.set_verbosity(absl_logging.WARNING)  # process 0 logs for everyone
  workdir = workdir or os.path.join(
      "workdir", os.path.splitext(os.path.basename(config_file))[0])
  logging.info("workdir: %s", storage.abspath(workdir))  # gs:// URLs stay URLs
  try:
    run(config, workdir, force_unlock=force_unlock)
  except Preempted as e:
    logging.warning("%s; re-run the same command to resume", e)
    return
  if jax.process_index() == 0:
    print(what_next(config, storage.abspath(workdir)), flush=True)


def what_next(config, workdir: str) -> str:
  """One line: where the model trained by `config` is, and a command to try on it."""
  where = shlex.quote(workdir)
  if config.model_type == "blt":
    prompt = "import " if config.data.get("source") == "stdlib" else "The "  # its kind of text
    return (f"Trained BLT in {workdir}; generate from it: python -m bltjax.generate "
            f"--checkpoint={where} --prompt={shlex.quote(prompt)}")
  return (f"Trained {_model_name(config.model_type)} in {workdir}; plot its learning curve: "
          f"python -m bltjax.plot curves --workdirs={where} --out=curves.png")


def _model_name(model_type: str) -> str:
  return {"entropy_model": "entropy model", "token_lm": "token LM"}.get(model_type, "BLT")


def run(config, workdir: str, *, stop_at_step: int | None = None, force_unlock: bool = False):
  """Both stages. Returns the final train state of the last stage.

  `stop_at_step` stops the last stage early (after checkpointing) without changing anything else,
  e.g. the learning-rate schedule: re-running continues as if never interrupted.
  `force_unlock` takes over the workdir lock even when its holder looks alive.
  """
  model_cfg, _ = experiment.validate(config, jax.device_count())  # the stage-1 config's too
  # A missing path, bucket or eval set file fails now, naming it (both stages).
  experiment.check_paths(config, workdir, jax.process_index(), jax.process_count())
  # One run per workdir (process 0 holds WORKDIR/.lock; a dead holder's lock is taken over).
  with workdir_lock.hold(workdir, force=force_unlock, what="training run"):
    return _run(config, model_cfg, workdir, stop_at_step)


def _run(config, model_cfg, workdir, stop_at_step):
  entropy_ckpt = None
  if config.model_type == "token_lm":  # the BPE baseline: its tokenizer first (bltjax.data.bpe)
    config = copy.deepcopy(config)
    config.tokenizer.path = bpe.ensure_tokenizer(config, workdir)  # recorded in config.json
  if config.model_type == "blt" and config.patching.mode == "entropy" and \
      not config.data.preprocessed_dir:  # stored entropies need no entropy model
    entropy_ckpt = config.patching.entropy_model_checkpoint
    if not entropy_ckpt and config.init_from:
      entropy_ckpt = checkpointer.recorded_entropy_model(config.init_from)
      if entropy_ckpt:
        logging.info("patching with the entropy model recorded in init_from: %s", entropy_ckpt)
    if not entropy_ckpt:
      entropy_ckpt = storage.join(workdir, ENTROPY_STAGE_DIR)
      stage = experiment.entropy_stage_config(config)
      logging.info("patching.mode='entropy' and no patching.entropy_model_checkpoint: training "
                   "the entropy model first (stage 1) in %s", entropy_ckpt)
      train_stage(stage, experiment.model_config(stage), entropy_ckpt)
      logging.info("Stage 1 done: entropy model saved under %s", entropy_ckpt)
  return train_stage(config, model_cfg, workdir, entropy_checkpoint=entropy_ckpt,
                     stop_at_step=stop_at_step)


# -- one stage ------------------------------------------------------------------------------------


def train_stage(config, model_cfg, workdir: str, *, entropy_checkpoint: str | None = None,
                stop_at_step: int | None = None):
  """Trains one model (BLT or entropy model) to `config.train.steps`, resuming if possible.

  `config` has been validated (`run`: experiment.validate); `model_cfg` is its frozen model
  config (experiment.model_config), built once.
  """
  t = config.train
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.shape)
  model = ts.build_model(config, model_cfg)
  optimizer = optim.make_optimizer(config.optim, t.steps)
  abstract, state_sh = ts.abstract_state(config, model, optimizer, mesh)
  with contextlib.ExitStack() as stack:  # closes the checkpointer and the input pipeline
    ckpt = stack.enter_context(contextlib.closing(
        checkpointer.Checkpointer(workdir, max_to_keep=t.keep_checkpoints)))
    # The newest checkpoint whose metadata reads (unreadable ones are moved aside, see
    # bltjax/checkpoint/checkpointer.py); its arrays are read below, once the input pipeline exists.
    found = ckpt.latest_metadata()
    start, resumed_metadata = (found[0], found[2]) if found else (None, None)
    if start is not None and start >= t.steps:
      logging.info("%s: already trained to step %d (train.steps=%d)", workdir, start, t.steps)
      return None
    # Patching (from the checkpoint's metadata when resuming), batch layouts, host -> devices.
    inputs = feed_lib.setup(config, mesh, entropy_checkpoint, resumed_metadata)
    local_batch = t.batch_size // jax.process_count()
    # Started before compiling, so that worker start-up and the first batches overlap compilation.
    train_ds = pipeline.make_dataset(config, "train", local_batch_size=local_batch,
                                     patch=inputs.host_patch)
    train_it = ThreadPrefetcher(iter(train_ds), _host_stats, buffer_size=config.data.prefetch)
    # Whatever happens next (a restore error, a failed compile, an error in the loop, a
    # preemption), the prefetch thread and the input workers stop with this stage, and the
    # shared memory of the batches they had read ahead is released (bltjax.data.workers).
    stack.callback(lambda: train_it.close())  # the restored iterator, once restored
    if start is not None:
      restored = ckpt.restore_latest(abstract, train_it)
      # Fell back past the step whose metadata set up patching?
      if restored.metadata != resumed_metadata:
        raise errors.CheckpointError(
            f"{workdir}: fell back to checkpoint {restored.step}, whose patching metadata differs "
            f"from that of checkpoint {start}; re-run to set up patching from it")
      state, train_it, start = restored.state, restored.data_iter, restored.step
      logging.info("Resumed %s from step %d", workdir, start)
    elif config.init_from:
      state = ts.init_state_from(config, optimizer, mesh, abstract, state_sh, config.init_from)
      logging.info("Initialised %s from the params of %s", workdir, config.init_from)
      start = 0
    else:
      state = ts.init_state(config, model, optimizer, mesh, state_sh, config.seed)
      start = 0
    if jax.process_index() == 0:
      (epath.Path(workdir) / "config.json").write_text(
          json.dumps(config.to_dict(), indent=2, default=str))
    logging.info("%s: %s with %.2fM parameters on mesh %s", workdir, config.model_type,
                 ts.param_count(state.params) / 1e6, dict(mesh.shape))

    # Both steps are compiled ahead of time inside the mesh context (where the logical sharding
    # constraints apply); the loop then runs outside it, so that host-side work such as patching
    # in the input pipeline stays on this process's own devices.
    with sharding.mesh_context(mesh):
      t0 = time.perf_counter()
      train_lowered, eval_lowered = step_lib.lower_steps(
          abstract, inputs.step_spec, loss_fn=step_lib.make_loss_fn(config, model),
          optimizer=optimizer,
          shardings=step_lib.StepShardings(mesh, state_sh, inputs.batch_shardings),
          with_eval=bool(t.eval_batches), **step_lib.train_options(config, mesh.size))
      train_fn = train_lowered.compile()
      eval_fn = None if eval_lowered is None else eval_lowered.compile()
      logging.info("Compiled the %s in %.1fs", "train and eval steps" if eval_fn is not None else
                   "train step", time.perf_counter() - t0)
    evaluator = heldout.stage_evaluator(config, eval_fn, inputs.patcher, inputs.host_patch,
                                        local_batch, inputs.feed)
    loop = _Loop(config, model_cfg, workdir, ckpt, inputs.metadata, state, train_it, train_fn,
                 evaluator, inputs.feed, entropy_cfg=inputs.entropy_cfg)
    end = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
    state = loop.run(start, end)
    if loop.preempted:
      raise Preempted(f"{workdir}: preempted at step {int(state.step)} (checkpoint saved)")
    return state


class _DataState:
  """The input pipeline's position at one moment, in the form grain's Orbax handler saves: the
  loop fetches (and patches) the next batch before it checkpoints the previous step."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


class _Loop:
  """The step loop: dispatch step s, fetch and dispatch the next batch (and its patching), then
  fetch step s-1's metrics (one step late).

  Throughput is measured between the completions of logged steps (a metrics fetch returns when
  its step is done), so asynchronous dispatch does not distort it; evaluation time is excluded.
  """

  def __init__(self, config, model_cfg, workdir, ckpt, metadata, state, train_it, train_fn,
               evaluator, feed, *, entropy_cfg=None):
    self.config, self.workdir, self.ckpt, self.metadata = config, workdir, ckpt, metadata
    self.state, self.train_it, self.train_fn = state, train_it, train_fn
    self.evaluator, self.feed = evaluator, feed
    desc = _model_name(config.model_type)
    self.model_cfg = model_cfg
    self.peak = flops.device_peak_flops(jax.devices()[0], self.model_cfg.runtime.dtype)
    self.writer = metrics.MetricWriter(workdir)
    self.progress = metrics.Progress(config.train.steps, 0, desc)
    self.interval = self._new_interval()
    self.t_done = time.perf_counter()
    self.preemption, self.preempted = preemption.PreemptionGuard(), False
    self.entropy_cfg = entropy_cfg  # the entropy model's, when it runs on the accelerators
    self.guard_seen = _guard_counts(jax.device_get(state.guard))  # skips before this run
    self.last_saved = None
    self.all_finite = jax.jit(step_lib.all_finite)

  @staticmethod
  def _new_interval():
    return dict(bytes=0.0, data=0.0, excluded=0.0, stats=[])

  def run(self, start: int, end: int):
    t = self.config.train
    self.guard_seen["step"] = start
    self.last_saved = f"step {start}" if start else None  # resumed from it
    self.progress.update(start, {})
    pending = None
    try:
      device, stats = self._next()
      self.t_done = time.perf_counter()
      for s in range(start, end):
        self.state, step_metrics = self.train_fn(self.state, device)
        # Where the input pipeline stands after this step's batch: what its checkpoint records.
        data_state = _DataState(self.train_it.get_state())
        self.interval["bytes"] += stats.pop("target_bytes")
        self.interval["stats"].append(stats)
        done = s + 1
        if done < end:  # Patching of the next batch is queued behind this step.
          device, stats = self._next()
        if pending is not None:  # The previous logged step: fetch it now that `done` is queued.
          self._log(*pending)
          pending = None
        if done % t.log_every == 0 or done == end:
          pending, self.interval = (done, step_metrics, self.interval), self._new_interval()
        if self.preemption.should_stop(done):
          logging.warning("preempted: checkpointing step %d and stopping", done)
          pending = self._save(done, data_state, pending)
          self.ckpt.wait()
          self.preempted = True
          break
        if done % t.checkpoint_every == 0 or done == end:
          pending = self._save(done, data_state, pending)
        if t.eval_every and (done % t.eval_every == 0 or done == t.steps):
          self._evaluate(done, pending)
          pending = None
      if pending is not None:
        self._log(*pending)
    finally:  # the input pipeline and checkpointer are closed by train_stage
      with contextlib.ExitStack() as stack:  # each closes even if another fails (a full disk)
        for thing in (self.preemption, self.writer, self.progress):
          stack.callback(thing.close)
    return self.state

  def _save(self, step, data_state, pending):
    """Checkpoints `step`; returns the new `pending` (None). The metrics up to it are written
    first: a resumed run re-logs only the steps after its checkpoint, so they must be durable
    (remote workdirs upload them in the background). Orbax waits for this step's arrays anyway,
    so logging it now costs no wait."""
    if pending is not None:
      self._log(*pending)
    self.writer.flush()
    # Nothing non-finite is ever saved: the guard's counters (a fetch of this step, which the
    # save waits for anyway), then every parameter.
    self._check_guard(step, _guard_counts(jax.device_get(self.state.guard)))
    workdir_lock.check(self.workdir)  # still ours: never write next to another run
    if not bool(self.all_finite(self.state.params)):
      raise errors.TrainingDiverged(
          f"{self.workdir}: step {step}: the params are not finite; not saving them "
          f"(the newest checkpoint, {self.last_saved or 'none yet'}, is intact)")
    self.ckpt.save(step, self.state, data_state, self.config.to_dict(), self.metadata)
    self.last_saved = f"step {step}"
    return None  # nothing pending any more

  def _check_guard(self, step, counts, values=None):
    """Acts on the update guard's counters (`train_state.new_guard`) as of `step`: a non-finite
    update stops the run (train.nonfinite='stop'); more than train.max_skipped_steps skips in a
    row stop it too; any other skip is logged."""
    t, seen = self.config.train, self.guard_seen
    nonfinite = counts["nonfinite_steps"] - seen["nonfinite_steps"]
    spikes = counts["spike_steps"] - seen["spike_steps"]
    at = counts["last_skipped_step"]
    where = f"{self.workdir}: step {step}" + (
        f" (loss {values['loss']:.4g}, gradient norm {values['grad_norm']:.4g})" if values else "")
    kept = (f"nothing after them was saved: the newest checkpoint "
            f"({self.last_saved or 'none yet'}) is intact")
    if nonfinite and t.nonfinite == "stop":
      raise errors.TrainingDiverged(
          f"{where}: {nonfinite} update(s) since step {seen['step']} had a non-finite loss, "
          f"gradient or params (the last at step {at}). They were not applied and {kept}. Lower "
          "optim.lr or lengthen optim.warmup_steps, or set train.nonfinite=skip to skip such "
          f"updates (at most train.max_skipped_steps={t.max_skipped_steps} in a row)")
    if counts["skip_streak"] > t.max_skipped_steps:
      raise errors.TrainingDiverged(
          f"{where}: the last {counts['skip_streak']} updates in a row were skipped (non-finite "
          f"or loss spikes; train.max_skipped_steps={t.max_skipped_steps}). The params were last "
          f"updated at step {at - counts['skip_streak']}; every checkpoint holds finite params "
          f"(the newest: {self.last_saved or 'none yet'})")
    if nonfinite or spikes:
      logging.warning("step %d: skipped %d non-finite update(s) and %d loss spike(s) since step "
                      "%s (last at step %d)", step, nonfinite, spikes, seen["step"], at)
    self.guard_seen = counts | {"step": step}

  def _evaluate(self, step, pending):
    if pending is not None:
      self._log(*pending)
    t0 = time.perf_counter()
    self.evaluator.report(step, self.state.params, self.writer, self.progress)
    self.interval["excluded"] += time.perf_counter() - t0

  def _next(self):
    """(global batch, stats). Only the wait for the input pipeline counts as data wait; the
    host-to-device transfer and device patching do not (they queue behind the running step)."""
    t0 = time.perf_counter()
    local, stats = next(self.train_it)
    self.interval["data"] += time.perf_counter() - t0
    device, device_stats = self.feed(local)
    return device, stats | device_stats

  def _throughput(self, values) -> dict:
    """FLOPs per byte (bltjax.train.flops, with this logging interval's mean patch size, or its
    bytes per token for token_lm), per-device FLOP/s and bytes/s, and MFU against the device's
    peak."""
    n = self.config.data.seq_len
    extra = {}
    if self.config.model_type == "blt":
      fpb = flops.blt_flops_per_byte(self.model_cfg, n, values["bytes_per_patch"],
                                     entropy=self.entropy_cfg)["total"]
    elif self.config.model_type == "token_lm":
      # The interval's sums from _host_stats become its bytes per token (not logged themselves).
      bpt = values.pop("text_bytes") / max(values.pop("target_tokens"), 1.0)
      extra["bytes_per_token"] = bpt
      fpb = flops.token_lm_flops_per_byte(self.model_cfg, n, bpt)
    else:
      fpb = flops.lm_flops_per_byte(self.model_cfg, n)
    per_device = values["bytes_per_sec"] / jax.device_count()
    return extra | dict(flops_per_byte=fpb, bytes_per_sec_per_device=per_device,
                        flops_per_sec_per_device=fpb * per_device, mfu=fpb * per_device / self.peak)

  def _log(self, step, device_metrics, interval):
    # Step metrics and device-side patch statistics: one fetch, one step late.
    device_metrics, stats = jax.device_get((device_metrics, interval["stats"]))
    values = {k: float(v) for k, v in device_metrics.items()}
    now = time.perf_counter()  # `step` has completed: its metrics are on the host.
    elapsed = max(now - self.t_done - interval["excluded"], 1e-9)
    self.t_done = now
    values |= dict(bytes_per_sec=interval["bytes"] / elapsed,
                   data_wait_fraction=min(interval["data"] / elapsed, 1.0))
    for key in stats[0] if stats else ():
      vals = [float(x[key]) for x in stats]
      values[key] = float(np.mean(vals) if key in MEAN_STATS else np.sum(vals))
    values |= self._throughput(values)
    self.writer.write(step, values)
    self.progress.update(step, values)
    self._check_guard(step, _guard_counts(values), values)


def _guard_counts(values) -> dict:
  """The guard counters the host acts on, as ints (from the state or the step's metrics)."""
  keys = ("nonfinite_steps", "spike_steps", "skip_streak", "last_skipped_step")
  return {k: int(values[k]) for k in keys} | {"step": None}


def _host_stats(local):
  """In the prefetch thread: the batch plus its host-side statistics for the logs."""
  stats = batch_lib.host_stats(local)
  stats["target_bytes"] = float(local["mask"].sum()) * jax.process_count()
  if "target_bytes" in local:  # token_lm: text bytes, not targets (and both, for bytes/token)
    stats["target_tokens"] = stats["target_bytes"]
    stats["target_bytes"] = float(local["target_bytes"].sum()) * jax.process_count()
    stats["text_bytes"] = stats["target_bytes"]
  return local, stats
