"""Meta's released BLT checkpoints (facebookresearch/blt), in the two forms Meta publishes them.

- Hub format (facebook/blt-1b, facebook/blt-7b, facebook/blt-entropy): what
  `PyTorchModelHubMixin.save_pretrained` writes: `config.json` = {"args": <model args>},
  `model.safetensors` with Meta's state-dict names, and for a BLT `train_args.json` (the training
  params.json: patcher args under data.patcher_args). facebook/blt-1b/7b also hold
  `entropy_model/` in the consolidated format.
- Consolidated format (the facebook/blt repo: blt_1b/, blt_7b/, entropy_model/): `params.json`
  (full TrainArgs: BLT args under "model", entropy args under "entropy_model") + `consolidated.pth`
  (a torch pickle {"model": state_dict}; torch is needed only here: pip install "bltjax[pth]").

Configs are translated by `bltjax.interop.meta_config`; tensors go through the
`bltjax.interop.hf` key maps with the HF names renamed to Meta's. Paths may be local or gs://.
"""

import json
import os

import numpy as np
from absl import logging
from etils import epath

from bltjax.interop import hf, meta_config
from bltjax.model.config import RuntimeConfig
from bltjax.runtime import errors, storage

_HUB, _CONSOLIDATED = "hub", "consolidated"
PTH = "consolidated.pth"

# HF port name component -> Meta's (the transformers converter's renames, inverted).
_RENAME = {"self_attn": "attention", "mlp": "feed_forward", "input_layernorm": "attention_norm",
           "post_attention_layernorm": "ffn_norm", "embed_tokens": "tok_embeddings",
           "q_norm": "cross_attn_norm_q", "k_norm": "cross_attn_norm_kv", "gate_proj": "w1",
           "down_proj": "w2", "up_proj": "w3", "q_proj": "wq", "k_proj": "wk", "v_proj": "wv",
           "o_proj": "wo", "lm_head": "output"}
_HASH = "model.encoder_hash_tok_embedding.weight"


def _meta_name(hf_name: str, blt: bool = True) -> str:
  if blt and hf_name == "lm_head.weight":
    return "local_decoder.output.weight"  # the BLT's head lives in the local decoder
  parts = hf_name.removeprefix("model.").split(".")
  return ".".join(_RENAME.get(p, p) for p in parts)


def _rename(key_map, num_hash_tables: int = 0, blt: bool = True) -> list:
  out = []
  for path, names, transpose in key_map:
    if names == _HASH:  # Meta keeps one table per (function, n-gram size): stacked, then fused
      out.append((path, [f"encoder_hash_tok_embedding.{i}.weight"
                         for i in range(num_hash_tables)], transpose))
    elif isinstance(names, str):
      out.append((path, _meta_name(names, blt), transpose))
    else:
      out.append((path, [_meta_name(n, blt) for n in names], transpose))
  return out


def blt_key_map(cfg) -> list:
  """(our param path, Meta name or per-layer/per-table names, transpose) for every BLT tensor."""
  return _rename(hf.blt_key_map(cfg), cfg.num_hash_tables)


def entropy_key_map(cfg) -> list:
  return _rename(hf.entropy_key_map(cfg, prefix=""), blt=False)


# ------------------------------------------------------------------------------------------------
# Files.


def _read_json(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def _pth(root: epath.Path) -> epath.Path | None:
  """Meta's Patcher looks in consolidated/ first, then beside params.json."""
  for p in (root / "consolidated" / PTH, root / PTH):
    if p.exists():
      return p
  return None


def meta_format(path) -> str | None:
  """'hub', 'consolidated' or None (not a Meta checkpoint directory)."""
  root = epath.Path(path)
  config = root / "config.json"
  if config.exists():
    try:
      cfg = json.loads(config.read_text())
    except json.JSONDecodeError:
      return None
    if isinstance(cfg, dict) and isinstance(cfg.get("args"), dict) and "model_type" not in cfg:
      return _HUB
  if (root / "params.json").exists() and _pth(root) is not None:
    return _CONSOLIDATED
  return None


def is_meta_dir(path) -> bool:
  return meta_format(path) is not None


class PthReader:
  """The state dict of a consolidated.pth ({"model": state_dict}); tensors converted on get()."""

  def __init__(self, path: epath.Path):
    try:
      import torch
    except ImportError:
      raise errors.Error(f'{path}: reading a .pth checkpoint needs torch: pip install '
                         '"bltjax[pth]"') from None
    self.path = os.fspath(path)
    if storage.is_remote(self.path):
      with path.open("rb") as f:  # torch.load wants a seekable file object for remote paths
        obj = torch.load(f, map_location="cpu", weights_only=True)
    else:  # mmap: a 7B checkpoint is not copied into memory before conversion
      obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
      keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise ValueError(f"{self.path}: expected a dict with a 'model' state dict (Meta's "
                       f"consolidated format), found {keys}")
    self._state, self._torch = obj["model"], torch

  def names(self) -> set[str]:
    return set(self._state)

  def get(self, name: str) -> np.ndarray:
    t = self._state[name]
    if t.dtype == self._torch.bfloat16:  # numpy has no bfloat16
      t = t.float()
    return t.numpy()


class _Reader:
  """Either store, with the file name for messages."""

  def __init__(self, directory: epath.Path, fmt: str):
    if fmt == _HUB:
      self.inner, self.where = hf.SafetensorsReader(os.fspath(directory)), os.fspath(
          directory / "model.safetensors")
    else:
      pth = _pth(directory)
      if pth is None:
        raise FileNotFoundError(f"{directory}: no {PTH} (nor consolidated/{PTH})")
      self.inner, self.where = PthReader(pth), os.fspath(pth)

  def names(self):
    return self.inner.names()

  def get(self, name):
    return self.inner.get(name)


def _load(reader: _Reader, key_map, shapes: dict, *, strict: bool, dtype=np.float32) -> dict:
  """Checks names (all needed present; leftovers an error when `strict`) and loads."""
  wanted = hf.hf_names(key_map)
  extra = reader.names() - wanted
  if extra and not strict:
    # Meta loads entropy models with strict=False; we only refuse missing tensors.
    logging.warning("%s: ignoring unexpected tensor(s) %s", reader.where, sorted(extra)[:20])
    reader = _Filtered(reader, wanted)
  hf.check_tensor_names(reader, key_map, where=reader.where,
                        message="tensors do not match the model args")
  shapes = dict(shapes)
  hash_path = ("embed", "hash_embeddings", "embedding")
  fused = shapes.get(hash_path)
  hashed = [m for m in key_map if m[0] == hash_path]
  if hashed and fused is not None:
    n = len(hashed[0][1])
    shapes[hash_path] = (n, fused[0] // n, fused[1])  # per-table tensors, stacked
  params = hf.load_params(reader, key_map, shapes, where=reader.where, dtype=dtype)
  if hashed:
    table = params["embed"]["hash_embeddings"]["embedding"]
    params["embed"]["hash_embeddings"]["embedding"] = table.reshape(-1, table.shape[-1])
  return params


class _Filtered:
  def __init__(self, reader, keep):
    self.inner, self.keep, self.where = reader, keep, reader.where

  def names(self):
    return self.inner.names() & self.keep

  def get(self, name):
    return self.inner.get(name)


# ------------------------------------------------------------------------------------------------
# Loading.


def _train_args(root: epath.Path, fmt: str) -> tuple[dict, str]:
  path = root / ("train_args.json" if fmt == _HUB else "params.json")
  if not path.exists():
    return {}, os.fspath(path)
  args = _read_json(path)
  if not isinstance(args, dict):
    raise ValueError(f"{path}: expected a JSON object (Meta's TrainArgs)")
  return args, os.fspath(path)


def _kind(args: dict) -> str | None:
  """'entropy' / 'blt' when the field names can only be LMTransformerArgs / the BLT's."""
  keys = set(args)
  blt, lm = set(meta_config.BLT_DEFAULTS), set(meta_config.LM_DEFAULTS)
  if keys <= lm and keys - blt:
    return "entropy"
  if keys <= blt and keys - lm:
    return "blt"
  return None


def find_entropy_dir(root: epath.Path, fmt: str) -> epath.Path | None:
  """entropy_model/ inside (hub repos facebook/blt-1b/7b) or beside (the facebook/blt layout)."""
  inside, beside = root / "entropy_model", root.parent / "entropy_model"
  for cand in ((inside, beside) if fmt == _HUB else (beside, inside)):
    if cand.exists() and meta_format(cand) is not None:
      return cand
  return None


def _entropy_threshold(ent_root: epath.Path | None) -> float | None:
  """The threshold in the entropy model's own params.json (where the transformers converter
  reads it from) when the BLT's patcher args have none."""
  if ent_root is None or not (ent_root / "params.json").exists():
    return None
  pa = (_read_json(ent_root / "params.json").get("data") or {}).get("patcher_args") or {}
  return pa.get("threshold")


def load_entropy(path, runtime: RuntimeConfig, shapes_fn, dtype=np.float32):
  """(LMConfig, params) from a hub or consolidated entropy model directory."""
  root = epath.Path(path)
  fmt = meta_format(root)
  if fmt is None:
    raise FileNotFoundError(f"{path}: not a Meta entropy model directory (expected config.json "
                            f"with 'args' + model.safetensors, or params.json + {PTH})")
  if fmt == _HUB:
    where = os.fspath(root / "config.json")
    args = _read_json(root / "config.json")["args"]
    if _kind(args) == "blt":
      raise ValueError(f"{where}: holds a BLT (ByteLatentTransformerArgs), not an entropy model")
    cfg = meta_config.entropy_config_hub(args, where, runtime)
  else:
    where = os.fspath(root / "params.json")
    params = _read_json(root / "params.json")
    if not isinstance(params.get("entropy_model"), dict):
      raise ValueError(f"{where}: no 'entropy_model' section (not an entropy model checkpoint)")
    cfg = meta_config.entropy_config_consolidated(params["entropy_model"], where, runtime)
  reader = _Reader(root, fmt)
  return cfg, _load(reader, entropy_key_map(cfg), shapes_fn(cfg), strict=False, dtype=dtype)


def load(path, entropy_dir=None, *, dtype: str = "float32", blt_shapes, entropy_shapes) -> dict:
  """Everything `BLT(...)` takes, from a Meta BLT directory (hub or consolidated).

  `blt_shapes(BLTConfig)` / `entropy_shapes(LMConfig)` give {param path: shape}.
  Returns dict(model_cfg, params, patching_cfg, entropy_cfg, entropy_params, max_context).
  """
  root = epath.Path(path)
  fmt = meta_format(root)
  if fmt is None:
    raise FileNotFoundError(f"{path}: not a Meta BLT directory (expected config.json with "
                            f"'args' + model.safetensors, or params.json + {PTH})")
  runtime = RuntimeConfig.for_inference(dtype)
  train, train_where = _train_args(root, fmt)
  if fmt == _HUB:
    where = os.fspath(root / "config.json")
    args = _read_json(root / "config.json")["args"]
    if _kind(args) == "entropy":
      raise ValueError(f"{where}: holds an entropy model (LMTransformerArgs), not a BLT; pass "
                       "it as entropy_dir / --entropy_dir")
    if not train:
      logging.warning("%s: missing; patching with Meta's PatcherArgs defaults", train_where)
  else:
    where = train_where
    if train.get("train_entropy_model") or not isinstance(train.get("model"), dict):
      raise ValueError(f"{where}: holds no BLT under 'model' (an entropy model? pass it as "
                       "entropy_dir / --entropy_dir)")
    args = train["model"]
  model_cfg, max_context = meta_config.blt_config(args, where, runtime)
  data = train.get("data") or {}
  # Bytes per row: the local models' RoPE table, which Meta asserts equals the data's.
  max_context = int(max_context or data.get("max_encoder_seq_length") or 12288)

  ent_root = epath.Path(entropy_dir) if entropy_dir else find_entropy_dir(root, fmt)
  patcher_args = data.get("patcher_args")
  patching_cfg = meta_config.patching_config(
      patcher_args, train_where,
      fallback_threshold=_entropy_threshold(ent_root) if ent_root is not None else None)
  logging.info("%s: patching %s", train_where, patching_cfg)

  entropy_cfg = entropy_params = None
  if patching_cfg.mode == "entropy":
    if ent_root is None:
      raise FileNotFoundError(
          f"{path}: entropy patching is configured but no entropy model was found "
          "(no entropy_model/ inside or beside it); pass "
          "entropy_dir / --entropy_dir")
    storage.check_access(os.fspath(ent_root))
    entropy_cfg, entropy_params = load_entropy(ent_root, runtime, entropy_shapes)
  elif entropy_dir:
    logging.warning("%s: patching mode %r needs no entropy model; ignoring %s", path,
                    patching_cfg.mode, entropy_dir)
  params = _load(_Reader(root, fmt), blt_key_map(model_cfg), blt_shapes(model_cfg), strict=True)
  logging.info("Loaded Meta %s-format BLT from %s", fmt, path)
  return dict(model_cfg=model_cfg, params=params, patching_cfg=patching_cfg,
              entropy_cfg=entropy_cfg, entropy_params=entropy_params, max_context=max_context)
