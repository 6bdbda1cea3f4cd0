"""bltjax.train.ablation (python -m bltjax.ablate): FLOP-matched runs of experiments/ablation.py,
skipped when finished."""

import csv
import json

from etils import epath
import pytest

from bltjax.train import ablation as ablation_lib, experiment, metrics, trainer

# Runs cheap enough for the default suite: one of each kind of FLOP accounting (a byte LM, a BLT
# with fixed patches, a BLT whose patch size is measured).
_ONLY = ("byte", "static4", "space")
_BUDGET = 2e10  # about 10-25 steps of each tiny model


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("ablation"))
  ablation = experiment.load("experiments/ablation.py:tiny")
  rows = ablation_lib.run(ablation, root, budget=_BUDGET, only=_ONLY)
  return ablation, root, rows


def _plan(root, name):
  return json.loads((epath.Path(root) / name / ablation_lib.PLAN_FILE).read_text())


@pytest.mark.long  # three tiny training runs: ~1.5 min
def test_every_run_spends_the_budget(finished):
  _, root, rows = finished
  assert sorted(r["run"] for r in rows) == sorted(_ONLY)
  for r in rows:
    plan = _plan(root, r["run"])
    assert plan["steps"] >= 10
    # Planned: steps x FLOPs per step (from the measured bytes per patch) within 5%.
    planned = plan["steps"] * plan["flops_per_byte"] * plan["bytes_per_step"]
    assert abs(planned / _BUDGET - 1) < 0.05, (r["run"], planned)
    # Trained: FLOPs per byte as the trainer logged them, times the bytes it trained on.
    assert abs(r["train_flops"] / _BUDGET - 1) < 0.05, (r["run"], r["train_flops"])
    done = [m for m in metrics.read_metrics(f"{root}/{r['run']}") if "eval_bpb" in m]
    assert done[-1]["step"] == plan["steps"] and r["eval_bpb"] == done[-1]["eval_bpb"]
  by_name = {r["run"]: r for r in rows}
  # Bigger patches cost the latent less per byte: more steps for the same budget.
  assert by_name["space"]["bytes_per_patch"] > 1
  assert by_name["byte"]["bytes_per_patch"] is None


@pytest.mark.long  # three tiny training runs: ~1.5 min
def test_results_files(finished):
  _, root, rows = finished
  with open(f"{root}/results.csv") as f:
    table = list(csv.DictReader(f))
  assert [t["run"] for t in table] == [r["run"] for r in rows]
  assert float(table[0]["eval_bpb"]) == pytest.approx(rows[0]["eval_bpb"])
  md = open(f"{root}/results.md").read()
  for r in rows:
    assert f"| {r['run']} |" in md


@pytest.mark.long  # three tiny training runs: ~1.5 min
def test_rerun_skips_finished_runs(finished, monkeypatch):
  ablation, root, rows = finished
  def no_training(*a, **k):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(trainer, "run", no_training)
  again = ablation_lib.run(ablation, root, budget=_BUDGET, only=_ONLY)
  assert again == rows


@pytest.mark.long  # three tiny training runs: ~1.5 min
def test_another_budget_on_the_same_root_is_refused(finished):
  ablation, root, _ = finished
  with pytest.raises(ValueError, match="budget"):
    ablation_lib.run(ablation, root, budget=2 * _BUDGET, only=("byte",))


def test_unknown_run_name():
  with pytest.raises(ValueError, match="unknown run"):
    ablation_lib.check(experiment.load("experiments/ablation.py:tiny"), ["nope"])
