"""Loading and checking experiment configs (`experiments/*.py` files with `get_config(arg)`).

The checks a run makes before it starts all live here: `validate` (the config, both stages) and
`check_paths` (what must exist on disk, both stages).

A config is an `ml_collections.ConfigDict` with the sections below; every field is set and
commented in the experiment files, never defaulted here.

  seed, model_type ('blt' | 'entropy_model' | 'token_lm'), model, data, train, optim, mesh,
  patching and entropy_model (the stage-1 config) for BLT configs, tokenizer (path, train_bytes)
  for token_lm configs (the BPE baseline: bltjax.data.bpe; its data.seq_len counts tokens).
"""

import copy
import importlib.util
import math
import os
import re
import typing
from collections.abc import Mapping

import ml_collections

from bltjax.data import bpe, mixture as mixture_lib, paths as paths_lib, sources
from bltjax.data import shards as shards_lib
from bltjax.data.sources import SOURCES
from bltjax.model.config import BLTConfig, LMConfig, PatchingConfig
from bltjax.runtime import storage

MODEL_TYPES = ("blt", "entropy_model", "token_lm")
TOKENIZER_FIELDS = ("path", "train_bytes")  # the tokenizer section of a token_lm config
# Where patches are cut: in the input pipeline on the host CPUs, or on the accelerators one batch
# ahead of the step (bltjax.train.patcher).
PATCHING_PLACEMENTS = ("host", "accelerator")
NONFINITE_POLICIES = ("stop", "skip")  # train.nonfinite: what a non-finite update does to the run
# Fields of the stage-1 data section taken from the BLT's data section: both stages read the same
# documents (the paper's recipe).
SHARED_DATA_FIELDS = ("source", "paths", "text_field", "eval_fraction", "shards", "mixture",
                      "shuffle_window", "max_document_bytes")
# train.eval_sets: named held-out sources, each read whole and reported as eval/<name>/bpb.
EvalSet = typing.NamedTuple("EvalSet", [("name", str), ("source", str), ("paths", tuple),
                                        ("text_field", str)])
EVAL_SET_FIELDS = ("source", "paths", "text_field")
_EVAL_SET_NAME = re.compile(r"[A-Za-z0-9_.\-]+")  # it ends up in the metric key eval/<name>/bpb
_DICTS = (Mapping, ml_collections.ConfigDict)  # a ConfigDict is no Mapping


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/experiment.py[:arg]` (big_vision style: the arg may shrink the experiment)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  spec_ = importlib.util.spec_from_file_location(f"bltjax_experiment_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg or None)


def model_config(config) -> BLTConfig | LMConfig:
  """BLT: a BLTConfig; the entropy model and token_lm (the same LM over BPE tokens, with
  model.vocab_size = the BPE vocabulary): an LMConfig."""
  cls = BLTConfig if config.model_type == "blt" else LMConfig
  return cls.from_dict(config.model.to_dict())


def patching_config(config, threshold: float | None = None) -> PatchingConfig:
  """The PatchingConfig of a BLT config; `threshold` fills in a calibrated threshold."""
  fields = {k: v for k, v in config.patching.to_dict().items()
            if k in PatchingConfig.__dataclass_fields__}
  if fields["threshold"] is None:
    fields["threshold"] = threshold
  return PatchingConfig.from_dict(fields)


def entropy_stage_config(config) -> ml_collections.ConfigDict:
  """The stage-1 (entropy model) config nested in a BLT config, with the shared data fields."""
  stage = copy.deepcopy(config.entropy_model)
  stage.unlock()  # configs from the command line are locked; the shared fields are added here
  for field in SHARED_DATA_FIELDS:
    stage.data[field] = config.data[field]
  return stage


def needs_entropy_stage(config) -> bool:
  """Entropy patching with no entropy model given and no stored entropies: stage 1 trains one."""
  if config.model_type != "blt":  # only BLT configs have a patching section
    return False
  p = config.patching
  return p.mode == "entropy" and not p.entropy_model_checkpoint and not config.data.preprocessed_dir


def eval_sets(config) -> list[EvalSet]:
  """The named evaluation sources of `config.train.eval_sets` (name -> dict(source, paths,
  text_field)), validated with errors naming `train.eval_sets.<name>.<field>`."""
  specs = config.train.get("eval_sets") or {}  # absent in configs written before eval sets
  if not isinstance(specs, _DICTS):
    raise ValueError(f"train.eval_sets must map names to dicts of {EVAL_SET_FIELDS}, got "
                     f"{specs!r}")
  out = []
  for name, spec in specs.items():
    where = f"train.eval_sets.{name}"
    if not isinstance(name, str) or not _EVAL_SET_NAME.fullmatch(name):
      raise ValueError(f"{where}: the set name {name!r} must be letters, digits, '_', '.' or "
                       "'-' (it names the eval/<name>/bpb metric)")
    if not isinstance(spec, _DICTS):
      raise ValueError(f"{where} must be a dict with fields {EVAL_SET_FIELDS}, got {spec!r}")
    unknown = sorted(set(spec) - set(EVAL_SET_FIELDS))
    if unknown:
      raise ValueError(f"{where}.{unknown[0]} is not a field of an eval set; valid fields: "
                       f"{EVAL_SET_FIELDS}")
    if "source" not in spec:
      raise ValueError(f"{where}.source is missing (one of {SOURCES})")
    kind = spec["source"]
    # As in data.mixture: the text field is spelled out for the kinds that read one.
    if kind in sources.STREAMED and "text_field" not in spec:
      raise ValueError(f"{where}.text_field is missing (required for source {kind!r})")
    text_field = spec.get("text_field", "text")
    paths = sources.check_source(kind, spec.get("paths") or (), text_field, where)
    out.append(EvalSet(name, kind, tuple(str(p) for p in paths), text_field))
  return out


def _require(cond, message):
  if not cond:
    raise ValueError(f"invalid config: {message}")


def validate(config, num_devices: int | None):
  """Fails fast with a message naming the offending field. Returns (model cfg, patching cfg).

  Where the run trains its entropy model first (`needs_entropy_stage`), the stage-1 config is
  checked too; its messages name its fields as the BLT config does (entropy_model.<field>).
  `num_devices=None` skips the checks that depend on the machine (mesh, per-device batch), e.g.
  when preprocessing data on a host other than the training pod.
  """
  model, patching = _validate_stage(config, num_devices)
  if needs_entropy_stage(config):
    stage = entropy_stage_config(config)
    _require(stage.model_type == "entropy_model",
             "entropy_model.model_type must be 'entropy_model'")
    try:
      _validate_stage(stage, num_devices)
    except ValueError as e:
      raise ValueError(str(e).replace("invalid config: ", "invalid config: entropy_model.")) \
          from None
  return model, patching


def _validate_stage(config, num_devices: int | None):
  """`validate` for the one model `config` trains."""
  _require(config.model_type in MODEL_TYPES,
           f"model_type={config.model_type!r} must be one of {MODEL_TYPES}")
  model = model_config(config)
  d, t, o = config.data, config.train, config.optim
  _require(d.source in SOURCES, f"data.source={d.source!r} must be one of {SOURCES} "
           "(or set data.preprocessed_dir)")
  _require(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2")
  _require(0 <= d.eval_fraction < 1, f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
  _require(isinstance(d.shuffle_window, int) and d.shuffle_window >= 1,
           f"data.shuffle_window={d.shuffle_window!r} must be an int >= 1")
  max_doc = d.get("max_document_bytes")
  _require(isinstance(max_doc, int) and not isinstance(max_doc, bool) and max_doc >= 1,
           f"data.max_document_bytes={max_doc!r} must be an int >= 1 (longer documents are cut "
           "to their first that many bytes and counted as oversized_docs)")
  try:  # data.mixture: each component's name, source, paths, weight and text_field
    mixture_lib.components(d)
  except ValueError as e:
    _require(False, str(e))

  mesh = list(config.mesh.shape)
  _require(len(mesh) == 3, f"mesh.shape={tuple(mesh)} needs 3 entries (data, fsdp, tensor)")
  _require(mesh.count(-1) <= 1 and all(s == -1 or s >= 1 for s in mesh),
           f"mesh.shape={tuple(mesh)}: sizes must be >= 1, at most one -1")
  _require(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
  rows = t.get("rows_per_device")
  _require(rows is None or (isinstance(rows, int) and not isinstance(rows, bool) and rows >= 1),
           f"train.rows_per_device={rows!r} must be None or an int >= 1")
  _require(rows is not None or (isinstance(t.microbatches, int) and t.microbatches >= 1),
           f"train.microbatches={t.microbatches!r} must be an int >= 1 (or set "
           "train.rows_per_device)")
  if num_devices is not None:
    fixed = math.prod(s for s in mesh if s != -1)
    _require(num_devices % fixed == 0 and (-1 in mesh or fixed == num_devices),
             f"mesh.shape={tuple(mesh)} does not divide the {num_devices} available devices")
    microbatches(config, num_devices)  # raises naming the fields that disagree
  try:
    sets = eval_sets(config)
  except ValueError as e:
    _require(False, str(e))
  _require(t.eval_batches >= 0 and (t.eval_batches == 0 or d.eval_fraction > 0 or sets),
           "train.eval_batches > 0 needs data.eval_fraction > 0 (or train.eval_sets)")
  _require(not sets or t.eval_batches >= 1,
           f"train.eval_sets is set: train.eval_batches={t.eval_batches} must be >= 1 (the "
           "batches evaluated per set)")
  # Stored rows come with their entropies; an eval set has none to cut its patches from.
  _require(not sets or not d.preprocessed_dir,
           "train.eval_sets cannot be used with data.preprocessed_dir (eval sets are read "
           "online); set train.eval_sets={} or train from the online pipeline")
  _require(t.nonfinite in NONFINITE_POLICIES,
           f"train.nonfinite={t.nonfinite!r} must be one of {NONFINITE_POLICIES}")
  _require(t.max_skipped_steps >= 1, f"train.max_skipped_steps={t.max_skipped_steps} must be >= 1")
  _require(t.loss_spike_factor == 0 or t.loss_spike_factor > 1,
           f"train.loss_spike_factor={t.loss_spike_factor} must be 0 (off) or > 1")
  _require(t.loss_spike_horizon >= 1,
           f"train.loss_spike_horizon={t.loss_spike_horizon} must be >= 1")
  _require(0 <= o.warmup_steps <= t.steps,
           f"optim.warmup_steps={o.warmup_steps} must be in [0, train.steps={t.steps}]")
  _require(0 <= o.lr_min_ratio <= 1, f"optim.lr_min_ratio={o.lr_min_ratio} must be in [0, 1]")

  if config.model_type == "token_lm":
    _validate_tokenizer(config, model)

  windows = ([("model.encoder", model.encoder), ("model.decoder", model.decoder)]
             if config.model_type == "blt" else [("model.transformer", model.transformer)])
  for name, tc in windows:
    _require(tc.attn_window is None or tc.attn_window <= d.seq_len,
             f"{name}.attn_window={tc.attn_window} is larger than data.seq_len={d.seq_len}")

  patching = None
  if config.model_type == "blt":
    p = config.patching
    auto = p.mode == "entropy" and p.threshold is None
    _require(not auto or (p.target_patch_size or 0) > 1,
             "patching.threshold is None: set it, or set patching.target_patch_size > 1 to "
             "calibrate it on held-out data")
    patching = patching_config(config, threshold=0.0 if auto else None)
    _require(p.device in PATCHING_PLACEMENTS,
             f"patching.device={p.device!r} must be one of {PATCHING_PLACEMENTS}")
    _require(2 <= p.max_patches <= d.seq_len + 1,
             f"patching.max_patches={p.max_patches} must be in [2, data.seq_len + 1 = "
             f"{d.seq_len + 1}]")
  return model, patching


def _batch_shards(config, num_devices: int) -> tuple[int, tuple[int, ...]]:
  """(the data-parallel size data*fsdp, the mesh's sizes) of `config.mesh` on `num_devices`."""
  mesh = list(config.mesh.shape)
  fixed = math.prod(s for s in mesh if s != -1)
  sizes = tuple(num_devices // fixed if s == -1 else s for s in mesh)
  return sizes[0] * sizes[1], sizes


def microbatches(config, num_devices: int) -> int:
  """Gradient-accumulation steps per train step on `num_devices`.

  With `train.rows_per_device` set, they follow from it: batch_size / (rows_per_device x
  data*fsdp), so one config compiles for any device count (v5p-256: 128 chips, or 8 GPUs). An
  explicit `train.microbatches` must then agree (None leaves it to rows_per_device).
  """
  t = config.train
  shards, sizes = _batch_shards(config, num_devices)
  rows = t.get("rows_per_device")
  if rows is not None:
    per_pass = rows * shards
    _require(t.batch_size % per_pass == 0,
             f"train.batch_size={t.batch_size} is not a multiple of train.rows_per_device={rows} "
             f"x data*fsdp={shards} = {per_pass} rows per pass (mesh.shape={sizes} on "
             f"{num_devices} devices)")
    num = t.batch_size // per_pass
    _require(t.microbatches is None or t.microbatches == num,
             f"train.microbatches={t.microbatches} contradicts train.rows_per_device={rows}, "
             f"which gives {num} on {num_devices} devices (batch_size={t.batch_size} / "
             f"({rows} x data*fsdp={shards})); set train.microbatches=None")
    return num
  _require(t.batch_size % t.microbatches == 0,
           f"train.batch_size={t.batch_size} is not divisible by "
           f"train.microbatches={t.microbatches}")
  micro = t.batch_size // t.microbatches
  _require(micro % shards == 0,
           f"train.batch_size={t.batch_size} / train.microbatches={t.microbatches} = {micro} "
           f"rows is not divisible by the data-parallel size data*fsdp={shards} "
           f"(mesh.shape={sizes})")
  return t.microbatches


def _validate_tokenizer(config, model):
  tok = config.get("tokenizer")
  _require(isinstance(tok, _DICTS), "model_type='token_lm' needs a tokenizer section "
           f"with fields {TOKENIZER_FIELDS}")
  unknown = sorted(set(tok) - set(TOKENIZER_FIELDS))
  _require(not unknown, f"tokenizer.{unknown[0] if unknown else ''} is not a field of the "
           f"tokenizer section; valid fields: {TOKENIZER_FIELDS}")
  _require(tok.get("path") is None or (isinstance(tok.path, str) and tok.path),
           f"tokenizer.path={tok.get('path')!r} must be None (train one into "
           "WORKDIR/tokenizer.json) or the path of a tokenizer.json")
  tb = tok.get("train_bytes")
  _require(isinstance(tb, int) and not isinstance(tb, bool) and tb >= 1,
           f"tokenizer.train_bytes={tb!r} must be an int >= 1")
  _require(model.vocab_size >= bpe.MIN_VOCAB,
           f"model.vocab_size={model.vocab_size} must be >= {bpe.MIN_VOCAB} (4 special ids, "
           "the 256 byte tokens and at least one merge)")
  _require(not config.data.preprocessed_dir,
           "data.preprocessed_dir holds BLT rows of bytes; token_lm reads its documents online "
           "(set data.preprocessed_dir=None)")


def check_paths(config, workdir: str, process_index: int, process_count: int):
  """What the run reads or writes, local or gs://, checked before anything starts (`config`
  validated): a missing path or bucket, or no credentials, fails now with one line naming it
  rather than deep inside a library later. This process's data shards, the workdir (writable),
  the data, init_from, stored entropies, the entropy model, and the eval sets of both stages:
  their files, and enough of them for this process's data shards."""
  d = config.data
  shards = shards_lib.data_shards(d, process_index, process_count)
  storage.check_access(workdir, write=True)
  reads = list(d.paths or ()) + [p for m in (d.mixture or ()) for p in m["paths"]]
  reads += [config.init_from, d.preprocessed_dir]
  if config.model_type == "blt":
    reads.append(config.patching.entropy_model_checkpoint)
  for path in reads:
    if path:
      storage.check_access(path)
  stages = [("train.eval_sets", config)]
  if needs_entropy_stage(config):  # stage 1 reads the same data shards, and its own eval sets
    stages.append(("entropy_model.train.eval_sets", entropy_stage_config(config)))
  for where, stage in stages:
    for es in eval_sets(stage):
      _check_eval_set_files(es, f"{where}.{es.name}.paths", shards, d.shards, process_count)


def _check_eval_set_files(es: EvalSet, field: str, shards: list[int], num_shards: int,
                          process_count: int):
  """An eval set's files exist, and each of this process's data shards gets one (`field` names
  them in the errors)."""
  if es.source == "stdlib":
    return
  for path in es.paths:
    try:
      storage.check_access(path)
    except (OSError, ValueError) as e:
      raise type(e)(f"{field}: {e}") from None
  try:
    files = paths_lib.expand(es.paths)
  except ValueError as e:
    raise ValueError(f"{field}: {e}") from None
  total = num_shards or process_count
  # Streamed and ArrayRecord sets are sharded by file (as the training source is).
  if es.source != "text" and any(not files[s::total] for s in shards):
    raise ValueError(f"{field}: {len(files)} file(s), fewer than the {total} data shards "
                     f"(data.shards={num_shards}; 0 = one per process)")


def tiny(config) -> ml_collections.ConfigDict:
  """`experiment.py:tiny`: the same experiment shrunk for a smoke run on one CPU machine.

  Keeps the structure (stages, patching mode, data source, number of hash functions and
  sub-queries) and shrinks widths, depths, lengths, batch and steps.
  """
  c = copy.deepcopy(config)  # deepcopy keeps placeholders overridable from the command line

  def shrink_stack(t, window=True):
    t.update(dim=64, n_layers=min(t.n_layers, 2), n_heads=2, n_kv_heads=2, ffn_dim=128,
             attn_window=(32 if window else None))

  def shrink_stage(s):
    s.data.update(seq_len=128, num_workers=0)
    s.train.update(steps=4, batch_size=8, microbatches=1, rows_per_device=None, log_every=2,
                   eval_every=4,
                   eval_batches=1, checkpoint_every=2)
    s.optim.update(warmup_steps=1)
    s.mesh.shape = (1, -1, 1)
    rt = s.model.runtime
    rt.update(dtype="float32", remat_policy="none", attn_chunk=None, attn_loop=False,
              scan_unroll=1)

  shrink_stage(c)
  if c.model_type == "blt":
    c.train.entropy_figure = False  # smoke runs skip drawing (matplotlib import, a compile)
    for name in ("encoder", "decoder"):
      shrink_stack(c.model[name])
    shrink_stack(c.model.latent, window=False)
    c.model.latent.dim = 64 * c.model.cross_attn_k  # no latent input projection needed
    c.model.latent.n_heads = c.model.latent.n_kv_heads = 2
    c.model.update(cross_attn_nheads=2, hash_vocab=1009)
    c.patching.max_patches = 96
    if c.patching.mode == "entropy" and not c.patching.entropy_model_checkpoint:
      shrink_stack(c.entropy_model.model.transformer)
      shrink_stage(c.entropy_model)
  else:  # the token_lm attends over its whole row, as the BLT's latent does
    shrink_stack(c.model.transformer, window=c.model_type != "token_lm")
  if c.model_type == "token_lm":
    c.model.vocab_size = 512
    c.tokenizer.train_bytes = 1 << 20
  return c
