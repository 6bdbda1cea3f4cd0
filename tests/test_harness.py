"""bltjax as an lm-evaluation-harness model: scores equal BLT.logits computed directly, on local
tasks (YAML + JSONL in tmp, no network): multiple choice, rolling bits per byte, generation."""

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from bltjax import BLT
from bltjax.inference import harness, lm_evaluation
from bltjax.inference.api import param_shapes
from bltjax.model import tokenizer
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.config import PatchingConfig
from bltjax.model.lm import TransformerLM
from tests import tiny

CONTEXT = 64  # the tiny model's context: one length bucket (harness.MIN_BUCKET)
REF_ROWS = 40  # every direct reference goes through one [REF_ROWS, CONTEXT] call: one compile
QUESTIONS = [("Q: 2+2?\nA:", ["four", "five", "six", "two"]),
             ("Q: sky?\nA:", ["blue", "green", "red", "gray"]),
             ("Q: cat says?\nA:", ["meow", "woof", "moo", "quack"]),
             ("Q: opposite of up?\nA:", ["down", "left", "over", "in"]),
             ("Capital of France:", ["Paris", "Rome", "Bonn", "Oslo"]),
             ("", ["a", "bb", "ccc", "dddd"]),  # empty context: conditioned on BOS only
             ("Q: H2O?\nA:", ["water", "salt", "air", "fire"]),
             ("Q: 3*3?\nA:", ["nine", "six", "ten", "one"])]
SHORT_DOC = "Byte Latent Transformers read bytes, not tokens."
LONG_DOC = ("The quick brown fox jumps over the lazy dog. " * 4).strip()  # > CONTEXT bytes
MC_TASK, ROLLING_TASK, GEN_TASK = "bltjax_test_mc", "bltjax_test_rolling", "bltjax_test_gen"


def random_params(module, seed: int, *example_args) -> dict:
  """Random weights drawn in numpy (no init program to compile): unit-variance embeddings,
  fan-in scaled kernels, norm scales near one."""
  rng, params = np.random.default_rng(seed), {}
  for path, shape in param_shapes(module, *example_args).items():
    if path[-1] == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / (math.sqrt(shape[-2]) if path[-1] == "kernel" else 1)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value.astype(np.float32)
  return params


def tiny_blt() -> BLT:
  """A random BLT with entropy patching (threshold: an upper quantile of the entropies, so that
  patches are mixed, about 4 bytes long) and a sharpened output layer, so that its predictions
  are far from uniform."""
  cfg, ecfg = tiny.blt_config(window=16, dec_layers=1), tiny.entropy_config(window=16, layers=1)
  tokens = np.ones((1, 8), np.int32)
  params = random_params(ByteLatentTransformer(cfg), 0, tokens, np.ones((1, 9), np.int32))
  eparams = random_params(TransformerLM(ecfg), 1, tokens)
  params["local_decoder"]["output"]["kernel"] *= 8
  calib = np.zeros((REF_ROWS, CONTEXT), np.int32)  # the shape of direct_logprobs: one compile
  calib[:] = tokenizer.encode(LONG_DOC, add_eos=False)[:CONTEXT]
  entropies = BLT(cfg, params, patching_cfg=PatchingConfig("byte", None, None, False, None, None),
                  entropy_cfg=ecfg, entropy_params=eparams).entropies(calib)[0]
  pc = PatchingConfig(mode="entropy", threshold=float(np.quantile(entropies, 0.75)),
                      threshold_add=None, monotonic=False, patch_size=None, max_patch_length=None)
  return BLT(cfg, params, patching_cfg=pc, entropy_cfg=ecfg, entropy_params=eparams,
             max_context=CONTEXT)


def log_softmax(logits):
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def direct_logprobs(blt: BLT, seqs: list[np.ndarray]) -> list[np.ndarray]:
  """For each id sequence s, log p(s[t+1] | s[:t+1]) for every t, from one BLT.logits call with
  the checkpoint's own patching (rows end-padded to CONTEXT; the model is causal)."""
  assert len(seqs) <= REF_ROWS
  tokens = np.zeros((REF_ROWS, CONTEXT), np.int32)
  tokens[:, 0] = tokenizer.BOS_ID
  for r, s in enumerate(seqs):
    tokens[r, :len(s) - 1] = s[:-1]
  logp = log_softmax(blt.logits(tokens))
  return [logp[r, np.arange(len(s) - 1), s[1:]] for r, s in enumerate(seqs)]


def ids(text: str, bos: bool = True) -> np.ndarray:
  return tokenizer.encode(text, add_bos=bos, add_eos=False)


def instance(kind, args, i=0, task="t"):
  return Instance(kind, {}, args, i, (task, i, 1))


def rolling_windows(text: str) -> list[tuple[np.ndarray, int]]:
  """(row, k) per disjoint window: the row's last k bytes are new, predicted from the CONTEXT ids
  before each of them ([BOS] + bytes, as far back as there are)."""
  seq, n = ids(text), len(text.encode())  # byte j is seq[j + 1]
  return [(seq[max(0, end - CONTEXT):end + 1], end - start)
          for start in range(0, n, CONTEXT) for end in [min(start + CONTEXT, n)]]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = tmp_path_factory.mktemp("harness")
  with pytest.MonkeyPatch.context() as mp:  # the JSON loader of `datasets`, offline
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HOME", str(path / "hf"))
    yield path


@pytest.fixture(scope="module")
def lm(root):
  tiny_blt().save(str(root / "model"))
  return harness.BLTLM(checkpoint=str(root / "model"), batch_size=4)


@pytest.fixture(scope="module")
def direct(lm):
  """Direct scores: every MC choice's continuation log-prob and each doc's rolling windows."""
  pairs = [(q, " " + c) for q, choices in QUESTIONS for c in choices]
  windows = [(doc, row, k) for doc in (SHORT_DOC, LONG_DOC) for row, k in rolling_windows(doc)]
  logps = direct_logprobs(lm.blt, [ids(q + c) for q, c in pairs] + [w[1] for w in windows])
  mc = [float(lp[-len(c.encode()):].sum()) for (_, c), lp in zip(pairs, logps)]
  rolling = {SHORT_DOC: 0.0, LONG_DOC: 0.0}
  for (doc, _, k), lp in zip(windows, logps[len(pairs):]):
    rolling[doc] += float(lp[-k:].sum())
  return dict(pairs=pairs, mc=np.array(mc).reshape(len(QUESTIONS), 4), rolling=rolling)


@pytest.fixture(scope="module")
def greedy(lm):
  """A prompt, a stop character from the model's own greedy output (first seen at byte >= 3)
  and the expected output: the greedy text up to that character."""
  for prompt in ("Q: what?\nA:", "Hello", "x = 1\n", "abc"):
    req = instance("generate_until", (prompt, {"until": [], "max_gen_toks": 40}))
    text = lm.generate_until([req])[0]
    for j, ch in enumerate(text):
      if j >= 3 and ch.isascii() and text.index(ch) == j:
        return prompt, ch, text[:j], text
  pytest.fail("no ASCII byte in the greedy outputs to stop at")


@pytest.fixture(scope="module")
def tasks_dir(root, direct, greedy):
  """Local lm-eval tasks: multiple choice (half the answers are the model's argmax: accuracy
  0.5), rolling perplexity over the two documents, generation until the stop character."""
  path = root / "tasks"
  path.mkdir()
  best = direct["mc"].argmax(1)
  mc = [dict(question=q, choices=c, answer=int(best[i] if i % 2 == 0 else (best[i] + 1) % 4))
        for i, (q, c) in enumerate(QUESTIONS)]
  prompt, stop, expected, _ = greedy
  data = {MC_TASK: mc, ROLLING_TASK: [dict(text=SHORT_DOC), dict(text=LONG_DOC)],
          GEN_TASK: [dict(prompt=prompt, target=expected)]}
  specs = {MC_TASK: dict(output_type="multiple_choice", doc_to_text="{{question}}",
                         doc_to_choice="{{choices}}", doc_to_target="{{answer}}",
                         metric_list=[dict(metric="acc")]),
           ROLLING_TASK: dict(output_type="loglikelihood_rolling", doc_to_text="",
                              doc_to_target="{{text}}",
                              metric_list=[dict(metric=m) for m in (
                                  "word_perplexity", "byte_perplexity", "bits_per_byte")]),
           GEN_TASK: dict(output_type="generate_until", doc_to_text="{{prompt}}",
                          doc_to_target="{{target}}",
                          generation_kwargs=dict(until=[stop], max_gen_toks=40, do_sample=False),
                          metric_list=[dict(metric="exact_match")])}
  for name, spec in specs.items():
    jsonl = path / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in data[name]))
    spec = dict(task=name, dataset_path="json", test_split="test",
                dataset_kwargs=dict(data_files=dict(test=str(jsonl)), cache_dir=str(root / "ds")),
                **spec)
    (path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
  return path


@pytest.fixture(scope="module")
def results(lm, tasks_dir):
  tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
  return simple_evaluate(model=lm, tasks=[MC_TASK, ROLLING_TASK, GEN_TASK], task_manager=tm,
                         log_samples=False, bootstrap_iters=0, torch_random_seed=None)["results"]


def test_multiple_choice_accuracy_equals_direct_logits(lm, direct, results):
  scores = direct["mc"]
  assert np.ptp(scores, axis=1).min() > 0.1, "the model's predictions should not be uniform"
  assert results[MC_TASK]["acc,none"] == pytest.approx(0.5)  # half the answers are its argmax
  got = lm.loglikelihood([instance("loglikelihood", p, i) for i, p in enumerate(direct["pairs"])])
  np.testing.assert_allclose([ll for ll, _ in got], scores.reshape(-1), rtol=1e-5, atol=1e-4)


def test_rolling_equals_bits_per_byte(lm, direct, results):
  docs = [SHORT_DOC, LONG_DOC]
  n = [len(d.encode()) for d in docs]
  assert n[0] < CONTEXT < n[1]
  got = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (d,), i)
                                  for i, d in enumerate(docs)])
  np.testing.assert_allclose(got, [direct["rolling"][d] for d in docs], rtol=1e-5)
  seq = ids(SHORT_DOC)  # short: bits per byte straight from the logits of [BOS] + bytes
  bpb = -direct_logprobs(lm.blt, [seq])[0].sum() / math.log(2) / n[0]
  assert -got[0] / math.log(2) / n[0] == pytest.approx(bpb, rel=1e-5)
  want = -(sum(got)) / math.log(2) / sum(n)
  assert results[ROLLING_TASK]["bits_per_byte,none"] == pytest.approx(want, rel=1e-5)
  assert results[ROLLING_TASK]["byte_perplexity,none"] == pytest.approx(2 ** want, rel=1e-5)


def test_generate_until_stops_at_the_stop_string(lm, greedy, results):
  prompt, stop, expected, unstopped = greedy
  assert stop in unstopped and expected and stop not in expected
  assert len(unstopped.encode()) <= 40 * 3  # 40 bytes at most (U+FFFD: 3 for 1 invalid byte)
  out = lm.generate_until([instance("generate_until", (
      prompt, {"until": ["never\x01", stop], "max_gen_toks": 40}))])
  assert out == [expected] and len(expected.encode()) < 40
  assert results[GEN_TASK]["exact_match,none"] == 1.0


def test_batched_and_padded_equals_one_at_a_time(lm):
  reqs = [("Hello", " world, a row"), ("", "just a continuation"), ("ab", "c"),
          ("The cat sat on", " the mat."), ("x" * 20, " y")]
  got = lm.loglikelihood([instance("loglikelihood", r, i) for i, r in enumerate(reqs)])
  for (context, continuation), (ll, is_greedy) in list(zip(reqs, got))[:2]:
    seq = ids(context + continuation)  # unpadded, alone, patched by BLT.logits itself
    logp = log_softmax(lm.blt.logits(seq[None, :-1])[0])
    k = len(continuation.encode())
    want = logp[np.arange(len(seq) - 1), seq[1:]][-k:].sum()
    assert ll == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert is_greedy == bool((logp[-k:].argmax(-1) == seq[1:][-k:]).all())


def test_request_longer_than_the_context(lm, caplog):
  context, continuation = "y" * 70, " end"
  req = instance("loglikelihood", (context, continuation), 3, task=MC_TASK)
  with pytest.raises(harness.ContextTooLong,
                     match=rf"task '{MC_TASK}' doc 3: the request is 74 bytes \(context 70, "
                           r"continuation 4\), more than the model's context of 64 bytes"):
    lm.loglikelihood([req])
  cut = harness.BLTLM(blt=lm.blt, batch_size=4, truncate_context=True)
  with caplog.at_level(logging.WARNING):
    (ll, _), _ = cut.loglikelihood([req, instance("loglikelihood", ("a", "b"), 4)])
  assert cut.truncated == 1 and "1 request(s) longer than the context" in caplog.text
  seq = ids(context + continuation)[-(CONTEXT + 1):]  # the last 64 inputs and the final byte
  assert ll == pytest.approx(direct_logprobs(lm.blt, [seq])[0][-4:].sum(), rel=1e-5)
  with pytest.raises(harness.ContextTooLong, match="continuation alone is 70 bytes"):
    cut.loglikelihood([instance("loglikelihood", ("", "z" * 70), 0)])
  with pytest.raises(ValueError, match=r"max_length=65 is outside \[2, 64\]"):
    harness.BLTLM(blt=lm.blt, max_length=65)


def test_model_args(lm, root):
  other = harness.BLTLM.create_from_arg_string(
      f"checkpoint={root / 'model'},batch_size=2,max_length=32,truncate_context=True",
      dict(batch_size=None, device=None))
  assert (other.batch_size, other.max_length, other.truncate_context) == (2, 32, True)
  assert other.blt.patching_config == lm.blt.patching_config
  np.testing.assert_array_equal(
      other.blt.entropy_params["output"]["kernel"], lm.blt.entropy_params["output"]["kernel"])
  with pytest.raises(ValueError, match="unknown bltjax model argument"):
    harness.BLTLM(blt=lm.blt, pretrained="gpt2")
  # entropy_dir names the entropy model of a Meta-format checkpoint (tests/test_meta_format.py).
  with pytest.raises(ValueError, match="entropy_dir is only used for Meta-format checkpoints"):
    harness.BLTLM(checkpoint=str(root / "model"), entropy_dir=str(root / "model"))


def test_missing_lm_eval_and_unknown_task(monkeypatch, tasks_dir):
  monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
  with pytest.raises(ImportError, match=r'lm-eval is not installed: pip install "bltjax\[eval\]"'):
    lm_evaluation.import_lm_eval()
  monkeypatch.undo()
  tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
  lm_evaluation.check_tasks([MC_TASK], tm, include_path=str(tasks_dir))
  with pytest.raises(ValueError, match="unknown lm-eval task 'no_such_task'"):
    lm_evaluation.check_tasks([MC_TASK, "no_such_task"], tm, include_path=str(tasks_dir))


def test_cli(root, tasks_dir):
  out = root / "out"
  cmd = [sys.executable, "-m", "bltjax.evaluate", f"--checkpoint={root / 'model'}",
         f"--tasks={MC_TASK}", f"--include_path={tasks_dir}", "--batch_size=4",
         f"--output_path={out}"]
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ)
  assert p.returncode == 0, p.stderr[-3000:]
  assert MC_TASK in p.stdout and "acc" in p.stdout
  saved = json.loads((out / "results.json").read_text())
  assert saved["results"][MC_TASK]["acc,none"] == pytest.approx(0.5)
