"""FLOP-matched ablations: the paper's comparisons (§6-7), in small (`python -m bltjax.ablate`).

Every run of an ablation config's `runs` table trains for the same training-FLOP budget
(`bltjax.train.flops`: a multiply-add is 2 FLOPs, backward = 2x forward, per *byte* of text) on the
same data, and is evaluated on the same held-out documents. A run's steps are the budget over its
FLOPs per step, planned from its measured bytes per patch (BLTs: the run's own patching of
training rows, with the entropy threshold calibrated first) or bytes per token (the BPE
baseline: its tokenizer trained first). Each run is an ordinary resumable workdir, ROOT/<name>;
its plan and result are kept in ROOT/<name>/ablation.json, and a re-run skips finished runs.
Entropy-patched runs share one entropy model, trained once in ROOT/entropy_model (its FLOPs are
reported apart: the paper leaves the patcher out of the budget too).

Outputs: ROOT/results.md, ROOT/results.csv and ROOT/curves.png (held-out bpb against training
FLOPs; needs the [plot] extra).
"""

import copy
import csv
import io
import json
import logging
import math
import time

from etils import epath
import jax
import numpy as np

from bltjax.data import bpe, pipeline
from bltjax.runtime import storage
from bltjax.train import (batch as batch_lib, experiment, flops, metrics, patcher, run_curves,
                          trainer)
from bltjax.viz import canvas

PLAN_FILE = "ablation.json"
ENTROPY_DIR = "entropy_model"
PLAN_ROWS = 64  # training rows whose patching (or tokenization) sets a run's planned bytes/step


def run_config(ablation, name: str):
  """Run `name` of the ablation config: a trainer config (not yet planned)."""
  return copy.deepcopy(ablation.runs[name])


def check(ablation, only=None) -> list[str]:
  """The run names to train (all, or `only`), validated; unknown names are one-line errors."""
  names = list(ablation.runs.keys())
  if only:
    unknown = [n for n in only if n not in names]
    if unknown:
      raise ValueError(f"--only: unknown run(s) {unknown}; the config's runs: {names}")
    names = [n for n in names if n in only]
  if not ablation.budget or ablation.budget <= 0:
    raise ValueError(f"budget={ablation.budget!r} must be a positive number of training FLOPs")
  for name in names:
    try:
      experiment.validate(run_config(ablation, name), jax.device_count())
    except ValueError as e:
      raise ValueError(f"runs.{name}: {e}") from None
  return names


# -- planning: FLOPs per step -> steps ----------------------------------------------------------


def _train_batches(config, patch=None, n_rows: int = PLAN_ROWS):
  """The first training rows (the order the run itself starts with), patched like the run."""
  rows = min(n_rows, config.train.batch_size)
  it = iter(pipeline.make_dataset(config, "train", local_batch_size=rows, patch=patch,
                                  process_index=0, process_count=1, num_workers=0))
  return [next(it) for _ in range(max(1, n_rows // rows))]


def flops_per_byte(config, entropy_checkpoint: str | None) -> tuple[float, dict]:
  """(training FLOPs per byte of text, what it was planned from) for one run config.

  BLT: from the run's own patching of its first training rows (for entropy patching with no
  threshold, the threshold is calibrated as the trainer calibrates it and then fixed in the
  plan, so that the run cuts the patches it was planned with)."""
  m = experiment.model_config(config)
  n = config.data.seq_len
  if config.model_type == "entropy_model":
    return flops.lm_flops_per_byte(m, n), dict(bytes_per_unit=1.0)
  if config.model_type == "token_lm":
    bpt = bpe.mean_bytes_per_token(config, config.tokenizer.path, config.tokenizer.train_bytes)
    return (flops.token_lm_flops_per_byte(m, n, bpt), dict(bytes_per_unit=bpt))
  setup = patcher.setup(config, entropy_checkpoint, None)
  batches = _train_batches(config, setup.host_transform())
  bpp = float(np.mean([batch_lib.bytes_per_patch(b["mask"], b["patch_lengths"])
                       for b in batches]))
  plan = dict(bytes_per_unit=bpp)
  if config.patching.mode == "entropy":
    plan["threshold"] = float(setup.config.threshold)
  return flops.blt_flops_per_byte(m, n, bpp)["total"], plan


def bytes_per_step(config, bytes_per_unit: float) -> float:
  """Text bytes one step trains on: rows x positions (tokens for the BPE baseline)."""
  per_position = bytes_per_unit if config.model_type == "token_lm" else 1.0
  return config.train.batch_size * config.data.seq_len * per_position


def plan_steps(budget: float, fpb: float, step_bytes: float) -> int:
  return max(1, int(round(budget / (fpb * step_bytes))))


def apply_schedule(config, steps: int, schedule) -> None:
  """train.steps and what follows from it (evaluations, logging, checkpoints, warmup)."""
  t = config.train
  t.steps = steps
  t.eval_every = max(1, math.ceil(steps / schedule.evals))
  t.checkpoint_every = t.eval_every
  t.log_every = max(1, math.ceil(steps / schedule.logs))
  config.optim.warmup_steps = min(steps, max(1, int(schedule.warmup_fraction * steps)))


# -- measured results ---------------------------------------------------------------------------


def totals(workdir: str) -> dict:
  """Final eval bpb, training FLOPs and bytes (as `python -m bltjax.plot curves` counts them:
  each logged window's flops_per_byte x its bytes) and mean bytes per patch/token of a run."""
  flops_x, _ = run_curves.curve_data(workdir, "flops", "bpb")
  bytes_x, _ = run_curves.curve_data(workdir, "bytes", "bpb")
  _, bpb = run_curves.curve_data(workdir, "step", "eval_bpb")
  units = [r.get("bytes_per_patch", r.get("bytes_per_token")) for r in metrics.read_metrics(workdir)
           if "loss" in r]
  units = [u for u in units if u is not None]
  return dict(eval_bpb=float(bpb[-1]), flops=float(flops_x[-1]), bytes=float(bytes_x[-1]),
              bytes_per_unit=float(np.mean(units)) if units else None)


# -- running -------------------------------------------------------------------------------------


def _read_plan(workdir: str) -> dict | None:
  path = epath.Path(workdir) / PLAN_FILE
  return json.loads(path.read_text()) if path.exists() else None


def _write_plan(workdir: str, plan: dict):
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  (epath.Path(workdir) / PLAN_FILE).write_text(json.dumps(plan, indent=2))


def _needs_entropy_model(config) -> bool:
  return config.model_type == "blt" and experiment.needs_entropy_stage(config)


def entropy_model(ablation, root: str, names: list[str]) -> str | None:
  """Trains (or finds) the shared entropy model of the entropy-patched runs: ROOT/entropy_model."""
  users = [n for n in names if _needs_entropy_model(ablation.runs[n])]
  if not users:
    return None
  path = storage.join(root, ENTROPY_DIR)
  stage = experiment.entropy_stage_config(ablation.runs[users[0]])
  t0 = time.perf_counter()
  trainer.run(stage, path)  # returns at once when already trained to its steps
  logging.info("ablate: entropy model %s ready (%.0fs)", path, time.perf_counter() - t0)
  return path


def plan_run(ablation, name: str, root: str, budget: float, entropy_ckpt: str | None):
  """(planned config, plan dict) of run `name`; a stored plan is reused, and a stored plan for
  another budget is an error (its workdir holds a run of other length)."""
  workdir = storage.join(root, name)
  config = run_config(ablation, name)
  config.unlock()
  stored = _read_plan(workdir)
  if stored is not None and not math.isclose(stored["budget"], budget, rel_tol=1e-9):
    raise ValueError(f"{workdir} holds a run planned for a budget of {stored['budget']:.4g} "
                     f"FLOPs, not {budget:.4g}: use another --root (or remove the directory)")
  if _needs_entropy_model(config):
    config.patching.entropy_model_checkpoint = entropy_ckpt
  if config.model_type == "token_lm":
    config.tokenizer.path = bpe.ensure_tokenizer(config, workdir)
  if stored is None:
    fpb, plan = flops_per_byte(config, entropy_ckpt)
    step_bytes = bytes_per_step(config, plan["bytes_per_unit"])
    steps = plan_steps(budget, fpb, step_bytes)
    stored = dict(plan, name=name, budget=budget, flops_per_byte=fpb, bytes_per_step=step_bytes,
                  steps=steps, planned_flops=steps * fpb * step_bytes, wall_s=0.0, result=None)
    _write_plan(workdir, stored)
  if "threshold" in stored:
    config.patching.threshold = stored["threshold"]
  apply_schedule(config, stored["steps"], ablation.schedule)
  return config, stored


def run(ablation, root: str, *, budget: float | None = None, only=None) -> list[dict]:
  """Trains every run not yet finished, then writes the results. Returns the result rows."""
  budget = float(budget or ablation.budget)
  ablation = copy.deepcopy(ablation)
  ablation.unlock()
  ablation.budget = budget
  names = check(ablation, only)
  epath.Path(root).mkdir(parents=True, exist_ok=True)
  entropy_ckpt = entropy_model(ablation, root, names)
  for name in names:
    workdir = storage.join(root, name)
    config, plan = plan_run(ablation, name, root, budget, entropy_ckpt)
    if plan["result"] is not None:
      logging.info("ablate: %s finished earlier (eval bpb %.4f): skipped", name,
                   plan["result"]["eval_bpb"])
      continue
    logging.info("ablate: %s: %d steps x %.3g FLOPs/step = %.3g FLOPs (budget %.3g)", name,
                 plan["steps"], plan["flops_per_byte"] * plan["bytes_per_step"],
                 plan["planned_flops"], budget)
    t0 = time.perf_counter()
    try:
      trainer.run(config, workdir)
    finally:  # an interrupted run's time counts when it resumes
      plan["wall_s"] += time.perf_counter() - t0
      _write_plan(workdir, plan)
    plan["result"] = totals(workdir)
    _write_plan(workdir, plan)
  rows = results(ablation, root)
  write_results(rows, root, budget, entropy_ckpt)
  return rows


def results(ablation, root: str) -> list[dict]:
  """One row per finished run of the config (by name)."""
  rows = []
  for name in ablation.runs.keys():
    plan = _read_plan(storage.join(root, name))
    if not plan or not plan.get("result"):
      continue
    r, config = plan["result"], ablation.runs[name]
    rows.append(dict(
        run=name, description=ablation.descriptions.get(name, ""),
        eval_bpb=r["eval_bpb"], train_flops=r["flops"],
        flops_vs_budget=r["flops"] / plan["budget"], bytes_seen=r["bytes"],
        bytes_per_patch=(r["bytes_per_unit"] if config.model_type == "blt" else None),
        bytes_per_token=(r["bytes_per_unit"] if config.model_type == "token_lm" else None),
        steps=plan["steps"], flops_per_byte=plan["flops_per_byte"], wall_s=plan["wall_s"]))
  return rows


def _fmt(v, spec):
  return "" if v is None else format(v, spec)


def write_results(rows: list[dict], root: str, budget: float, entropy_ckpt: str | None):
  if not rows:
    return
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  (epath.Path(root) / "results.csv").write_text(buf.getvalue())
  lines = [f"Training budget: {budget:.3g} FLOPs per run (bltjax.train.flops accounting).", "",
           "| run | what | held-out bpb | training FLOPs (vs budget) | bytes seen | bytes/patch "
           "| steps | wall |", "|---|---|---|---|---|---|---|---|"]
  for r in sorted(rows, key=lambda r: r["eval_bpb"]):
    unit = (_fmt(r["bytes_per_patch"], ".2f") or
            (f"{r['bytes_per_token']:.2f}/token" if r["bytes_per_token"] else "1 (bytes)"))
    lines.append(f"| {r['run']} | {r['description']} | {r['eval_bpb']:.4f} | "
                 f"{r['train_flops']:.3g} ({100 * r['flops_vs_budget']:.1f}%) | "
                 f"{r['bytes_seen'] / 1e6:.2f}M | {unit} | {r['steps']} | "
                 f"{r['wall_s'] / 60:.1f} min |")
  if entropy_ckpt:
    e = totals(entropy_ckpt)
    lines += ["", f"Entropy-patched runs share the entropy model in {entropy_ckpt} (held-out bpb "
              f"{e['eval_bpb']:.4f}, {e['flops']:.3g} training FLOPs, not counted in the budget)."]
  (epath.Path(root) / "results.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  if not canvas.have_matplotlib():
    logging.info("no curves.png: %s", canvas.MISSING)
    return
  run_curves.draw([storage.join(root, r["run"]) for r in rows], storage.join(root, "curves.png"),
                  labels=[r["run"] for r in rows], x="flops", y="eval_bpb")
