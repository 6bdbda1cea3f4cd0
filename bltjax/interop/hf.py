"""Hugging Face `transformers` BLT checkpoints (`config.json` + `model.safetensors`) <-> bltjax.

The format is the one `BltForCausalLM.save_pretrained` writes and the released BLT-1B/7B
conversions use. Reading needs neither torch nor transformers: tensors come from safetensors' numpy
API (bf16 tensors, which numpy cannot name, are read from the file's byte offsets via ml_dtypes).
Directories may be local or gs://: remote tensors are read by byte range from the file's header
offsets (safe_open needs a local file), and files are written through epath.

One table, `key_map`, lists every tensor: our parameter path, the HF name(s) (one per layer for
scanned stacks) and whether the matrix is transposed (PyTorch Linear weights are [out, in]).
The config.json side (the port's defaults, what it cannot express) is `bltjax.interop.hf_config`.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np
from etils import epath
from safetensors import safe_open

from bltjax.interop import hf_config
from bltjax.model.config import BLTConfig, LMConfig, PatchingConfig
from bltjax.runtime import storage

Path = tuple[str, ...]

_BLOCK = {  # our Block sub-path -> (HF sub-name, transpose)
    ("attention_norm", "scale"): ("input_layernorm.weight", False),
    ("attention", "wq", "kernel"): ("self_attn.q_proj.weight", True),
    ("attention", "wk", "kernel"): ("self_attn.k_proj.weight", True),
    ("attention", "wv", "kernel"): ("self_attn.v_proj.weight", True),
    ("attention", "wo", "kernel"): ("self_attn.o_proj.weight", True),
    ("ffn_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("feed_forward", "w1", "kernel"): ("mlp.gate_proj.weight", True),
    ("feed_forward", "w3", "kernel"): ("mlp.up_proj.weight", True),
    ("feed_forward", "w2", "kernel"): ("mlp.down_proj.weight", True),
}
_CROSS = {
    ("cross_attn_norm_q", "scale"): ("q_norm.weight", False),
    ("cross_attn_norm_kv", "scale"): ("k_norm.weight", False),  # shared by keys and values
    ("wq", "kernel"): ("q_proj.weight", True),
    ("wk", "kernel"): ("k_proj.weight", True),
    ("wv", "kernel"): ("v_proj.weight", True),
    ("wo", "kernel"): ("o_proj.weight", True),
}


def _stacked(ours: Path, hf_prefix: str, n: int, table) -> list:
  return [(ours + sub, [f"{hf_prefix}.{i}.{name}" for i in range(n)], t)
          for sub, (name, t) in table.items()]


def blt_key_map(cfg: BLTConfig) -> list[tuple[Path, str | list[str], bool]]:
  """(our param path, HF name or per-layer names, transpose) for every BLT tensor."""
  enc, lat, dec = cfg.encoder, cfg.latent, cfg.decoder
  m = [(("embed", "tok_embeddings", "embedding"), "model.local_encoder.embed_tokens.weight", False)]
  if cfg.num_hash_tables:
    m.append((("embed", "hash_embeddings", "embedding"),
              "model.encoder_hash_tok_embedding.weight", False))
  m += _stacked(("local_encoder", "stack", "layers"), "model.local_encoder.layers",
                enc.n_layers, _BLOCK)
  m.append((("local_encoder", "patch_embedding_projection", "kernel"),
            "model.local_encoder.patch_embedding_projection.weight", True))
  n_ca = enc.n_layers if cfg.cross_attn_all_layers_encoder else 1
  m += _stacked(("local_encoder", "cross_attn"), "model.local_encoder.cross_attn_layers", n_ca,
                _CROSS)
  if cfg.latent_input_dim != lat.dim:
    m.append((("latent", "token_embedding_projection", "kernel"),
              "model.global_transformer.token_embedding_projection.weight", True))
  m += _stacked(("latent", "stack", "layers"), "model.global_transformer.layers", lat.n_layers,
                _BLOCK)
  m.append((("local_decoder", "patch_embedding_projection", "kernel"),
            "model.local_decoder.patch_embedding_projection.weight", True))
  if cfg.cross_attn_all_layers_decoder:
    m += _stacked(("local_decoder", "layers", "cross_attn"),
                  "model.local_decoder.cross_attn_layers", dec.n_layers, _CROSS)
    m += _stacked(("local_decoder", "layers", "block"), "model.local_decoder.layers", dec.n_layers,
                  _BLOCK)
  else:
    m += [(("local_decoder", "cross_attn") + sub,
           f"model.local_decoder.cross_attn_layers.0.{name}", t)
          for sub, (name, t) in _CROSS.items()]
    m += _stacked(("local_decoder", "stack", "layers"), "model.local_decoder.layers", dec.n_layers,
                  _BLOCK)
  m.append((("local_decoder", "norm", "scale"), "model.local_decoder.norm.weight", False))
  m.append((("local_decoder", "output", "kernel"), "lm_head.weight", True))
  return m


def entropy_key_map(cfg: LMConfig, prefix: str = "model.patcher.") -> list:
  m = [(("tok_embeddings", "embedding"), prefix + "embed_tokens.weight", False)]
  m += _stacked(("stack", "layers"), prefix + "layers", cfg.transformer.n_layers, _BLOCK)
  m.append((("norm", "scale"), prefix + "norm.weight", False))
  m.append((("output", "kernel"), prefix + "lm_head.weight", True))
  return m


# ------------------------------------------------------------------------------------------------
# Reading.


class SafetensorsReader:
  """Lazy reader over `model.safetensors` or a sharded `model.safetensors.index.json`."""

  def __init__(self, directory: str):
    root = epath.Path(directory)
    index, single = root / "model.safetensors.index.json", root / "model.safetensors"
    self._headers: dict[str, tuple[int, dict]] = {}  # file -> (header length, header)
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      self.files = {k: os.fspath(root / v) for k, v in weight_map.items()}
    elif single.exists():
      self.files = {k: os.fspath(single) for k in self._header(os.fspath(single))[1]
                    if k != "__metadata__"}
    else:
      raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")

  def names(self) -> set[str]:
    return set(self.files)

  def _header(self, path: str) -> tuple[int, dict]:
    if path not in self._headers:
      with epath.Path(path).open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        self._headers[path] = header_len, json.loads(f.read(header_len))
    return self._headers[path]

  def get(self, name: str) -> np.ndarray:
    path = self.files[name]
    if storage.is_remote(path):
      return _read_raw(path, name, *self._header(path))
    with safe_open(path, framework="np") as f:
      try:
        return f.get_tensor(name)
      except TypeError:  # numpy has no bfloat16: read the raw bytes at the header's offsets.
        return _read_raw(path, name, *self._header(path))


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}


def _read_raw(path: str, name: str, header_len: int, header: dict) -> np.ndarray:
  """One tensor read by byte range (local or remote, any dtype in _DTYPES)."""
  entry = header[name]  # dtype, shape, data_offsets
  if entry["dtype"] not in _DTYPES:
    raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
  start, end = entry["data_offsets"]
  with epath.Path(path).open("rb") as f:
    f.seek(8 + header_len + start)
    buf = f.read(end - start)
  if len(buf) != end - start:
    raise ValueError(f"{path}: truncated file (tensor {name} needs bytes {start}..{end})")
  return np.frombuffer(buf, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])  # little-endian


def _set(tree: dict, path: Path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def hf_names(key_map) -> set[str]:
  return {n for _, names, _ in key_map for n in ([names] if isinstance(names, str) else names)}


def _listing(names) -> str:
  names = sorted(names)
  return str(names[:20]) + (f" (+{len(names) - 20} more)" if len(names) > 20 else "")


def check_tensor_names(reader, *key_maps, where: str, message: str = "checkpoint does not match "
                       "its config.json"):
  """Raises naming every tensor the config needs but the file lacks, and every one left over."""
  wanted = set().union(*(hf_names(m) for m in key_maps))
  missing, extra = wanted - reader.names(), reader.names() - wanted
  problems = ([f"missing tensor(s) {_listing(missing)}"] if missing else []) + (
      [f"unexpected tensor(s) {_listing(extra)}"] if extra else [])
  if problems:
    raise ValueError(f"{where}: {message}: " + "; ".join(problems))


def load_params(reader: SafetensorsReader, key_map, expected_shapes: dict, *, where: str,
                dtype=np.float32) -> dict:
  """Builds a nested param dict from HF tensors; names every misshaped tensor."""
  params: dict = {}
  for path, names, transpose in key_map:
    arrays = [reader.get(n) for n in ([names] if isinstance(names, str) else names)]
    arrays = [a.T if transpose else a for a in arrays]
    value = arrays[0] if isinstance(names, str) else np.stack(arrays)
    want = expected_shapes.get(path)
    if want is not None and tuple(value.shape) != tuple(want):
      shown = names if isinstance(names, str) else f"{names[0]} (x{len(names)} layers)"
      raise ValueError(f"{where}: tensor {shown} has shape {value.shape} after conversion but "
                       f"parameter {'/'.join(path)} needs {tuple(want)}")
    _set(params, path, np.asarray(value, dtype=dtype))
  return params


# ------------------------------------------------------------------------------------------------
# Writing (export).


def params_to_hf(params: dict, key_map, dtype=np.float32) -> dict[str, np.ndarray]:
  """Nested params -> {HF tensor name: array}, splitting scanned stacks into layers."""
  out = {}
  for path, names, transpose in key_map:
    value = np.asarray(_get(params, path))
    values = [value] if isinstance(names, str) else list(value)
    for name, v in zip([names] if isinstance(names, str) else names, values):
      out[name] = np.ascontiguousarray((v.T if transpose else v).astype(dtype))
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]):
  """`model.safetensors` with the metadata `transformers` expects; float32 or bfloat16 arrays
  (numpy cannot name bf16, so the file is written directly: 8-byte header length, JSON header,
  then the raw little-endian data in header order)."""
  names = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
           np.dtype(np.float16): "F16"}
  header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    if arr.dtype not in names:
      raise ValueError(f"tensor {name}: unsupported dtype {arr.dtype}")
    data = arr.tobytes()
    header[name] = dict(dtype=names[arr.dtype], shape=list(arr.shape),
                        data_offsets=[offset, offset + len(data)])
    offset += len(data)
    blobs.append(data)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
  with epath.Path(path).open("wb") as f:  # streamed: gcsfs uploads in chunks
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for data in blobs:
      f.write(data)


def save_hf(directory: str, model: BLTConfig, params, patching: PatchingConfig,
            entropy: LMConfig | None = None, entropy_params=None, *,
            dtype=np.float32, max_context: int | None = None):
  """Writes config.json + model.safetensors that `BltForCausalLM.from_pretrained` loads
  (`directory` local or gs://)."""
  storage.check_access(directory, write=True)
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  cfg = hf_config.config_to_hf(model, entropy, patching)
  cfg["torch_dtype"] = cfg["dtype"] = "bfloat16" if dtype == ml_dtypes.bfloat16 else "float32"
  if max_context is not None:
    cfg["encoder_config"]["max_position_embeddings"] = max_context
    cfg["decoder_config"]["max_position_embeddings"] = max_context
  tensors = params_to_hf(params, blt_key_map(model), dtype)
  if entropy is not None:
    tensors |= params_to_hf(entropy_params, entropy_key_map(entropy), dtype)
  write_safetensors(storage.join(directory, "model.safetensors"), tensors)
  (epath.Path(directory) / "config.json").write_text(json.dumps(cfg, indent=2))
