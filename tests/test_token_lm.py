"""The token-level baseline (model_type 'token_lm'): the byte-level BPE (bltjax/data/bpe.py), bits per
byte over BPE targets, its FLOPs, its config section and a tiny run end to end."""

import copy
import json
import math
import os
import pickle

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bltjax.data import bpe, documents, pipeline, sources
from bltjax.data.documents import Document
from bltjax.model import tokenizer
from bltjax.train import experiment, flops, metrics, step as step_lib, train_state as ts, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_LM = os.path.join(REPO, "experiments", "token_lm.py")
TEXT = "def f(x):\n    return x + 1  # café, naïve, 東京 <|eos 2|>\n".encode() + b"\xff\x00\xc3"


def tiny_config():
  return experiment.load(f"{TOKEN_LM}:tiny")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
  """The tiny experiment's tokenizer (512 tokens, trained on 1 MiB of the stdlib)."""
  return bpe.ensure_tokenizer(tiny_config(), str(tmp_path_factory.mktemp("tok")))


def test_specials_are_ids_0_to_3_and_never_produced(tiny_tokenizer):
  b = bpe.load(tiny_tokenizer)
  assert b.vocab_size == 512
  assert [b.tok.id_to_token(i) for i in range(4)] == list(bpe.SPECIALS)
  assert tokenizer.EOS_ID == 2 and tokenizer.BOS_ID == 1
  ids = b.encode(" ".join(bpe.SPECIALS).encode())  # their names are ordinary text
  assert ids.min() >= 4 and b.decode_bytes(ids) == " ".join(bpe.SPECIALS).encode()
  assert (b.token_bytes[:4] == 0).all() and (b.token_bytes[4:] >= 1).all()


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(data=st.one_of(
    st.binary(max_size=200),  # mostly invalid UTF-8
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\xa9", b"caf\xc3\xa9", b" ", b"\n",
                              b"def", b"  return", "東".encode()]), max_size=40).map(b"".join)))
def test_token_bytes_and_decoding_are_exact_for_any_bytes(tiny_tokenizer, data):
  doc = bpe.DocumentToBPE(tiny_tokenizer).map(Document(data, None))
  tokens, token_bytes = doc["tokens"], doc["token_bytes"]
  assert tokens[0] == tokenizer.BOS_ID and tokens[-1] == tokenizer.EOS_ID
  assert not np.isin(tokens[1:-1], [0, 1, 2, 3]).any()
  assert token_bytes[0] == 0 and token_bytes[-1] == 1
  assert int(token_bytes.sum()) == len(data) + 1  # EOS: one byte, as for the byte models
  assert bpe.load(tiny_tokenizer).decode_bytes(tokens) == data
  assert doc["doc_flags"].shape == tokens.shape and not doc["doc_flags"][1:].any()


def test_document_to_bpe_flags_and_pickles_lazily(tiny_tokenizer):
  to_bpe = bpe.DocumentToBPE(tiny_tokenizer)
  ref = documents.DocumentToTokens().map(Document(TEXT, None))
  doc = to_bpe.map(Document(TEXT, None))
  assert doc["doc_flags"][0] == ref["doc_flags"][0] != 0  # invalid UTF-8 and NUL, flagged
  assert len(doc["tokens"]) < len(ref["tokens"])  # BPE merges
  state = pickle.loads(pickle.dumps(to_bpe)).__dict__
  assert state["_bpe"] is None and state["path"] == tiny_tokenizer  # the path travels
  empty = to_bpe.map(Document(b"", "unreadable"))
  assert list(empty["tokens"]) == [1, 2] and list(empty["token_bytes"]) == [0, 1]


def test_bits_per_byte_of_a_bpe_batch(tiny_tokenizer):
  """loss_sums / eval_step over BPE targets = nats / (text bytes + 1 EOS), checked against a
  log-softmax in numpy over the token ids; padding (mask 0) counts nothing."""
  config = tiny_config()
  config.tokenizer.path = tiny_tokenizer
  doc = bpe.DocumentToBPE(tiny_tokenizer).map(Document(TEXT, None))
  tokens, n = doc["tokens"], len(doc["tokens"]) - 1
  pad = 5
  batch = dict(tokens=np.pad(tokens[:-1], (0, pad))[None].astype(np.int32),
               targets=np.pad(tokens[1:], (0, pad))[None].astype(np.int32),
               mask=np.pad(np.ones(n, np.float32), (0, pad))[None],
               target_bytes=np.pad(doc["token_bytes"][1:].astype(np.float32), (0, pad))[None])
  model = ts.build_model(config)
  params = model.init(jax.random.key(0), jnp.asarray(batch["tokens"]))["params"]
  loss_fn = step_lib.make_loss_fn(config, model)
  out = jax.jit(lambda p, b: step_lib.eval_step(p, b, loss_fn=loss_fn))(params, batch)

  logits = np.asarray(model.apply({"params": params}, batch["tokens"]), np.float64)[0, :n]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nats = -logp[np.arange(n), tokens[1:]].sum()
  n_bytes = len(TEXT) + 1
  assert float(out["target_bytes"]) == n_bytes
  np.testing.assert_allclose(float(out["ce_sum"]), nats, rtol=1e-5)
  bpb = float(out["ce_sum"]) / float(out["target_bytes"]) / math.log(2.0)  # heldout's eval_bpb
  np.testing.assert_allclose(bpb, nats / n_bytes / math.log(2.0), rtol=1e-5)
  assert n < n_bytes - 1  # tokens, not bytes: the per-token loss would be a different number


def test_pipeline_batches_carry_target_bytes(tiny_tokenizer):
  config = tiny_config()
  config.tokenizer.path = tiny_tokenizer
  b = bpe.load(tiny_tokenizer)
  it = iter(pipeline.make_dataset(config, "eval", local_batch_size=2, process_index=0,
                                  process_count=1, num_workers=0))
  for _ in range(2):
    batch = next(it)
    assert batch["tokens"].shape == batch["target_bytes"].shape == (2, config.data.seq_len)
    assert batch["target_bytes"].dtype == np.float32 and batch["tokens"].max() < 512
    want = np.where(batch["targets"] == tokenizer.EOS_ID, 1, b.token_bytes[batch["targets"]])
    np.testing.assert_array_equal(batch["target_bytes"], want * batch["mask"])
  config.tokenizer.path = None
  with pytest.raises(ValueError, match="tokenizer.path is not set"):
    pipeline.make_dataset(config, "eval", local_batch_size=2, process_index=0, process_count=1)


def _text_corpus(tmp_path, eval_word):
  """Text files of which the held-out ones (eval_fraction 0.3) repeat `eval_word`."""
  lib = os.path.dirname(os.__file__)
  names = ["os.py", "random.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py"]
  tmp_path.mkdir()
  for i in range(16):
    path = tmp_path / f"doc{i:02d}.txt"
    with open(os.path.join(lib, names[i % len(names)]), "rb") as f:
      path.write_bytes(f.read()[i * 500:i * 500 + 2500])
  source = sources.build_source("text", [str(tmp_path / "*.txt")])
  train_idx, eval_idx = documents.split_indices(source, 0.3)
  assert len(eval_idx) and len(train_idx)
  for i in eval_idx:
    with open(source.key(int(i)), "wb") as f:
      f.write(f" {eval_word}".encode() * 3000)
  return str(tmp_path / "*.txt")


def test_tokenizer_reads_only_the_training_split_and_is_reused(tmp_path, monkeypatch):
  word = "zqxjvbkw"
  config = tiny_config()
  config.data.update(source="text", paths=(_text_corpus(tmp_path / "data", word),),
                     eval_fraction=0.3)
  config.model.vocab_size = 300
  def single_token(path):
    return len(bpe.load(path).encode(f" {word}".encode())) == 1

  path = bpe.ensure_tokenizer(config, str(tmp_path / "run"))
  assert path == str(tmp_path / "run" / bpe.FILE_NAME) and not single_token(path)
  everything = copy.deepcopy(config)  # control: with nothing held out, the word is one token
  everything.data.eval_fraction = 0.0
  assert single_token(bpe.ensure_tokenizer(everything, str(tmp_path / "all")))

  monkeypatch.setattr(bpe, "train_tokenizer", lambda *a: pytest.fail("trained again"))
  assert bpe.ensure_tokenizer(config, str(tmp_path / "run")) == path  # re-run: reused
  other = copy.deepcopy(config)
  other.tokenizer.path = path  # an existing tokenizer.json is used as is
  assert bpe.ensure_tokenizer(other, str(tmp_path / "elsewhere")) == path
  assert not (tmp_path / "elsewhere").exists()
  other.model.vocab_size = 512
  with pytest.raises(ValueError, match=r"has 300 tokens but model.vocab_size=512"):
    bpe.ensure_tokenizer(other, str(tmp_path / "elsewhere"))
  monkeypatch.undo()
  other.tokenizer.path = None
  other.tokenizer.train_bytes = 100  # too little text for 252 merges
  with pytest.raises(ValueError, match="raise tokenizer.train_bytes"):
    bpe.ensure_tokenizer(other, str(tmp_path / "short"))
  assert 1 < bpe.mean_bytes_per_token(config, path, 10_000) < 8


def test_flops_per_byte_is_per_token_over_bytes_per_token():
  cfg = experiment.model_config(experiment.load(TOKEN_LM))
  t, seq = cfg.transformer, 112
  per_token = 3 * (t.n_layers * flops.layer_flops(t, (seq + 1) / 2) + 2 * t.dim * cfg.vocab_size)
  assert flops.lm_flops_per_byte(cfg, seq) == pytest.approx(per_token)
  assert flops.token_lm_flops_per_byte(cfg, seq, 3.5) == pytest.approx(per_token / 3.5)
  assert flops.token_lm_flops_per_byte(cfg, seq, 2.0, training=False) == pytest.approx(
      per_token / 3 / 2.0)


@pytest.mark.parametrize("field, value, message", [
    ("tokenizer.train_bytes", 0, "tokenizer.train_bytes=0 must be an int >= 1"),
    ("model.vocab_size", 260, "model.vocab_size=260 must be >= 261"),
    ("data.preprocessed_dir", "/x", "token_lm reads its documents online"),
    ("tokenizer.path", "", "tokenizer.path='' must be None"),
])
def test_invalid_token_lm_configs_name_the_field(field, value, message):
  config = tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=message):
    experiment.validate(config, 1)
  config = tiny_config()
  config.tokenizer.unlock()
  config.tokenizer.vocab = 3
  with pytest.raises(ValueError, match="tokenizer.vocab is not a field"):
    experiment.validate(config, 1)


def test_tiny_run_end_to_end_and_resume(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  experiment.validate(config, jax.device_count())
  assert config.model_type == "token_lm" and config.model.transformer.attn_window is None
  trainer.run(config, workdir, stop_at_step=2)
  assert os.path.exists(os.path.join(workdir, bpe.FILE_NAME))
  trainer.run(config, workdir)  # resumes at step 2
  records = metrics.read_metrics(workdir)
  steps = [r for r in records if "loss" in r]
  assert [r["step"] for r in steps] == [2, 4]
  for r in steps:
    assert 1.5 < r["bytes_per_token"] < 4 and r["flops_per_byte"] > 0
    cfg = experiment.model_config(config)
    assert r["flops_per_byte"] == pytest.approx(
        flops.token_lm_flops_per_byte(cfg, config.data.seq_len, r["bytes_per_token"]))
    assert r["target_bytes"] > 8 * config.data.seq_len  # bytes of text, not tokens
    assert "text_bytes" not in r and "target_tokens" not in r
  evals = [r for r in records if "eval_bpb" in r]
  assert len(evals) == 1 and 0 < evals[0]["eval_bpb"] < 10
  recorded = json.loads((tmp_path / "run" / "config.json").read_text())
  assert recorded["tokenizer"]["path"] == os.path.join(workdir, bpe.FILE_NAME)
  assert trainer.run(config, workdir) is None  # already trained: a no-op
  assert metrics.read_metrics(workdir) == records
