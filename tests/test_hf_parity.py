"""Parity with the Hugging Face `transformers` BLT port, loaded from `save_pretrained` directories.

Configs are restricted to cases where the port agrees with Meta's reference (one-layer encoders, or
cross-attention only after the last encoder layer; no EOS inside the input). Windows smaller than
the input are included: this `transformers` version applies sliding windows to the local models
and the patcher, as the reference does.
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from bltjax import BLT
from bltjax.model import patching
from tests.hf_models import make_hf_blt, random_tokens

CONFIGS = {
    "k2_two_hash_functions": dict(k=2, hash_sizes=(3, 4), hash_functions=2, dec_layers=2),
    "k4_six_ngrams_projection": dict(k=4, hash_sizes=(3, 4, 5, 6, 7, 8), hash_functions=1,
                                     hash_vocab=5003, dec_layers=3, global_dim=64,
                                     global_heads=4),
    "k3_multilayer_encoder_first_decoder_ca": dict(
        k=3, dim=24, heads=3, global_dim=72, global_heads=4, enc_layers=2, dec_layers=1,
        dec_all_layers=False, hash_sizes=(2, 5), hash_functions=3, hash_vocab=257),
    "windows_shorter_than_input": dict(k=2, window=8, patcher_window=6, dec_layers=2,
                                       max_patch_length=3),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  rng = np.random.default_rng(sum(map(ord, request.param)))
  tokens = np.concatenate([random_tokens(rng, 1, 48), random_tokens(rng, 1, 48)], axis=0)
  directory = str(tmp_path_factory.mktemp(request.param))
  model = make_hf_blt(directory, calib_tokens=tokens, **CONFIGS[request.param])
  return model, BLT.from_hf(directory), tokens


def test_entropy_model_matches(case):
  model, blt, tokens = case
  with torch.no_grad():
    ent, _, logits = model.model.patcher(torch.tensor(tokens))
  np.testing.assert_allclose(blt.entropies(tokens), ent.numpy(), atol=1e-4)


def test_patch_boundaries_match(case):
  model, blt, tokens = case
  cfg = model.config
  ours = blt.patch_lengths(tokens)
  assert np.all(ours.sum(axis=1) == tokens.shape[1] + 1)  # reference convention
  assert len({len(s) for s in patching.patch_start_positions(ours, tokens.shape[1])}) >= 1
  for row in range(tokens.shape[0]):  # the port's sentinel is only right for one row at a time
    with torch.no_grad():
      _, theirs, _ = model.model.patcher(torch.tensor(tokens[row:row + 1]), patch_size=cfg.patch_size,
                                         threshold=cfg.patching_threshold,
                                         max_patch_length=cfg.max_patch_length)
    n = tokens.shape[1]
    assert (patching.patch_start_positions(ours[row:row + 1], n)
            == patching.patch_start_positions(theirs.numpy(), n))
  sizes = ours[ours > 0]
  assert sizes.max() > 1 and sizes.min() == 1, "the calibrated threshold should mix patch sizes"


def test_logits_match_for_the_same_patch_lengths(case):
  model, blt, tokens = case
  lengths = blt.patch_lengths(tokens)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens), patch_lengths=torch.tensor(lengths),
                   use_cache=False).logits.numpy()
  ours = blt.logits(tokens, lengths)
  assert ours.dtype == np.float32 and ours.shape == tokens.shape + (260,)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_logits_match_when_each_side_patches_itself(case):
  """End to end: the port runs its own patcher; we run ours (one row: the port's B>1 bug)."""
  model, blt, tokens = case
  row = tokens[:1]
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(row), use_cache=False).logits.numpy()
  ours = blt.logits(row)
  if model.config.max_patch_length:
    # The port splits long patches over N positions, the reference over N + 1 (the next byte
    # included), so a split can start a patch at position N only in ours; that changes which
    # patch the *last* byte reads. We follow the reference (as its generation does).
    ours, theirs = ours[:, :-1], theirs[:, :-1]
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


# -- bad checkpoints and bad inputs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("ckpt"))
  make_hf_blt(directory, threshold=1.0)
  return directory


def _edit(src, dst, fn):
  os.makedirs(dst, exist_ok=True)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  fn(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  return dst


def test_missing_tensor_is_named(checkpoint, tmp_path):
  bad = _edit(checkpoint, str(tmp_path / "m"),
              lambda t: t.pop("model.local_decoder.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"missing tensor.*local_decoder\.layers\.1\.mlp\.up_proj"):
    BLT.from_hf(bad)


def test_extra_tensor_is_named(checkpoint, tmp_path):
  bad = _edit(checkpoint, str(tmp_path / "x"),
              lambda t: t.update({"model.local_encoder.bogus.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensor.*local_encoder\.bogus\.weight"):
    BLT.from_hf(bad)


def test_misshaped_tensor_is_named(checkpoint, tmp_path):
  def shrink(t):
    t["lm_head.weight"] = t["lm_head.weight"][:, :-1].copy()
  bad = _edit(checkpoint, str(tmp_path / "s"), shrink)
  with pytest.raises(ValueError, match=r"lm_head\.weight has shape"):
    BLT.from_hf(bad)


def test_not_a_blt_checkpoint(checkpoint, tmp_path):
  with open(os.path.join(checkpoint, "config.json")) as f:
    cfg = json.load(f)
  cfg["model_type"] = "llama"
  bad = _edit(checkpoint, str(tmp_path / "t"), lambda t: None)
  with open(os.path.join(bad, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="model_type"):
    BLT.from_hf(bad)
  with pytest.raises(FileNotFoundError, match="config.json"):
    BLT.from_hf(str(tmp_path))


def test_bad_inputs_get_clear_errors(checkpoint):
  blt = BLT.from_hf(checkpoint)
  tokens = np.array([[1, 70, 80, 90]])
  with pytest.raises(ValueError, match=r"tokens\[0, 2\] = 300"):
    blt.logits(np.array([[1, 70, 300, 90]]))
  with pytest.raises(ValueError, match="2-D"):
    blt.logits(np.array([1, 70, 80]))
  with pytest.raises(ValueError, match=r"sum is 4, expected 5"):
    blt.logits(tokens, np.array([[1, 2, 1]]))
  with pytest.raises(ValueError, match=r"B=1"):
    blt.logits(tokens, np.array([[1, 4], [1, 4]]))
  with pytest.raises(ValueError, match="first patch"):
    blt.logits(tokens, np.array([[2, 3]]))
