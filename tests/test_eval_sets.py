"""Named held-out sets (`train.eval_sets`): metrics of a training run, how a set is read, config
validation, start-up checks and command-line overrides."""

import functools
import json
import math
import os

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from bltjax.checkpoint import checkpointer
from bltjax.data import documents, pipeline, sources
from bltjax.model import tokenizer
from bltjax.runtime import sharding
from bltjax.train import (batch as batch_lib, experiment, heldout, metrics, patcher,
                          step as step_lib, train_state as ts, trainer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, "experiments", "debug.py")
WORDS = ("the", "byte", "latent", "patch", "entropy", "model", "of", "a", "and", "to", "jax")


@pytest.fixture
def corpus(tmp_path):
  """Training text files, the held-out ones among them, and a JSONL set of other content."""
  rng = np.random.default_rng(0)
  root = tmp_path / "train"
  root.mkdir()
  for i in range(16):
    (root / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS, 80)) + "\n")
  pattern = str(root / "*.txt")
  src = sources.TextFilesSource([pattern])
  _, held = documents.split_indices(src, 0.25)  # what the eval split holds
  other = tmp_path / "other.jsonl"
  docs = ["".join(rng.choice(list("0123456789+-=()"), 300)) for _ in range(6)]
  other.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
  return dict(pattern=pattern, held=tuple(src.key(int(i)) for i in held), other=str(other),
              other_docs=docs)


def tiny_config(corpus, eval_sets):
  cfg = experiment.tiny(experiment.load(DEBUG))
  cfg.patching.mode = "space"  # no entropy stage: quick
  cfg.data.update(source="text", paths=(corpus["pattern"],), eval_fraction=0.25)
  cfg.train.update(steps=4, log_every=2, checkpoint_every=4, eval_every=2, eval_batches=1)
  cfg.train.eval_sets = eval_sets
  return cfg


def both_sets(corpus):
  return dict(same=dict(source="text", paths=corpus["held"]),
              other=dict(source="jsonl", paths=(corpus["other"],), text_field="body"))


def test_training_logs_each_eval_set(tmp_path, corpus):
  """eval/<name>/bpb at every evaluation next to eval_bpb: a set with the eval split's documents
  gives eval_bpb, another set another value, equal to evaluating the final params directly."""
  cfg = tiny_config(corpus, both_sets(corpus))
  wd = str(tmp_path / "wd")
  trainer.run(cfg, wd)
  evals = [r for r in metrics.read_metrics(wd) if "eval_bpb" in r]
  assert [r["step"] for r in evals] == [2, 4]
  for r in evals:
    assert {"eval/same/bpb", "eval/same/loss", "eval/other/bpb", "eval/other/loss"} <= set(r)
    assert r["eval/same/bpb"] == pytest.approx(r["eval_bpb"], rel=1e-6)
    assert r["eval/other/bpb"] != pytest.approx(r["eval_bpb"], rel=1e-3)
    assert r["eval/other/loss"] == pytest.approx(r["eval/other/bpb"] * math.log(2), rel=1e-6)
  assert evals[0]["eval/other/bpb"] != evals[1]["eval/other/bpb"]  # evaluated with new params
  assert os.listdir(os.path.join(wd, "tensorboard"))

  # The final evaluation, recomputed: the final params on the set's first batch.
  params = checkpointer.load_params(wd)[0]
  es = {e.name: e for e in experiment.eval_sets(cfg)}["other"]
  local = next(iter(pipeline.make_dataset(
      heldout.eval_set_config(cfg, es), "all", local_batch_size=cfg.train.batch_size,
      patch=patcher.setup(cfg, None, None).host_transform(), num_workers=0)))
  # Read whole, in order, nothing held out: row 0 is the start of the documents' token stream.
  stream = np.concatenate([tokenizer.encode(d.encode()) for d in corpus["other_docs"]])
  np.testing.assert_array_equal(local["tokens"][0], stream[:cfg.data.seq_len])
  batch = {k: local[k] for k in batch_lib.spec(cfg, cfg.train.batch_size)}
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  with sharding.mesh_context(mesh):
    fn = jax.jit(functools.partial(step_lib.eval_step,
                                   loss_fn=step_lib.make_loss_fn(cfg, ts.build_model(cfg))))
    sums = jax.device_get(fn(params, batch))
  want = float(sums["ce_sum"]) / float(sums["target_bytes"]) / math.log(2)
  assert evals[-1]["eval/other/bpb"] == pytest.approx(want, rel=1e-5)


@pytest.mark.long  # a minute or so: in .ci/run's `pytest -m long`
def test_accelerator_patching_evaluates_sets_alike(tmp_path, corpus):
  """patching.device='accelerator': eval set batches are patched on the devices like the rest."""
  cfg = tiny_config(corpus, both_sets(corpus))
  cfg.patching.device = "accelerator"
  cfg.train.update(steps=2, eval_every=2, checkpoint_every=2)
  wd = str(tmp_path / "wd")
  trainer.run(cfg, wd)
  [r] = [r for r in metrics.read_metrics(wd) if "eval_bpb" in r]
  assert r["eval/same/bpb"] == pytest.approx(r["eval_bpb"], rel=1e-6)
  assert r["eval/other/bpb"] != pytest.approx(r["eval_bpb"], rel=1e-3)


def _fake_evaluator(cfg):
  """An Evaluator whose eval_fn sums the targets: values that tell the batches apart."""
  def eval_fn(params, batch):
    del params
    return dict(ce_sum=float((batch["targets"] * batch["mask"]).sum()),
                target_bytes=float(batch["mask"].sum()))
  return heldout.Evaluator(cfg, eval_fn, None, cfg.train.batch_size, lambda b: (b, {}))


def test_eval_sets_without_a_held_out_split(corpus):
  """data.eval_fraction=0 with eval sets: only eval/<name>/... metrics, names as configured."""
  cfg = tiny_config(corpus, both_sets(corpus))
  cfg.data.eval_fraction = 0.0
  experiment.validate(cfg, 8)
  evaluator = _fake_evaluator(cfg)
  assert evaluator.first_rows() == []  # nothing loaded before the first evaluation
  out = evaluator(None)
  assert sorted(out) == ["eval/other/bpb", "eval/other/loss", "eval/same/bpb", "eval/same/loss"]
  assert out["eval/same/bpb"] != out["eval/other/bpb"]
  rows = evaluator.first_rows()  # one per eval set, row 0 of its first batch (what plot shows)
  assert len(rows) == 2 and all(r.shape == (cfg.data.seq_len,) for r in rows)
  cfg.train.eval_sets = {}
  with pytest.raises(ValueError, match="train.eval_batches > 0 needs data.eval_fraction > 0"):
    experiment.validate(cfg, 8)


@pytest.mark.parametrize("sets,message", [
    ({"a b": dict(source="text", paths=("x",))}, r"train.eval_sets.a b: the set name 'a b'"),
    ({"w": dict(source="s3", paths=("x",))}, r"train.eval_sets.w.source='s3' is unknown"),
    ({"w": dict(paths=("x",))}, r"train.eval_sets.w.source is missing"),
    ({"w": dict(source="text")}, r"train.eval_sets.w.paths is required"),
    ({"w": dict(source="jsonl", paths=("x",))}, r"train.eval_sets.w.text_field is missing"),
    ({"w": dict(source="text", paths=("x",), weight=1.0)},
     r"train.eval_sets.w.weight is not a field"),
    ({"w": dict(source="text", paths=("x",), text_field="body")},
     r"train.eval_sets.w.text_field='body' only applies"),
    ({"w": "text:x"}, r"train.eval_sets.w must be a dict"),
])
def test_invalid_eval_sets_name_the_field(corpus, sets, message):
  cfg = tiny_config(corpus, sets)
  with pytest.raises(ValueError, match=f"invalid config: {message}"):
    experiment.validate(cfg, 8)


def test_eval_sets_need_eval_batches_and_online_data(corpus):
  cfg = tiny_config(corpus, both_sets(corpus))
  cfg.train.eval_batches = 0
  with pytest.raises(ValueError, match="train.eval_sets is set: train.eval_batches=0"):
    experiment.validate(cfg, 8)
  cfg.train.eval_batches = 1
  cfg.data.preprocessed_dir = "/somewhere"
  with pytest.raises(ValueError, match="train.eval_sets cannot be used with data.preprocessed_dir"):
    experiment.validate(cfg, 8)


@pytest.mark.parametrize("path", ["missing_dir/*.jsonl", "nothing_*.jsonl"])
def test_missing_eval_set_files_fail_at_start(tmp_path, corpus, path):
  path = str(tmp_path / path)
  cfg = tiny_config(corpus, dict(wiki=dict(source="jsonl", paths=(path,), text_field="text")))
  wd = tmp_path / "wd"
  with pytest.raises((FileNotFoundError, ValueError), match=f"train.eval_sets.wiki.paths: .*"
                     f"{os.path.dirname(path) if 'missing' in path else 'matched no files'}"):
    trainer.run(cfg, str(wd))
  assert not (wd / "checkpoints").exists()  # before any training


def test_the_entropy_stage_eval_sets_are_checked_too(tmp_path):
  """entropy_model.train.eval_sets: validated and checked at start like the BLT's."""
  cfg = experiment.tiny(experiment.load(DEBUG))  # entropy patching: stage 1 trains first
  cfg.entropy_model.train.eval_sets = dict(w=dict(source="text"))
  with pytest.raises(ValueError, match="invalid config: entropy_model.train.eval_sets.w.paths"):
    experiment.validate(cfg, 8)
  missing = str(tmp_path / "gone" / "*.txt")
  cfg.entropy_model.train.eval_sets = dict(w=dict(source="text", paths=(missing,)))
  experiment.validate(cfg, 8)
  with pytest.raises(FileNotFoundError, match="entropy_model.train.eval_sets.w.paths: .*gone"):
    experiment.check_paths(cfg, str(tmp_path / "wd"), 0, 1)


def test_an_empty_eval_set_names_the_set(tmp_path, corpus):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")
  cfg = tiny_config(corpus, dict(blank=dict(source="jsonl", paths=(str(empty),),
                                            text_field="text")))
  with pytest.raises(ValueError, match=r"train.eval_sets.blank \(jsonl .*empty.jsonl.*empty"):
    _fake_evaluator(cfg)(None)


def test_eval_sets_from_the_command_line():
  spec = ("{'wiki': {'source': 'jsonl', 'paths': ('/data/wiki/*.jsonl',), 'text_field': 'text'}, "
          "'code': {'source': 'text', 'paths': ('/data/code/*.py',)}}")
  argv = ["prog", f"--config={DEBUG}", f"--config.train.eval_sets={spec}"]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  got = {e.name: e for e in experiment.eval_sets(holder.value)}
  assert got == {"wiki": experiment.EvalSet("wiki", "jsonl", ("/data/wiki/*.jsonl",), "text"),
                 "code": experiment.EvalSet("code", "text", ("/data/code/*.py",), "text")}
  experiment.validate(holder.value, 8)


@pytest.mark.parametrize("name", ["debug.py", "entropy_model.py", "1b.py", "8b.py"])
def test_every_experiment_sets_no_eval_sets(name):
  cfg = experiment.load(os.path.join(REPO, "experiments", name))
  assert cfg.train.eval_sets.to_dict() == {}
  if "entropy_model" in cfg:
    assert cfg.entropy_model.train.eval_sets.to_dict() == {}
