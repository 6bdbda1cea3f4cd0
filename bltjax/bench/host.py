"""The host side of the input pipeline, measured (part of `python -m bltjax.bench pipeline`;
`--part=host` or `--part=startup` runs one of them alone):

  host_pipeline  bytes/s of the host pipeline without the entropy model (read JSONL + tokenize +
                 pack + batch + hash n-gram ids) on one pinned core.
  startup        start-up time (dataset built and first batch read) and peak resident memory per
                 process on a synthetic multi-GB JSONL and Parquet corpus of many files, on 1
                 and on 4 processes (one data shard each).

Each measurement runs in worker processes of its own, `python -m bltjax.bench.host <worker>
<arguments as JSON>`: this module imports the data pipeline and nothing heavier (not the
benchmark command's model and trainer), so that the start-up figures show what a data process
pays for its imports.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bltjax.data import pipeline
from bltjax.model import hashing
from bltjax.runtime import cli

_WORDS = ("the of and to in is was for on that with as by at from it an be this are which or "
          "data model byte patch latent entropy transformer train step shard file corpus "
          "weight mixture window stream token row batch host device memory").split()


def _text_pool(n_bytes: int, seed: int = 0) -> str:
  """Word salad to slice documents from (cheap to generate at GB scale)."""
  rng = np.random.default_rng(seed)
  words = np.array(_WORDS)[rng.integers(0, len(_WORDS), n_bytes // 4)]
  return " ".join(words.tolist())[:n_bytes]


def write_corpus(root: str, kind: str, total_bytes: int, files: int, seed: int = 0) -> str:
  """`files` JSONL or Parquet files of ~`total_bytes` of documents of 0.5-8 KB; returns the glob.
  Written once: an existing complete corpus in `root` is reused."""
  os.makedirs(root, exist_ok=True)
  done = os.path.join(root, f"{kind}.done")
  pattern = os.path.join(root, f"*.{kind}")
  if os.path.exists(done):
    return pattern
  rng = np.random.default_rng(seed)
  pool = _text_pool(1 << 24, seed)
  per_file = total_bytes // files
  for f in range(files):
    docs, size = [], 0
    while size < per_file:
      n = int(rng.integers(500, 8000))
      start = int(rng.integers(0, len(pool) - n))
      docs.append(f"doc {f}-{len(docs)}: " + pool[start:start + n])
      size += n
    path = os.path.join(root, f"{f:04d}.{kind}")
    if kind == "jsonl":
      with open(path, "w") as fh:
        fh.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    else:
      pq.write_table(pa.table({"text": docs}), path, row_group_size=1024)
  open(done, "w").close()
  return pattern


def _data_config(kind: str, pattern: str, seq_len: int, shards: int):
  d = dict(source=kind, paths=(pattern,), text_field="text", seq_len=seq_len,
           eval_fraction=0.001, shards=shards, num_workers=0, worker_buffer=2, prefetch=2,
           read_threads=1, read_buffer=16, host_hash_ids=False, preprocessed_dir=None,
           mixture=(), shuffle_window=1024, max_document_bytes=64 << 20)  # as the experiments
  return ml_collections.ConfigDict(dict(data=d, seed=0, model_type="blt"))


def _rss_mib() -> dict:
  """Current and peak resident memory (Linux /proc), MiB."""
  with open("/proc/self/status") as f:
    fields = dict(line.split(":", 1) for line in f)
  return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def _worker_command(worker: str, **kwargs) -> list[str]:
  return [sys.executable, "-m", "bltjax.bench.host", worker, json.dumps(kwargs)]


def _figures(out: str) -> dict:
  """The figures a worker printed: its one line `@<JSON>`."""
  return json.loads([line for line in out.splitlines() if line.startswith("@")][0][1:])


def _host_worker(*, pattern: str, seq_len: int, batch: int, seconds: float):
  """One pinned core: batches/s of the pipeline, then with hash n-gram ids (8b.py's tables)."""
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  cfg = _data_config("jsonl", pattern, seq_len, 0)
  it = iter(pipeline.make_dataset(cfg, "train", local_batch_size=batch, process_index=0,
                                  process_count=1))
  results = {}
  for name, hash_ids in (("pipeline", False), ("pipeline + hash ids", True)):
    for _ in range(2):  # warm-up
      next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      b = next(it)
      if hash_ids:
        hashing.hash_ids_numpy(b["tokens"], group_sizes=(3, 4, 5, 6, 7, 8),
                               num_functions=1, vocab=500002)
      n += b["tokens"].size
    results[name] = n / (time.perf_counter() - t0)
  print("@" + json.dumps(results), flush=True)


def host_pipeline(seq_len: int = 16384, *, batch: int = 4, seconds: float = 8.0,
                  corpus_mb: int = 64) -> float:
  """Host pipeline bytes/s on one core without the entropy model; returns it (hash ids incl.)."""
  with tempfile.TemporaryDirectory() as tmp:
    pattern = write_corpus(tmp, "jsonl", corpus_mb << 20, files=8)
    out = subprocess.run(
        _worker_command("host", pattern=pattern, seq_len=seq_len, batch=batch, seconds=seconds),
        check=True, capture_output=True, text=True).stdout
  results = _figures(out)
  print(f"host pipeline on one core (JSONL, rows of {seq_len} bytes, {batch} rows per batch):")
  for name, rate in results.items():
    print(f"  {name:22s} {rate:12,.0f} bytes/s")
  return results["pipeline + hash ids"]


def _startup_worker(*, kind: str, pattern: str, seq_len: int, batch: int, shard: int,
                    shards: int):
  """One data process: its memory after the imports, then the time to its first train batch
  and first eval batch, and its memory after them."""
  rss0 = _rss_mib()
  t0 = time.perf_counter()
  cfg = _data_config(kind, pattern, seq_len, shards)
  it = iter(pipeline.make_dataset(cfg, "train", local_batch_size=batch, process_index=shard,
                                  process_count=shards))
  next(it)
  first = time.perf_counter()
  eval_it = iter(pipeline.make_dataset(cfg, "eval", local_batch_size=batch, process_index=shard,
                                       process_count=shards))
  next(eval_it)
  rss = _rss_mib()
  print("@" + json.dumps(dict(first_batch=first - t0,
                              first_eval_batch=time.perf_counter() - first,
                              rss_imports=rss0["VmRSS"], rss=rss["VmRSS"],
                              peak_rss=rss["VmHWM"])), flush=True)
  # The iterators' reader threads are still running: tearing the interpreter down under them
  # can abort in pyarrow's C++ ("terminate called without an active exception"). The figures are
  # out, so leave without teardown.
  os._exit(0)


def startup(corpus_gb: float = 2.0, *, files: int = 64, seq_len: int = 16384, batch: int = 8,
            root: str | None = None):
  """Start-up time and peak RSS per process, JSONL and Parquet, on 1 and 4 processes."""
  root = root or os.path.join(tempfile.gettempdir(), f"bltjax_bench_corpus_{corpus_gb:g}gb")
  print(f"start-up per process: synthetic corpus of {corpus_gb:g} GB per format in {files} "
        f"files ({root}); train then eval dataset built and first batch of {batch} x {seq_len} "
        "bytes read; times after imports; RSS after the imports (jax, grain, pyarrow), after both "
        "batches, and peak")
  print(f"{'format':8s} {'processes':>9s} {'first batch s':>14s} {'first eval s':>13s} "
        f"{'RSS imports MiB':>16s} {'RSS after MiB':>14s} {'peak RSS MiB':>13s}")
  for kind in ("jsonl", "parquet"):
    t0 = time.perf_counter()
    pattern = write_corpus(os.path.join(root, kind), kind, int(corpus_gb * 2**30), files)
    if time.perf_counter() - t0 > 1:
      print(f"  (wrote the {kind} corpus in {time.perf_counter() - t0:.0f} s)")
    for procs in (1, 4):
      cmds = [_worker_command("startup", kind=kind, pattern=pattern, seq_len=seq_len,
                              batch=batch, shard=s, shards=procs) for s in range(procs)]
      running = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in cmds]
      rows = []
      for p in running:
        out, _ = p.communicate()
        if p.returncode:
          raise RuntimeError(f"start-up worker failed ({p.returncode})")
        rows.append(_figures(out))
      worst = {k: max(r[k] for r in rows) for k in rows[0]}
      print(f"{kind:8s} {procs:9d} {worst['first_batch']:14.2f} {worst['first_eval_batch']:13.2f} "
            f"{worst['rss_imports']:16.0f} {worst['rss']:14.0f} {worst['peak_rss']:13.0f}")
  print("(the slowest / largest process of each row)")


def _worker(argv):
  """A worker process: `argv` is [program, worker name, its keyword arguments as JSON]."""
  _, name, kwargs = argv
  {"host": _host_worker, "startup": _startup_worker}[name](**json.loads(kwargs))


if __name__ == "__main__":
  cli.run(_worker)  # the process set-up of every bltjax program; errors as one line
