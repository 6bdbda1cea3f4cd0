"""Stored per-byte entropies (written by `python -m bltjax.preprocess`), read back as batches.

The entropy model runs once, offline; training cuts patches from the stored entropies with
whatever threshold / monotonic / threshold_add / max_patch_length / max_patches its config says
(`patching.cut_rows`, in `bltjax.train.patcher`), with no entropy model loaded.

The on-disk format (DIR/manifest.json, DIR/SPLIT/shard-SSSSS-of-TTTTT.arrayrecord and .done
markers, the fixed-size record, the manifest keys, gs:// handling) is specified in
docs/file-formats.md.
"""

import hashlib
import json
import logging
import os

import grain
import numpy as np
from etils import epath

from bltjax.data import flag_table
from bltjax.data import shards as shards_lib
from bltjax.runtime import storage

FORMAT, VERSION = "bltjax.preprocessed", 2
ENTROPY_DTYPES = ("float16", "float32")
MANIFEST = "manifest.json"
_COUNTS = len(flag_table.FLAGS)  # doc_flag_counts per row
# Manifest fields that determine the bytes on disk (the entropy model enters by its sha256).
IDENTITY = ("format", "version", "seq_len", "shards", "rows_per_shard", "entropy_dtype", "data")


# -- names and small files -------------------------------------------------------------------------


def split_key(split: str, source: str | None = None) -> str:
  """The stored split of `split` rows (of one mixture component when `source` names it)."""
  return split if source is None else f"{split}_by_source/{source}"


def shard_name(s: int, shards: int) -> str:
  return f"shard-{s:05d}-of-{shards:05d}"


def shard_path(directory, split: str, s: int, shards: int) -> epath.Path:
  return epath.Path(directory) / split / f"{shard_name(s, shards)}.arrayrecord"


def marker_path(directory, split: str, s: int, shards: int) -> epath.Path:
  return epath.Path(directory) / split / f"{shard_name(s, shards)}.done"


def write_json(path: epath.Path, obj: dict):
  """Readers never see a partial file: rename on local disks; GCS objects appear whole."""
  text = json.dumps(obj, indent=2, sort_keys=True)
  if storage.is_remote(path):
    path.write_text(text)
  else:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)


def read_json(path: epath.Path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def fingerprint(manifest: dict) -> str:
  ident = {k: manifest[k] for k in IDENTITY}
  ident["entropy_sha256"] = manifest["entropy_model"]["sha256"]
  return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def data_identity(config) -> dict:
  """The data config fields that, with seq_len and the shard count, determine the rows."""
  d = config.data
  mixture = [dict(m) for m in (d.get("mixture") or ())]
  return dict(source=d.source, paths=[str(p) for p in (d.paths or ())], text_field=d.text_field,
              eval_fraction=float(d.eval_fraction), seed=int(config.seed),
              mixture=[dict(m, paths=[str(p) for p in m.get("paths", ())]) for m in mixture],
              shuffle_window=d.get("shuffle_window"),
              max_document_bytes=shards_lib.max_document_bytes(d))


def read_manifest(directory) -> dict:
  """The manifest of a preprocessed directory (plus "directory": where it was read from)."""
  if storage.is_remote(directory):
    storage.check_access(directory)  # one clear line for a missing bucket or credentials
  manifest = read_json(epath.Path(directory) / MANIFEST)
  if manifest is None:
    raise FileNotFoundError(f"{directory}: no {MANIFEST}; write it with python -m "
                            "bltjax.preprocess --config=... --out=DIR")
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    old = (" (version 1 rows hold 4 document counts, not malformed/oversized apart, and long "
           "documents uncut)" if manifest.get("version") == 1 else "")
    raise ValueError(f"{directory}/{MANIFEST}: format {manifest.get('format')!r} version "
                     f"{manifest.get('version')}, this bltjax reads {FORMAT!r} version {VERSION}"
                     f"{old}: re-run python -m bltjax.preprocess into another --out")
  return dict(manifest, directory=str(directory))


def missing_shards(directory, manifest: dict) -> list[str]:
  """Shards of `manifest` without a completion marker (one listing per split: cheap on GCS;
  preprocess refuses to mix runs, so a marker's presence is enough here)."""
  missing = []
  for split, rows in manifest["rows_per_shard"].items():
    if not rows:
      continue
    folder = epath.Path(directory) / split
    done = {p.name for p in folder.glob("*.done")} if folder.exists() else set()
    missing += [f"{split}/{shard_name(s, manifest['shards'])}" for s in range(manifest["shards"])
                if marker_path(directory, split, s, manifest["shards"]).name not in done]
  return missing


# -- records ---------------------------------------------------------------------------------------


def record_bytes(seq_len: int, entropy_dtype: str) -> int:
  return 4 * _COUNTS + np.dtype(entropy_dtype).itemsize * seq_len + 2 * (seq_len + 1) + \
      (seq_len + 7) // 8


def encode_rows(tokens, targets, mask, doc_flag_counts, entropies, entropy_dtype: str):
  """Rows ([B, N] arrays, flag counts [B, len(flag_table.NAMES)]) -> uint8 [B, record_bytes]
  (one record per row)."""
  r, n = tokens.shape
  if not np.array_equal(tokens[:, 1:], targets[:, :-1]):
    raise ValueError("rows are not packed windows (targets are not the tokens shifted by one)")
  if np.shape(doc_flag_counts) != (r, _COUNTS):
    raise ValueError(f"doc_flag_counts of shape {np.shape(doc_flag_counts)}, expected "
                     f"{(r, _COUNTS)} (one count per bltjax.data.flag_table.FLAGS)")
  window = np.concatenate([tokens, targets[:, -1:]], axis=1)
  if window.min() < 0 or window.max() > np.iinfo(np.uint16).max:
    raise ValueError(f"token ids outside uint16: [{window.min()}, {window.max()}]")
  parts = [np.asarray(doc_flag_counts, "<i4"), np.asarray(entropies, np.dtype(entropy_dtype)
                                                           .newbyteorder("<")),
           window.astype("<u2"), np.packbits(np.asarray(mask) > 0, axis=1)]
  return np.concatenate([p.reshape(r, -1).view(np.uint8) for p in parts], axis=1)


def decode_rows(records, seq_len: int, entropy_dtype: str) -> dict:
  """uint8 [B, record_bytes] -> the batch keys (tokens/targets int32, mask/entropies f32)."""
  n, b = seq_len, records.shape[0]
  sizes = [4 * _COUNTS, np.dtype(entropy_dtype).itemsize * n, 2 * (n + 1), (n + 7) // 8]
  ends = np.cumsum(sizes)
  field = lambda i: np.ascontiguousarray(records[:, ends[i] - sizes[i]:ends[i]])
  window = field(2).view("<u2").astype(np.int32)
  return dict(
      tokens=window[:, :-1], targets=window[:, 1:],
      mask=np.unpackbits(field(3), axis=1, count=n).astype(np.float32),
      doc_flag_counts=field(0).view("<i4").reshape(b, _COUNTS).astype(np.int32),
      entropies=field(1).view(np.dtype(entropy_dtype).newbyteorder("<")).astype(np.float32))


class _Record(grain.transforms.MapWithIndex):
  """bytes -> uint8 [record_bytes]; warns (once per process) when the stored rows run out."""

  def __init__(self, where: str, rows: int, size: int):
    self.where, self.rows, self.size, self.warned = where, rows, size, False

  def map_with_index(self, index, record):
    if len(record) != self.size:
      raise ValueError(f"{self.where}: a record of {len(record)} bytes, the manifest says "
                       f"{self.size}: the file is corrupt; delete it and its .done marker and "
                       "re-run python -m bltjax.preprocess")
    if index >= self.rows and not self.warned:
      self.warned = True
      logging.warning("%s: the %d stored rows are used up: repeating them from the first (write "
                      "more with a larger train.steps)", self.where, self.rows)
    return np.frombuffer(record, np.uint8)


class _Decode(grain.transforms.Map):
  def __init__(self, seq_len: int, entropy_dtype: str):
    self.seq_len, self.entropy_dtype = seq_len, entropy_dtype

  def map(self, records):
    return decode_rows(records, self.seq_len, self.entropy_dtype)


# -- checks ----------------------------------------------------------------------------------------


def check(manifest: dict, config, *, process_count: int | None = None):
  """Fails naming the problem if `config` cannot train on these rows. `process_count` checks the
  data shards when data.shards is 0 (one per process). The entropy model is checked where it is
  loaded (`check_entropy_model`, by bltjax.train.patcher)."""
  where = _where(manifest)
  if manifest["seq_len"] != config.data.seq_len:
    raise ValueError(f"{where} was written with data.seq_len={manifest['seq_len']}, this run has "
                     f"data.seq_len={config.data.seq_len}: {_AGAIN}")
  shards = config.data.shards or process_count
  if shards is not None and shards != manifest["shards"]:
    raise ValueError(f"{where} holds {manifest['shards']} data shards, this run reads "
                     f"{shards} (data.shards={config.data.shards}, 0 = one per process, "
                     f"{process_count} processes): set --config.data.shards="
                     f"{manifest['shards']} (any process count dividing it works)")
  have = data_identity(config)
  differ = {k: (manifest["data"].get(k), v) for k, v in have.items()
            if manifest["data"].get(k) != v}
  if differ:
    logging.warning("%s was written from other data settings (stored, this config): %s; training "
                    "reads the stored rows", where, differ)


def check_entropy_model(manifest: dict, checkpoint: str, sha256: str, step: int):
  """Fails if the entropies were not computed by the entropy model at `checkpoint` (the sha256
  of its params, at `step`), which this run names as patching.entropy_model_checkpoint."""
  stored = manifest["entropy_model"]
  if sha256 != stored["sha256"]:
    raise ValueError(f"{_where(manifest)} holds the entropies of entropy model {stored['path']} "
                     f"(step {stored['step']}, sha256 {stored['sha256'][:12]}), but this run "
                     f"names entropy model {checkpoint} (step {step}) with sha256 {sha256[:12]}: "
                     f"{_AGAIN}, or unset patching.entropy_model_checkpoint")


def _where(manifest: dict) -> str:
  return f"data.preprocessed_dir={manifest.get('directory', '?')}"


_AGAIN = "re-run python -m bltjax.preprocess with this config into another --out"


# -- reading ---------------------------------------------------------------------------------------


def _shard_rows(directory, manifest: dict, split: str, s: int):
  """The ArrayRecord source of one shard, its row count checked against the manifest."""
  path = shard_path(directory, split, s, manifest["shards"])
  if storage.is_remote(path) and os.environ.get("STORAGE_EMULATOR_HOST"):
    # array_record's own GCS client finds an emulator under another name.
    os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", os.environ["STORAGE_EMULATOR_HOST"])
  src = grain.sources.ArrayRecordDataSource([str(path)])
  if len(src) != manifest["rows_per_shard"][split]:
    raise ValueError(f"{path}: {len(src)} rows, the manifest says "
                     f"{manifest['rows_per_shard'][split]}: delete it and its .done marker and "
                     "re-run python -m bltjax.preprocess")
  return src, str(path)


def _open(config, split: str, process_count: int | None):
  directory = config.data.preprocessed_dir
  manifest = read_manifest(directory)
  check(manifest, config, process_count=process_count)
  missing = missing_shards(directory, manifest)
  if missing:
    raise ValueError(f"data.preprocessed_dir={directory} is incomplete: {len(missing)} shard(s) "
                     f"unfinished ({', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}"
                     "): re-run the same python -m bltjax.preprocess command to finish them")
  if not manifest["rows_per_shard"].get(split):
    raise ValueError(f"data.preprocessed_dir={directory} holds no {split} rows (stored: "
                     f"{manifest['rows_per_shard']}, train.eval_batches="
                     f"{manifest['train']['eval_batches']})")
  return directory, manifest


def batches(config, split, *, local_batch_size, process_index, process_count, source=None):
  """IterDataset of this process's local batches: tokens, targets int32 [B, N], mask f32 [B, N],
  doc_flag_counts int32 [B, len(flag_table.NAMES)], entropies f32 [B, N]; the online pipeline's
  batches row for row.

  This process reads `shards.data_shards(config.data, ...)`, each shard's rows in order,
  local_batch_size / len(shards) rows per shard per batch, concatenated in shard order. After the
  stored rows the shard repeats from its first row (logged once). Checkpointable (grain state).
  `source`: one data.mixture component's rows (its per-source evaluation split).
  """
  steps = config.train.steps if split == "train" else config.train.eval_batches
  split = split_key(split, source)
  directory, manifest = _open(config, split, process_count)
  shards = shards_lib.data_shards(config.data, process_index, process_count)
  if local_batch_size % len(shards):
    raise ValueError(f"the local batch of {local_batch_size} rows does not split over this "
                     f"process's {len(shards)} data shards")
  per = local_batch_size // len(shards)
  rows = manifest["rows_per_shard"][split]
  needed = steps * per
  if needed > rows:
    logging.warning("data.preprocessed_dir=%s: this run reads %d %s rows per shard, %d are stored "
                    "(rows repeat after that)", directory, needed, split, rows)
  n, dtype = manifest["seq_len"], manifest["entropy_dtype"]
  size = record_bytes(n, dtype)
  if manifest["record_bytes"] != size:
    raise ValueError(f"{directory}: records of {manifest['record_bytes']} bytes, expected {size}")
  d = config.data
  parts = []
  for s in shards:
    src, where = _shard_rows(directory, manifest, split, s)
    ds = (grain.MapDataset.source(src).repeat().map_with_index(_Record(where, rows, size))
          .batch(per, drop_remainder=True).map(_Decode(n, dtype)))
    parts.append(ds.to_iter_dataset(grain.ReadOptions(num_threads=d.read_threads,
                                                      prefetch_buffer_size=d.read_buffer)))
  return parts[0] if len(parts) == 1 else shards_lib.ConcatBatches(parts)


def sample_entropies(config, rows: int) -> np.ndarray:
  """float32 [rows, N]: the first stored rows of the eval split (train without eval rows), shard
  0 first, for threshold calibration. Fewer if fewer are stored (logged)."""
  directory, manifest = _open(config, "train", None)
  split = "eval" if manifest["rows_per_shard"]["eval"] else "train"
  n, dtype = manifest["seq_len"], manifest["entropy_dtype"]
  out = []
  for s in range(manifest["shards"]):
    src, _ = _shard_rows(directory, manifest, split, s)
    take = min(rows - len(out), len(src))
    out += [np.frombuffer(src[i], np.uint8) for i in range(take)]
    if len(out) == rows:
      break
  if len(out) < rows:
    logging.warning("%s: %d %s rows for calibration, %d asked", directory, len(out), split, rows)
  return decode_rows(np.stack(out), n, dtype)["entropies"]
