"""Meta's released formats (hub: config.json {"args"} + model.safetensors + train_args.json;
consolidated: params.json + consolidated.pth), checked against the `transformers` port on small
random models whose weights are written back under Meta's names (tests/meta_models.py).

Inputs hold no EOS inside (the port has no document masking), and encoders have one layer (where
the port and Meta agree).
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from bltjax import BLT
from bltjax.interop import meta_config
from bltjax.model import patching
from bltjax.model.config import RuntimeConfig
from bltjax.runtime import errors
from tests.hf_models import random_tokens
from tests.meta_models import make_case, train_args, write_consolidated, write_hub

RUNTIME = RuntimeConfig.for_inference("float32")
CASES = {
    # Hub format, windows shorter than the input (local 8, entropy 6), two hash functions.
    "hub": dict(k=2, window=8, ent_window=6, ent_multiple_of=32, ent_mult=0.75),
    # Consolidated format (entropy window fixed at 512 as Meta's loader does), k=4 with the
    # global input projection, six n-gram sizes, CA only before the first decoder layer.
    "consolidated": dict(k=4, global_dim=64, global_heads=4, dec_layers=3, dec_all=False,
                         hash_sizes=(3, 4, 5, 6, 7, 8), hash_functions=1, hash_vocab=503,
                         window=16, multiple_of=64, ffn_mult=1.5),
}


def _tokens(seed):
  rng = np.random.default_rng(seed)
  return np.concatenate([random_tokens(rng, 1, 48), random_tokens(rng, 1, 48)], axis=0)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  tokens = _tokens(len(request.param))
  root = tmp_path_factory.mktemp(request.param)
  model, args, ent_args, blt_t, ent_t = make_case(calib_tokens=tokens, **CASES[request.param])
  threshold = model.config.patching_threshold
  if request.param == "hub":
    path = write_hub(root / "blt", args, blt_t, train_args(args, threshold=threshold))
    entropy_dir = write_hub(root / "entropy", ent_args, ent_t)
  else:  # facebook/blt layout: blt_1b/ and entropy_model/ side by side
    path = write_consolidated(root / "blt_1b", train_args(args, threshold=threshold), blt_t)
    write_consolidated(root / "entropy_model", train_args(None, threshold=threshold,
                                                          entropy_args=ent_args), ent_t)
    entropy_dir = None  # found beside
  blt = BLT.load(path, entropy_dir=entropy_dir)
  return dict(model=model, blt=blt, tokens=tokens, path=path, entropy_dir=entropy_dir,
              args=args, root=root)


def test_entropy_model_matches(case):
  with torch.no_grad():
    ent, _, _ = case["model"].model.patcher(torch.tensor(case["tokens"]))
  np.testing.assert_allclose(case["blt"].entropies(case["tokens"]), ent.numpy(), atol=1e-4)


def test_patch_boundaries_match(case):
  model, blt, tokens = case["model"], case["blt"], case["tokens"]
  assert blt.patching_config.threshold == pytest.approx(model.config.patching_threshold)
  ours = blt.patch_lengths(tokens)
  n = tokens.shape[1]
  for row in range(tokens.shape[0]):  # the port's sentinel is only right one row at a time
    with torch.no_grad():
      _, theirs, _ = model.model.patcher(torch.tensor(tokens[row:row + 1]), patch_size=4,
                                         threshold=model.config.patching_threshold)
    assert (patching.patch_start_positions(ours[row:row + 1], n)
            == patching.patch_start_positions(theirs.numpy(), n))
  sizes = ours[ours > 0]
  assert sizes.max() > 1 and sizes.min() == 1


def test_logits_match_for_the_same_patch_lengths(case):
  model, blt, tokens = case["model"], case["blt"], case["tokens"]
  lengths = blt.patch_lengths(tokens)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(tokens), patch_lengths=torch.tensor(lengths),
                   use_cache=False).logits.numpy()
  np.testing.assert_allclose(blt.logits(tokens, lengths), theirs, atol=1e-4, rtol=0)


def test_logits_match_when_each_side_patches_itself(case):
  row = case["tokens"][:1]
  with torch.no_grad():
    theirs = case["model"](input_ids=torch.tensor(row), use_cache=False).logits.numpy()
  np.testing.assert_allclose(case["blt"].logits(row), theirs, atol=1e-4, rtol=0)


def test_translated_settings(case):
  blt = case["blt"]
  assert blt.max_context == 1024  # max_encoder_seq_length (bytes)
  window = CASES["hub"]["window"] if case["entropy_dir"] else CASES["consolidated"]["window"]
  assert blt.config.encoder.attn_window == blt.config.decoder.attn_window == window
  assert blt.entropy_config.transformer.attn_window == (6 if case["entropy_dir"] else 512)
  assert blt.config.latent.rope_theta == case["args"]["rope_theta"]


# -- Orbax conversion ------------------------------------------------------------------------------


def _convert(*flags):
  return subprocess.run([sys.executable, "-m", "bltjax.convert", *flags], capture_output=True,
                        text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  tokens = _tokens(7)
  root = tmp_path_factory.mktemp("hubcase")
  model, args, ent_args, blt_t, ent_t = make_case(calib_tokens=tokens, **CASES["hub"])
  train = train_args(args, threshold=model.config.patching_threshold)
  return dict(path=write_hub(root / "blt", args, blt_t, train), args=args, train=train,
              entropy=write_hub(root / "entropy", ent_args, ent_t), ent_args=ent_args,
              tokens=tokens, root=root, model=model)


def test_convert_cli_writes_the_same_model(hub, tmp_path):
  out = str(tmp_path / "orbax")
  r = _convert(f"--meta_dir={hub['path']}", f"--entropy_dir={hub['entropy']}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  got = BLT.load(out)
  assert got.patching_config.threshold == pytest.approx(hub["model"].config.patching_threshold)
  assert got.max_context == 1024
  with torch.no_grad():  # the transformers peer's logits, each side patching itself
    theirs = hub["model"](input_ids=torch.tensor(hub["tokens"][:1]), use_cache=False).logits
  np.testing.assert_allclose(got.logits(hub["tokens"][:1]), theirs.numpy(), atol=1e-4, rtol=0)


def test_convert_cli_needs_exactly_one_source(hub, tmp_path):
  r = _convert(f"--meta_dir={hub['path']}", f"--hf_dir={hub['path']}", f"--out={tmp_path}/o")
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1] == "error: pass exactly one of --hf_dir and --meta_dir"


# -- config translation ----------------------------------------------------------------------------


def _variant(hub, tmp_path, name, *, args=None, train=None, with_entropy=False):
  """A hub dir with edited JSON and the same tensors (symlinked)."""
  d = tmp_path / name
  d.mkdir()
  os.symlink(os.path.join(hub["path"], "model.safetensors"), d / "model.safetensors")
  (d / "config.json").write_text(json.dumps({"args": hub["args"] if args is None else args}))
  (d / "train_args.json").write_text(json.dumps(hub["train"] if train is None else train))
  if with_entropy:
    shutil.copytree(hub["entropy"], d / "entropy_model")
  return str(d)


def test_every_meta_field_is_classified():
  used = {"vocab_size", "dim_token", "dim_global", "dim_local_decoder", "dim_local_encoder",
          "n_layers_global", "n_layers_local_decoder", "n_layers_local_encoder",
          "max_encoder_seq_length", "cross_attn_k", "cross_attn_nheads",
          "cross_attn_all_layers_decoder", "cross_attn_all_layers_encoder",
          "encoder_hash_byte_group_size", "encoder_hash_byte_group_vocab",
          "encoder_hash_byte_group_nb_functions", "n_heads_global", "n_heads_local_decoder",
          "n_heads_local_encoder", "n_kv_heads", "n_kv_heads_global", "local_attention_window_len",
          "head_dim", "ffn_dim_multiplier", "multiple_of", "norm_eps", "rope_theta",
          "patching_mode", "attn_bias_type", "attn_impl"}
  classified = used | set(meta_config._BLT_REQUIRED) | meta_config._BLT_IGNORED
  assert classified == set(meta_config.BLT_DEFAULTS)


def test_stripped_config_takes_metas_defaults(hub, tmp_path):
  defaults = meta_config.BLT_DEFAULTS
  stripped = {k: v for k, v in hub["args"].items() if k not in defaults or v != defaults[k]}
  assert len(stripped) < len(hub["args"]) - 3  # eos_id, share_encoder_decoder_emb, ...
  full = BLT.from_meta(hub["path"], hub["entropy"])
  blt = BLT.from_meta(_variant(hub, tmp_path, "s", args=stripped), hub["entropy"])
  assert blt.config == full.config  # same architecture, same tensors: the same model
  assert (blt.patching_config, blt.max_context) == (full.patching_config, full.max_context)
  # Meta's own defaults, spelt out: rope 10000, eps 1e-5, llama FFN rule with 256 and 1.0,
  # 30000-row tables, 3 hash functions.
  minimal = {k: v for k, v in hub["args"].items() if k not in (
      "rope_theta", "norm_eps", "multiple_of", "ffn_dim_multiplier",
      "encoder_hash_byte_group_vocab", "encoder_hash_byte_group_nb_functions")}
  cfg, _ = meta_config.blt_config(minimal, "config.json", RUNTIME)
  assert (cfg.latent.rope_theta, cfg.encoder.norm_eps) == (10000.0, 1e-5)
  assert (cfg.encoder.ffn_dim, cfg.latent.ffn_dim) == (256, 256)  # dims 32, 48
  assert (cfg.hash_vocab, cfg.hash_functions) == (30000, 3)
  p = meta_config.patching_config({}, "train_args.json")
  assert (p.mode, p.threshold, p.monotonic, p.max_patch_length) == ("entropy",
                                                                     1.335442066192627, False,
                                                                     None)


def test_patcher_args(hub):
  pa = dict(hub["train"]["data"]["patcher_args"], threshold_add=0.2, monotonicity=True,
            max_patch_length=6, patching_batch_size=32, realtime_patching=False, device="cpu")
  p = meta_config.patching_config(pa, "w")
  assert (p.threshold_add, p.monotonic, p.max_patch_length) == (0.2, True, 6)
  assert meta_config.patching_config(dict(patching_mode="static", patch_size=6.0), "w") \
      .patch_size == 6
  # No threshold of its own: the entropy model's (as the transformers converter reads it).
  assert meta_config.patching_config({}, "w", fallback_threshold=0.7).threshold == 0.7
  assert meta_config.patching_config({"threshold": 0.3}, "w", fallback_threshold=0.7) \
      .threshold == 0.3
  with pytest.raises(ValueError, match=r"w: data.patcher_args.patching_mode='bpe' is not"):
    meta_config.patching_config({"patching_mode": "bpe"}, "w")
  with pytest.raises(ValueError, match=r"patch_size=4.5 is not supported"):
    meta_config.patching_config({"patching_mode": "static"}, "w")


def test_threshold_falls_back_to_the_entropy_models_params(case, tmp_path):
  if case["entropy_dir"]:
    pytest.skip("consolidated only")
  edits = {"blt_1b": lambda pa: pa.pop("threshold"),
           "entropy_model": lambda pa: pa.update(threshold=0.625)}
  for name, edit in edits.items():
    src, dst = case["root"] / name, tmp_path / name
    dst.mkdir()
    os.symlink(src / "consolidated.pth", dst / "consolidated.pth")
    params = json.loads((src / "params.json").read_text())
    edit(params["data"]["patcher_args"])
    (dst / "params.json").write_text(json.dumps(params))
  assert BLT.from_meta(str(tmp_path / "blt_1b")).patching_config.threshold == 0.625


def _hub_tensors(directory):
  from safetensors.numpy import load_file
  return load_file(os.path.join(directory, "model.safetensors"))


UNSUPPORTED = {
    "cross_attn_encoder": False, "cross_attn_decoder": False, "downsampling_by_pooling": "avg",
    "cross_attn_init_by_pooling": False, "use_rope": False, "encoder_enable_byte_ngrams": True,
    "ngram_vocab_sizes": 1000, "dim_token": 16, "dim_local_decoder": 64,
    "use_local_encoder_transformer": False, "cross_attn_window_encoder": 512,
    "cross_attn_window_decoder": 512, "attn_bias_type": "local_causal", "attn_impl": "cuda",
    "head_dim": 8, "share_encoder_decoder_emb": False, "pm_size": 4, "cross_attn_k": None,
    "local_attention_window_len": None, "patching_mode": "",
}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_unsupported_field_is_named(hub, tmp_path, field):
  value = UNSUPPORTED[field]
  bad = _variant(hub, tmp_path, "u", args=dict(hub["args"], **{field: value}))
  with pytest.raises(ValueError) as e:
    BLT.from_meta(bad, hub["entropy"])
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(os.path.join(bad, "config.json") + ": ")
  assert f"{field}={value!r} is not supported" in msg


def test_causal_latent_loads_with_a_warning(hub, tmp_path, caplog):
  """attn_bias_type='causal' agrees with our block-causal latent on inputs without EOS inside;
  attn_impl picks Meta's kernel, not the model."""
  ok = _variant(hub, tmp_path, "c", args=dict(hub["args"], attn_bias_type="causal",
                                               attn_impl="sdpa"))
  with caplog.at_level(logging.WARNING):
    blt = BLT.from_meta(ok, hub["entropy"])
  assert "attn_bias_type='causal'" in caplog.text and "attn_impl='sdpa'" in caplog.text
  assert blt.config == BLT.from_meta(hub["path"], hub["entropy"]).config


def test_unknown_fields_are_named(hub, tmp_path):
  bad = _variant(hub, tmp_path, "x", args=dict(hub["args"], bogus_flag=1))
  with pytest.raises(ValueError, match=r"config\.json: unknown ByteLatentTransformerArgs "
                     r"field\(s\) \['bogus_flag'\]"):
    BLT.from_meta(bad, hub["entropy"])
  ent = tmp_path / "ent"
  shutil.copytree(hub["entropy"], ent)
  (ent / "config.json").write_text(json.dumps({"args": dict(hub["ent_args"], other=2)}))
  with pytest.raises(ValueError, match=r"unknown LMTransformerArgs field\(s\) \['other'\]"):
    BLT.from_meta(hub["path"], str(ent))
  (ent / "config.json").write_text(json.dumps({"args": dict(hub["ent_args"], sliding_window=None)}))
  with pytest.raises(ValueError, match=r"sliding_window=None is not supported"):
    BLT.from_meta(hub["path"], str(ent))


def test_blt_and_entropy_dirs_swapped(hub):
  with pytest.raises(ValueError, match=r"config\.json: holds an entropy model .*entropy_dir"):
    BLT.from_meta(hub["entropy"])
  with pytest.raises(ValueError, match=r"config\.json: holds a BLT"):
    BLT.from_meta(hub["path"], hub["path"])


def test_missing_entropy_model(hub, tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    BLT.load(hub["path"])
  assert str(e.value).startswith(hub["path"]) and "entropy_dir" in str(e.value)
  # Found without help inside the dir (facebook/blt-1b ships entropy_model/).
  inside = _variant(hub, tmp_path, "i", with_entropy=True)
  assert BLT.load(inside).entropy_config is not None


def test_tensor_problems_are_named(hub, tmp_path):
  # FFN width from multiple_of: the tensor that disagrees is named.
  bad = _variant(hub, tmp_path, "f", args=dict(hub["args"], multiple_of=64))
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor "
                     r"local_encoder\.layers\.0\.feed_forward\.w1\.weight.* has shape"):
    BLT.from_meta(bad, hub["entropy"])
  tensors = _hub_tensors(hub["path"])
  tensors["local_encoder.bogus.weight"] = np.zeros(3, np.float32)
  del tensors["encoder_hash_tok_embedding.1.weight"]
  d = write_hub(tmp_path / "t", hub["args"], tensors, hub["train"])
  with pytest.raises(ValueError, match=r"model\.safetensors: tensors do not match the model "
                     r"args: missing tensor.*encoder_hash_tok_embedding\.1\.weight.*"
                     r"unexpected tensor.*local_encoder\.bogus\.weight"):
    BLT.from_meta(d, hub["entropy"])


def test_pth_without_torch(case, monkeypatch):
  if case["entropy_dir"]:
    pytest.skip("hub format needs no torch")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(errors.Error) as e:
    BLT.load(case["path"])
  msg = str(e.value)
  assert "\n" not in msg and 'consolidated.pth: reading a .pth checkpoint needs torch: pip ' \
      'install "bltjax[pth]"' in msg


def test_consolidated_entropy_dir_is_not_a_blt(case):
  if case["entropy_dir"]:
    pytest.skip("consolidated only")
  with pytest.raises(ValueError, match=r"params\.json: holds no BLT under 'model'"):
    BLT.from_meta(str(case["root"] / "entropy_model"))
