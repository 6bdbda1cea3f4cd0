"""Offline entropies: the writer of the rows `bltjax/data/preprocessed.py` reads
(`python -m bltjax.preprocess --config=... --out=DIR`).

Runs the frozen entropy model once over the rows a training run will read and stores each row's
bytes with its per-byte next-byte entropies (not patch lengths: training cuts patches from them
with whatever patching settings its config has, `bltjax/data/preprocessed.py` describes the
files). Train on them with `--config.data.preprocessed_dir=DIR`: the same batches as the online
pipeline, row for row, for the run's `train.steps` (later rows repeat).

An accelerator job on one or many hosts. The data layout is T data shards (T = data.shards, else
the training run's process count), fixed independently of the P preprocessing processes:
process p writes shards s with s % P == p, running the entropy model on its own local devices
(rows split over them, fixed chunk shapes) and writing its own files. Nothing is collective but
a final barrier; process 0 writes the manifest.

Resumable: each shard is written under a temporary name, renamed (or copied up, for gs://), then
marked done; re-running the same command skips finished shards and redoes the rest from their
first row. A re-run with another config into the same DIR fails, naming what differs.

The entropy model: patching.entropy_model_checkpoint, else the one recorded in init_from, else
WORKDIR/entropy_model (stage 1 of `python -m bltjax.main --workdir=WORKDIR`).
"""

import contextlib
import logging
import os
import queue
import socket
import tempfile
import threading
import time

from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
import jax
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bltjax.checkpoint import checkpointer, workdir_lock
from bltjax.data import pipeline, preprocessed as pre
from bltjax.model.config import LMConfig
from bltjax.model.lm import TransformerLM
from bltjax.runtime import storage
from bltjax.train import experiment, patcher

ROWS_PER_DEVICE = 8
BARRIER_TIMEOUT_S = 7 * 24 * 3600  # processes may finish their shards hours apart
# Test hook: seconds to sleep after each finished shard (to kill a run between shards).
_SLEEP_ENV = "BLTJAX_PREPROCESS_SLEEP_AFTER_SHARD"


def entropy_checkpoint(config, workdir: str | None) -> str:
  p = config.patching
  if p.entropy_model_checkpoint:
    return str(p.entropy_model_checkpoint)
  if config.init_from:
    recorded = checkpointer.recorded_entropy_model(config.init_from)
    if recorded:
      return recorded
  if workdir:
    return storage.join(workdir, patcher.ENTROPY_STAGE_DIR)
  raise ValueError("preprocess needs an entropy model: set patching.entropy_model_checkpoint, or "
                   "--workdir of a run whose stage 1 trained one (python -m bltjax.main)")


def num_shards(config, num_training_processes: int) -> int:
  d, t = config.data, config.train
  shards = d.shards or num_training_processes
  if d.shards and d.shards % num_training_processes:
    raise ValueError(f"data.shards={d.shards} is not a multiple of --num_training_processes="
                     f"{num_training_processes}")
  if t.batch_size % shards:
    raise ValueError(f"train.batch_size={t.batch_size} does not split over {shards} data shards "
                     "(data.shards, else --num_training_processes)")
  return shards


def build_manifest(config, shards: int, entropy_model: dict, entropy_dtype: str) -> dict:
  t, n = config.train, config.data.seq_len
  per_step = t.batch_size // shards
  rows = dict(train=t.steps * per_step, eval=t.eval_batches * per_step)
  names = pipeline.source_names(config.data)
  if len(names) > 1 and rows["eval"]:  # what the per-source evaluation reads
    rows |= {pre.split_key("eval", name): rows["eval"] for name in names}
  m = dict(format=pre.FORMAT, version=pre.VERSION, seq_len=n, shards=shards, rows_per_shard=rows,
           entropy_model=entropy_model, entropy_dtype=entropy_dtype,
           record_bytes=pre.record_bytes(n, entropy_dtype), data=pre.data_identity(config),
           train=dict(steps=t.steps, batch_size=t.batch_size, eval_batches=t.eval_batches),
           complete=False)
  return dict(m, fingerprint=pre.fingerprint(m))


def _check_same(existing: dict, manifest: dict, out: str):
  if existing.get("fingerprint") == manifest["fingerprint"]:
    return
  differ = [f"{k}: {existing.get(k)} there, {manifest[k]} here" for k in pre.IDENTITY
            if existing.get(k) != manifest[k]]
  if (existing.get("entropy_model") or {}).get("sha256") != manifest["entropy_model"]["sha256"]:
    differ.append(f"entropy model sha256 {existing.get('entropy_model')} there, "
                  f"{manifest['entropy_model']} here")
  raise ValueError(f"--out={out} holds rows written with another config ({'; '.join(differ)}): "
                   "use another --out, or delete it to start over")


# -- the entropy model on this process's devices ---------------------------------------------------


class LocalEntropies:
  """fp32 entropies of the entropy model, stored dtype, over a mesh of jax.local_devices().

  Calls take a fixed chunk of rows (rows_per_device per device): one compiled shape."""

  def __init__(self, ckpt: str, entropy_dtype: str, rows_per_device: int):
    params, ent_config, _, step = checkpointer.load_params(ckpt)
    # = patcher.load_entropy_model(EntropySpec(ckpt, ent_config["model"])), read once: the
    # identity is hashed from the same params.
    model = TransformerLM(LMConfig.from_dict(ent_config["model"]))
    self.identity = dict(path=storage.abspath(ckpt), step=int(step),
                         sha256=checkpointer.params_hash(params))
    mesh = Mesh(np.array(jax.local_devices()), ("rows",))
    self.rows_sh = NamedSharding(mesh, PartitionSpec("rows"))
    replicated = NamedSharding(mesh, PartitionSpec())
    self.params = jax.device_put(params, replicated)
    self.chunk = rows_per_device * len(jax.local_devices())
    fn = patcher.entropies_fn(model)
    dtype = np.dtype(entropy_dtype)
    self._fn = jax.jit(lambda p, t: fn(p, t).astype(dtype), in_shardings=(replicated, self.rows_sh),
                       out_shardings=self.rows_sh)

  def __call__(self, tokens_BxN: np.ndarray) -> jax.Array:
    """Asynchronous: returns before the devices finish."""
    return self._fn(self.params, jax.device_put(tokens_BxN, self.rows_sh))


def _chunks(config, key, s, shards, rows, chunk):
  """Yields (rows dict of [k, ...] arrays, tokens int32 [chunk, N] zero padded), k <= chunk."""
  split, _, source = key.partition("_by_source/")
  it = iter(pipeline.packed_rows(config.data, split, seed=config.seed, process_index=s,
                                    process_count=shards, shuffle=split == "train",
                                    source=source or None))
  for start in range(0, rows, chunk):
    ex = [next(it) for _ in range(min(chunk, rows - start))]
    batch = {k: np.stack([e[k] for e in ex]) for k in ex[0]}
    tokens = np.zeros((chunk, config.data.seq_len), np.int32)
    tokens[:len(ex)] = batch["tokens"]
    yield batch, tokens


def _prefetched(gen, depth=2):
  """Runs `gen` in a thread (reading and packing overlap the devices and the writes)."""
  q, end = queue.Queue(maxsize=depth), object()

  def work():
    try:
      for item in gen:
        q.put(item)
      q.put(end)
    except BaseException as e:  # re-raised in the consumer
      q.put(e)
  threading.Thread(target=work, daemon=True).start()
  while (item := q.get()) is not end:
    if isinstance(item, BaseException):
      raise item
    yield item


def write_shard(config, out, split, s, manifest, ent: LocalEntropies, tmpdir) -> int:
  """Writes one shard (temporary name -> final name -> marker). Returns its rows."""
  shards, rows = manifest["shards"], manifest["rows_per_shard"][split]
  dtype = manifest["entropy_dtype"]
  final = pre.shard_path(out, split, s, shards)
  local = (os.path.join(tmpdir, final.name) if storage.is_remote(out)
           else f"{final}.tmp-{socket.gethostname()}-{os.getpid()}")
  writer = ArrayRecordWriter(local, "group_size:1")
  written, pending = 0, None

  def flush(p):
    batch, out_dev = p
    k = len(batch["tokens"])
    e = np.asarray(out_dev)[:k]
    if not np.isfinite(e).all():
      raise FloatingPointError(f"{split} shard {s}: {np.size(e) - np.isfinite(e).sum()} "
                               "non-finite entropies: the entropy model is broken")
    for record in pre.encode_rows(batch["tokens"], batch["targets"], batch["mask"],
                                  batch["doc_flag_counts"], e, dtype):
      writer.write(record.tobytes())
    return k

  try:
    for batch, tokens in _prefetched(_chunks(config, split, s, shards, rows, ent.chunk)):
      result = (batch, ent(tokens))  # dispatched: the previous chunk is written meanwhile
      if pending is not None:
        written += flush(pending)
      pending = result
    if pending is not None:
      written += flush(pending)
  finally:
    writer.close()
  if written != rows:
    raise RuntimeError(f"{split} shard {s}: wrote {written} rows, expected {rows}")
  size = os.path.getsize(local)
  if storage.is_remote(out):
    epath.Path(local).copy(final, overwrite=True)  # a GCS object appears whole, or not at all
    os.remove(local)
  else:
    os.replace(local, final)
  pre.write_json(pre.marker_path(out, split, s, shards),
                 dict(rows=rows, bytes=size, fingerprint=manifest["fingerprint"]))
  return rows


def _clear_partial(out, split, s, shards):
  """Temporary files of this shard (data, marker) left by a killed run: each shard has one
  writer per run. (gs:// gets no temporary objects.)"""
  if storage.is_remote(out):
    return
  for p in pre.shard_path(out, split, s, shards).parent.glob(
      f"{pre.shard_name(s, shards)}.*.tmp-*"):
    logging.info("preprocess: removing %s (left by an interrupted run)", p)
    p.unlink()


def preprocess(config, out: str, *, workdir: str | None = None, num_training_processes: int = 1,
               entropy_dtype: str = "float16", rows_per_device: int = ROWS_PER_DEVICE,
               force_unlock: bool = False) -> dict:
  """Writes (or finishes) DIR=`out`; every process calls it. Returns the manifest. Process 0
  holds DIR's lock meanwhile (one preprocessing run per directory; `force_unlock` takes it
  over)."""
  experiment.validate(config, None)  # the training pod may have another device count
  if config.model_type != "blt":
    raise ValueError("preprocess stores entropies for BLT patching: model_type must be 'blt'")
  if config.data.preprocessed_dir:
    raise ValueError("data.preprocessed_dir is set: this config already reads stored rows")
  if entropy_dtype not in pre.ENTROPY_DTYPES:
    raise ValueError(f"entropy_dtype={entropy_dtype!r} must be one of {pre.ENTROPY_DTYPES}")
  shards = num_shards(config, num_training_processes)
  storage.check_access(out, write=True)
  with workdir_lock.hold(out, force=force_unlock, what="preprocessing run"):
    return _preprocess(config, out, shards, workdir, entropy_dtype, rows_per_device)


def _preprocess(config, out, shards, workdir, entropy_dtype, rows_per_device) -> dict:
  p, procs = jax.process_index(), jax.process_count()
  ckpt = entropy_checkpoint(config, workdir)
  try:
    ent = LocalEntropies(ckpt, entropy_dtype, rows_per_device)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"the entropy model {ckpt} is not there ({e}): train it first (stage "
                            "1 of python -m bltjax.main) or set "
                            "patching.entropy_model_checkpoint") from None
  manifest = build_manifest(config, shards, ent.identity, entropy_dtype)
  _start_out(out, manifest, first=p == 0)
  mine = [(split, s) for split, rows in manifest["rows_per_shard"].items() if rows
          for s in range(shards) if s % procs == p]
  logging.info("preprocess: process %d/%d: %d of %d shard files, %d rows per call on %d local "
               "devices, entropy model %s", p, procs, len(mine), shards * sum(
                   bool(r) for r in manifest["rows_per_shard"].values()), ent.chunk,
               len(jax.local_devices()), ent.identity)
  start = time.time()
  rows, skipped = _write_shards(config, out, manifest, ent, mine)
  seconds = time.time() - start
  n = config.data.seq_len
  logging.info("preprocess: process %d/%d: wrote %d rows (%d bytes) in %.1f s (%.0f bytes/s); "
               "skipped %d shard file(s) finished earlier", p, procs, rows, rows * n, seconds,
               rows * n / max(seconds, 1e-9), skipped)
  _barrier("bltjax_preprocess_done")
  if p == 0:
    missing = pre.missing_shards(out, manifest)
    if missing:
      raise RuntimeError(f"{out}: shard(s) {missing} unfinished after all processes finished")
    manifest["complete"] = True
    pre.write_json(epath.Path(out) / pre.MANIFEST, manifest)
    logging.info("preprocess: %s complete (%s rows per shard, %d shards)", out,
                 manifest["rows_per_shard"], shards)
  return manifest


def _start_out(out: str, manifest: dict, *, first: bool):
  """Refuses a DIR of another config; process 0 writes the manifest before any shard exists."""
  root = epath.Path(out)
  existing = pre.read_json(root / pre.MANIFEST)
  if existing is not None:
    _check_same(existing, manifest, out)
  for split in manifest["rows_per_shard"]:
    (root / split).mkdir(parents=True, exist_ok=True)
  if existing is None and first:
    pre.write_json(root / pre.MANIFEST, manifest)


def _write_shards(config, out, manifest, ent, mine) -> tuple[int, int]:
  """Writes this process's unfinished shards. Returns (rows written, shards skipped)."""
  shards, written, skipped = manifest["shards"], 0, 0
  # gs://: shards are written locally first (ArrayRecord's writer takes local paths only).
  with tempfile.TemporaryDirectory(prefix="bltjax-preprocess-") if storage.is_remote(out) else \
      contextlib.nullcontext() as tmpdir:
    for split, s in mine:
      marker = pre.read_json(pre.marker_path(out, split, s, shards))
      if marker is not None:
        if marker.get("fingerprint") != manifest["fingerprint"]:
          raise ValueError(f"{out}: {split} shard {s} was written by another config (marker "
                           f"fingerprint {marker.get('fingerprint')}, this run "
                           f"{manifest['fingerprint']}): use another --out")
        skipped += 1
        continue
      _clear_partial(out, split, s, shards)
      t0 = time.time()
      rows = write_shard(config, out, split, s, manifest, ent, tmpdir)
      written += rows
      logging.info("preprocess: %s shard %d/%d: %d rows, %.0f bytes/s", split, s, shards, rows,
                   rows * config.data.seq_len / (time.time() - t0))
      if os.environ.get(_SLEEP_ENV):
        time.sleep(float(os.environ[_SLEEP_ENV]))
  return written, skipped


def _barrier(name: str):
  """The one collective step: every process has written its shards."""
  if jax.process_count() == 1:
    return
  client = jax_distributed.global_state.client  # the coordination service: no device collective
  if client is None:
    multihost_utils.sync_global_devices(name)
  else:
    client.wait_at_barrier(name, timeout_in_ms=BARRIER_TIMEOUT_S * 1000)
