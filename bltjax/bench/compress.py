"""General-purpose compressors on the held-out bytes the trainer evaluates on:
`python -m bltjax.bench compress [--config=experiments/debug.py]`.

The trainer's `eval_bpb` (bltjax.train.heldout.Evaluator) covers the first `train.eval_batches`
batches of the eval split: per data shard, the shard's held-out documents in order (unshuffled,
cycled when short), each tokenized as BOS + bytes + EOS, concatenated and split into windows of
data.seq_len + 1 ids (bltjax.data.pipeline.packed_rows). So those batches cover exactly the
first eval_batches x rows x (seq_len + 1) ids of that document stream, the last document cut
where the last window ends. This module rebuilds that stream with the pipeline's own functions
and reports, in bits per byte of document text:

  * per document: every covered document compressed on its own (a cut document: the part the
    windows cover); sum of compressed bits / sum of bytes;
  * concatenated: the covered documents' bytes joined and compressed once;
  * the same over the whole eval split (every held-out document, whole), for reference.

Compressors: gzip -9 (the gzip format, as `gzip -9n`), xz -9e (the xz format, CRC64 check, as
`xz -9e`) and zstd -19 (one frame with the content size, as `zstd -19`); container headers and
checksums are counted, as they would be on disk.

The model's eval_bpb divides by the evaluator's target ids (every id of a window but its first:
the document bytes plus the BOS/EOS ids, less one per window); both counts are printed, and they
differ by well under 1% on source files of kilobytes.
"""

import dataclasses
import gzip
import lzma

import numpy as np
import zstandard

from bltjax.bench import common
from bltjax.data import pipeline
from bltjax.data import shards as shards_lib
from bltjax.model import tokenizer
from bltjax.train import experiment


def _gzip(data: bytes) -> bytes:
  return gzip.compress(data, compresslevel=9, mtime=0)


def _xz(data: bytes) -> bytes:
  return lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)


def _zstd(data: bytes) -> bytes:
  return zstandard.ZstdCompressor(level=19).compress(data)


COMPRESSORS = {"gzip -9": _gzip, "xz -9e": _xz, "zstd -19": _zstd}


@dataclasses.dataclass
class Doc:
  """One document of the evaluated stream: `ids` as fed (BOS + bytes + EOS, cut when the
  evaluated windows end inside it), `data` the document bytes among them, `whole` the number of
  ids of the whole document."""
  shard: int
  ids: np.ndarray
  whole: int

  @property
  def data(self) -> bytes:
    return (self.ids[self.ids >= tokenizer.OFFSET] - tokenizer.OFFSET).astype(np.uint8).tobytes()

  @property
  def cut(self) -> bool:
    return len(self.ids) < self.whole


def _check(config):
  d = config.data
  if d.preprocessed_dir:
    raise ValueError("data.preprocessed_dir: rows written by bltjax.preprocess carry no "
                     "documents to compress; run on the source config")
  if not d.eval_fraction > 0:
    raise ValueError("data.eval_fraction is 0: no eval split (eval sets are not covered)")


def _sources(config):
  names = pipeline.source_names(config.data)
  return [(name if len(names) > 1 else None) for name in names]


def _shards(config):
  """(shard index, shard count, rows per batch from this shard), as the evaluator of process 0
  of a single-process run reads them."""
  d, rows = config.data, config.train.batch_size
  shards = shards_lib.data_shards(d, 0, 1)
  if rows % len(shards):
    raise ValueError(f"train.batch_size={rows} does not split over {len(shards)} data shards")
  return [(s, d.shards or 1, rows // len(shards)) for s in shards]


def covered_documents(config) -> list[Doc]:
  """The documents (of every data shard, and with a data mixture of every source) whose ids the
  evaluator's eval-split batches hold, in stream order; the last of each shard/source is cut
  where its windows end. A short eval split repeats, as in the evaluator."""
  _check(config)
  n = config.data.seq_len + 1
  out = []
  for source in _sources(config):
    for shard, total, rows in _shards(config):
      need = config.train.eval_batches * rows * n
      docs = shards_lib.tokenized_documents(config.data, "eval", seed=config.seed,
                                            process_index=shard, process_count=total,
                                            shuffle=False, num_epochs=None, source=source)
      for doc in docs:
        if need <= 0:
          break
        ids = np.asarray(doc["tokens"])
        out.append(Doc(shard, ids[:need], len(ids)))
        need -= len(ids)
  return out


def eval_split_documents(config) -> list[Doc]:
  """Every document of the eval split (every shard and source), whole, once."""
  _check(config)
  out = []
  for source in _sources(config):
    for shard, total, _ in _shards(config):
      docs = shards_lib.tokenized_documents(config.data, "eval", seed=config.seed,
                                            process_index=shard, process_count=total,
                                            shuffle=False, num_epochs=1, source=source)
      out += [Doc(shard, np.asarray(d["tokens"]), len(d["tokens"])) for d in docs]
  return out


def _figures(datas: list[bytes]) -> dict:
  nbytes = sum(len(x) for x in datas)
  joined = b"".join(datas)
  res = dict(documents=len(datas), bytes=nbytes, per_document={}, concatenated={})
  for name, fn in COMPRESSORS.items():
    res["per_document"][name] = sum(8 * len(fn(x)) for x in datas) / nbytes
    res["concatenated"][name] = 8 * len(fn(joined)) / nbytes
  return res


def compress_figures(config) -> dict:
  """Bits per byte of each compressor: {'covered': {...}, 'eval_split': {...}}, each with
  documents, bytes, per_document and concatenated ({compressor: bpb}); 'covered' also has ids,
  windows and targets (what the evaluator's batches hold) and cut (the bytes kept and the whole
  size of each cut document)."""
  covered = covered_documents(config)
  n = config.data.seq_len
  windows = config.train.eval_batches * config.train.batch_size * len(_sources(config))
  res = dict(covered=_figures([d.data for d in covered]),
             eval_split=_figures([d.data for d in eval_split_documents(config)]))
  res["covered"].update(
      ids=sum(len(d.ids) for d in covered), windows=windows, targets=windows * n,
      cut=[(len(d.data), d.whole - 2) for d in covered if d.cut])  # whole: BOS + bytes + EOS
  return res


def format_table(res: dict, config, name: str = "") -> str:
  """The figures as a small text table."""
  c, t = res["covered"], config.train
  lines = []
  cuts = "; ".join(f"the last document is cut after {kept:,} of its {whole:,} bytes, where the "
                   "evaluated windows end" for kept, whole in c["cut"])
  lines.append(f"{name}held-out documents the trainer's eval_bpb covers: {t.eval_batches} eval "
               f"batches x {t.batch_size} rows x (seq_len {config.data.seq_len} + 1) = "
               f"{c['ids']:,} ids ({c['targets']:,} targets); {c['documents']} documents, "
               f"{c['bytes']:,} bytes" + (f"; {cuts}" if cuts else ""))
  e = res["eval_split"]
  cols = list(COMPRESSORS)
  head = f"{'bits per byte':52s}" + "".join(f"{x:>10s}" for x in cols)
  lines += [head, "-" * len(head)]
  for label, r, kind in (
      (f"covered, per document ({c['documents']} docs, {c['bytes']:,} B)", c, "per_document"),
      ("covered, concatenated", c, "concatenated"),
      (f"whole eval split, per document ({e['documents']} docs, {e['bytes']:,} B)", e,
       "per_document"),
      ("whole eval split, concatenated", e, "concatenated")):
    lines.append(f"{label:52s}" + "".join(f"{r[kind][x]:10.3f}" for x in cols))
  lines.append(f"(eval_bpb divides by the {c['targets']:,} targets: the bytes plus BOS/EOS ids, "
               f"less one id per window; targets / bytes = {c['targets'] / c['bytes']:.4f})")
  return "\n".join(lines)


def run(config=None, name: str | None = None):
  """Prints the table for `config` (an experiment config; default: experiments/debug.py), headed
  by `name` (its file)."""
  if config is None:
    config, name = experiment.load(common.DEBUG_CONFIG), "experiments/debug.py"
  print(format_table(compress_figures(config), config, f"{name}: "))
