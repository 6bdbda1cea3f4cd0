"""A `transformers` config.json that leaves keys out means what it means to `BltConfig`: every key
`hf_config.configs_from_hf` reads takes the port's default when absent (not a bltjax default)."""

import json
import os

import numpy as np
import pytest
import torch

from bltjax import BLT
from bltjax.interop import hf_config
from bltjax.model.config import RuntimeConfig
from tests.hf_models import make_hf_blt, random_tokens

transformers = pytest.importorskip("transformers")


def _ours(cfg: dict):
  return hf_config.configs_from_hf(cfg, RuntimeConfig.for_inference("float32"))


def _port(cfg: dict):
  """What transformers makes of `cfg`, written out in full, then read by us."""
  return _ours(transformers.BltConfig.from_dict(cfg).to_dict())


def _outcome(read, cfg: dict):
  """The configs, or the error (a key whose default disagrees with the rest of the model, e.g.
  decoder heads 16 beside encoder heads 2, must fail the same way with or without the key)."""
  try:
    return read(cfg)
  except ValueError as e:
    return str(e)


def test_a_minimal_config_is_bltconfig():
  model, entropy, patching = _ours({"model_type": "blt"})
  assert (model, entropy, patching) == _ours(transformers.BltConfig().to_dict())
  # The values that used to fall back to bltjax's own choices:
  assert model.encoder.attn_window == model.decoder.attn_window == 512
  assert patching.mode == "entropy" and patching.threshold == pytest.approx(1.335442066192627)
  assert entropy.transformer.dim == 768 and entropy.transformer.attn_window == 512
  assert model.decoder.ffn_dim == 2816 and model.encoder.ffn_dim == int(8 * 1024 / 3)
  assert model.latent.n_layers == 25 and model.hash_vocab == 500002


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("defaults"))
  rng = np.random.default_rng(7)
  tokens = random_tokens(rng, 1, 640)
  make_hf_blt(directory, calib_tokens=tokens[:, :64], window=512, patcher_window=512)
  with open(os.path.join(directory, "config.json")) as f:
    return directory, json.load(f), tokens


def _optional_keys(cfg: dict):
  for key, value in cfg.items():
    if key == "model_type":
      continue
    yield (key,)
    if isinstance(value, dict):
      yield from ((key, sub) for sub in value)


def test_every_optional_key_takes_the_ports_default(saved):
  _, cfg, _ = saved
  read = 0
  for path in _optional_keys(cfg):
    stripped = json.loads(json.dumps(cfg))
    parent = stripped if len(path) == 1 else stripped[path[0]]
    del parent[path[-1]]
    ours = _outcome(_ours, stripped)
    assert ours == _outcome(_port, stripped), f"without {'.'.join(path)}"
    read += not isinstance(ours, str)
  assert read > 40  # top-level keys and every sub-config's


def test_norm_eps_is_read_when_rms_norm_eps_is_absent(saved):
  _, cfg, _ = saved
  cfg = json.loads(json.dumps(cfg))
  del cfg["decoder_config"]["rms_norm_eps"]
  cfg["decoder_config"]["norm_eps"] = 1e-6  # transformers' converter writes Meta's name
  model, _, _ = _ours(cfg)
  assert model.decoder.norm_eps == 1e-6 and model.encoder.norm_eps == 1e-5


def test_disagreeing_cross_attn_k_is_rejected(saved):
  _, cfg, _ = saved
  cfg = json.loads(json.dumps(cfg))
  cfg["decoder_config"]["cross_attn_k"] = cfg["cross_attn_k"] + 1
  with pytest.raises(ValueError, match=r"decoder_config\.cross_attn_k"):
    _ours(cfg)


def test_logits_past_the_default_window_match_the_port(saved, tmp_path):
  """local_attention_window_len left out (transformers' converter does not write it) means 512:
  logits past byte 512 match the port only with that window."""
  directory, cfg, tokens = saved
  for key in ("local_attention_window_len", "patching_mode", "patch_in_forward"):
    cfg.pop(key, None)
  cfg["encoder_config"].pop("sliding_window", None)
  stripped = str(tmp_path / "stripped")
  os.makedirs(stripped)
  os.symlink(os.path.join(directory, "model.safetensors"),
             os.path.join(stripped, "model.safetensors"))
  with open(os.path.join(stripped, "config.json"), "w") as f:
    json.dump(cfg, f)
  blt = BLT.from_hf(stripped)
  assert blt.config.encoder.attn_window == 512 and blt.patching_config.mode == "entropy"
  port = transformers.BltForCausalLM.from_pretrained(stripped).eval()
  lengths = blt.patch_lengths(tokens)
  with torch.no_grad():
    theirs = port(input_ids=torch.tensor(tokens), patch_lengths=torch.tensor(lengths),
                  use_cache=False).logits.numpy()
  np.testing.assert_allclose(blt.logits(tokens, lengths), theirs, atol=1e-4, rtol=0)
