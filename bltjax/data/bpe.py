"""Byte-level BPE for the token-level baseline (model_type 'token_lm'): train, load, tokenize.

The baseline is BLT's latent transformer stack over BPE tokens (`TransformerLM` with
`vocab_size` = the BPE vocabulary). Its tokenizer is a Hugging Face `tokenizers` byte-level BPE
(ByteLevel pre-tokenizer and decoder, all 256 byte symbols in the initial alphabet), trained on the
first `tokenizer.train_bytes` bytes of the training split (never the held-out documents) and kept
in WORKDIR/tokenizer.json, which a re-run reuses.

Ids 0..3 are pad/BOS/EOS/unused as in `bltjax.model.tokenizer`, so the model's document split at
`EOS_ID` works unchanged. They are plain vocabulary entries, not HF "added tokens": text that
contains their names is ordinary text. Their names hold a space, which no byte-level token holds,
so no merge ever produces them.

Bytes -> tokens, exactly: a document is decoded as UTF-8 with surrogateescape; each run of valid
UTF-8 is tokenized (ByteLevel maps it back to exactly its bytes) and each byte that is not valid
UTF-8 becomes the token of that byte alone (always in the vocabulary). So every token id stands for
a fixed byte string: `decode_bytes` is exact for any bytes (invalid UTF-8 and NUL included) and a
token's byte count is the length of that string.

Byte accounting (bits per *byte*, comparable with the byte models): `token_bytes` is the number of
text bytes a token covers; BOS covers 0 and EOS counts as 1, because the byte models predict EOS as
one target byte. The denominators of both kinds of model are then the same for the same documents
(text bytes + 1 per document), and loss = nats / bytes (bltjax.train.step).
"""

import functools
import json
import logging
import os
import re

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from bltjax.data import documents, mixture
from bltjax.data import shards as shards_lib
from bltjax.model import tokenizer
from bltjax.runtime import storage

FILE_NAME = "tokenizer.json"  # in the workdir, when tokenizer.path is None
SPECIALS = ("<|pad 0|>", "<|bos 1|>", "<|eos 2|>", "<|unused 3|>")  # ids 0..3
MIN_VOCAB = len(SPECIALS) + 256 + 1  # the specials, the 256 bytes and at least one merge
_PARALLELISM = "TOKENIZERS_PARALLELISM"  # the HF tokenizers' thread pool switch
_ESCAPED = re.compile("([\udc80-\udcff])")  # bytes that are not valid UTF-8 (surrogateescape)


@functools.cache
def byte_symbols() -> tuple[str, ...]:
  """The ByteLevel (GPT-2) symbol of each byte value: printable bytes stand for themselves, the
  others are shifted to U+0100 and up."""
  keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return tuple(out[b] for b in range(256))


def _pieces(data: bytes) -> list:
  """A document as its runs of valid UTF-8 (str) and its invalid bytes (int), in order."""
  text = data.decode("utf-8", errors="surrogateescape")
  if not _ESCAPED.search(text):  # valid UTF-8 (nearly every document)
    return [text] if text else []
  parts = _ESCAPED.split(text)  # text, escaped byte, text, ...
  return [p if i % 2 == 0 else ord(p) - 0xDC00 for i, p in enumerate(parts) if p]


class BPE:
  """A loaded tokenizer: `encode` bytes -> ids, `decode_bytes` ids -> bytes, and
  `token_bytes[id]` (int32 [V]): the bytes each id stands for (0 for the specials)."""

  def __init__(self, tok, path: str = "<memory>"):
    self.tok, self.path = tok, path
    self.vocab_size = tok.get_vocab_size()
    names = [tok.id_to_token(i) for i in range(self.vocab_size)]
    if tuple(names[:len(SPECIALS)]) != SPECIALS or tok.get_added_tokens_decoder():
      raise ValueError(f"{path}: not a bltjax BPE tokenizer: ids 0..3 must be {SPECIALS} (and no "
                       f"added tokens), got {names[:len(SPECIALS)]}; set tokenizer.path=None to "
                       "train one")
    char_to_byte = {c: b for b, c in enumerate(byte_symbols())}
    self.id_bytes = [b""] * len(SPECIALS)
    for i, name in enumerate(names[len(SPECIALS):], len(SPECIALS)):
      try:
        self.id_bytes.append(bytes(char_to_byte[c] for c in name))
      except KeyError:
        raise ValueError(f"{path}: token {i} {name!r} is not made of byte-level symbols") from None
    self.token_bytes = np.array([len(b) for b in self.id_bytes], np.int32)
    byte_ids = [tok.token_to_id(c) for c in byte_symbols()]
    if None in byte_ids:
      raise ValueError(f"{path}: some of the 256 byte tokens are missing from the vocabulary")
    self.byte_ids = np.array(byte_ids, np.int32)

  def encode(self, data: bytes) -> np.ndarray:
    """int32 ids of `data` (no BOS/EOS): `decode_bytes` gives `data` back exactly."""
    ids = []
    for p in _pieces(bytes(data)):
      if isinstance(p, int):
        ids.append(int(self.byte_ids[p]))
      else:
        ids.extend(self.tok.encode(p, add_special_tokens=False).ids)
    return np.asarray(ids, np.int32)

  def decode_bytes(self, ids) -> bytes:
    """The bytes of `ids`; the special ids stand for nothing."""
    return b"".join(self.id_bytes[int(i)] for i in ids)


def load(path: str) -> BPE:
  """The tokenizer saved at `path` (local or gs://)."""
  from tokenizers import Tokenizer  # noqa: PLC0415 (only token_lm runs need it)
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"tokenizer.path={path} does not exist")
  return BPE(Tokenizer.from_str(p.read_text()), str(path))


def training_documents(config, max_bytes: int):
  """Bytes of the first documents of the training split, unshuffled (the held-out documents are
  never read), `max_bytes` in all (the last one cut); with data.mixture, each source gives its
  share of `max_bytes` by weight."""
  comps = mixture.components(config.data)
  total = sum(c.weight for c in comps)
  for c in comps:
    left = int(max_bytes * c.weight / total) if len(comps) > 1 else int(max_bytes)
    docs = shards_lib.tokenized_documents(
        config.data, "train", seed=config.seed, process_index=0, process_count=1, shuffle=False,
        num_epochs=1, source=c.name if len(comps) > 1 else None)
    for doc in docs:
      if left <= 0:
        break
      data = (doc["tokens"][1:-1] - tokenizer.OFFSET).astype(np.uint8).tobytes()[:left]
      left -= len(data)
      yield data


def train_tokenizer(config, out_path: str) -> BPE:
  """Trains the BPE on the training split (tokenizer.train_bytes bytes) and saves it."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
  vocab = int(config.model.vocab_size)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  seen = dict(bytes=0, docs=0)

  def texts():
    for data in training_documents(config, config.tokenizer.train_bytes):
      seen["bytes"] += len(data)
      seen["docs"] += 1
      yield from (p for p in _pieces(data) if isinstance(p, str))

  # One thread: as fast on a few cores, and no thread pool is left running in the trainer (with
  # one, grain's worker batches in flight at exit were reported as leaked shared memory).
  old = os.environ.get(_PARALLELISM)
  os.environ[_PARALLELISM] = "false"
  try:
    tok.train_from_iterator(texts(), trainer)
  finally:
    if old is None:
      del os.environ[_PARALLELISM]
    else:
      os.environ[_PARALLELISM] = old
  if tok.get_vocab_size() != vocab:
    raise ValueError(f"tokenizer: BPE training on {seen['bytes']} bytes found only "
                     f"{tok.get_vocab_size()} tokens, fewer than model.vocab_size={vocab}: raise "
                     "tokenizer.train_bytes or lower model.vocab_size")
  spec = json.loads(tok.to_str())
  spec["added_tokens"] = []  # the specials stay vocabulary entries only (see the docstring)
  text = json.dumps(spec, ensure_ascii=False)
  out = epath.Path(out_path)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  tmp.rename(out)  # readers never see half a file
  logging.info("tokenizer: trained a %d-token BPE on %d bytes of %d training documents: %s",
               vocab, seen["bytes"], seen["docs"], out_path)
  return load(out_path)


def _check_vocab(bpe: BPE, config):
  if bpe.vocab_size != config.model.vocab_size:
    raise ValueError(f"tokenizer {bpe.path} has {bpe.vocab_size} tokens but "
                     f"model.vocab_size={config.model.vocab_size}")


def ensure_tokenizer(config, workdir: str) -> str:
  """The path of the run's tokenizer: tokenizer.path as is, else WORKDIR/tokenizer.json, trained
  by process 0 when missing (other processes wait for it). Checks its vocabulary size."""
  if config.tokenizer.path:
    _check_vocab(load(config.tokenizer.path), config)
    return config.tokenizer.path
  path = storage.join(storage.abspath(workdir), FILE_NAME)
  if jax.process_index() == 0:
    if epath.Path(path).exists():
      logging.info("tokenizer: reusing %s", path)
    else:
      train_tokenizer(config, path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("bltjax: tokenizer ready")
  _check_vocab(load(path), config)
  return path


def mean_bytes_per_token(config, path: str, max_bytes: int) -> float:
  """Bytes per token on the first `max_bytes` bytes of training documents, as the loss counts
  them: (text bytes + 1 EOS per document) / (tokens + EOS), BOS excluded (never a target)."""
  bpe = load(path)
  n_bytes = n_tokens = 0
  for data in training_documents(config, max_bytes):
    n_bytes += len(data) + 1
    n_tokens += len(bpe.encode(data)) + 1
  if not n_tokens:
    raise ValueError("mean_bytes_per_token: no training documents")
  return n_bytes / n_tokens


class DocumentToBPE(documents.DocumentToTokens):
  """Document -> {"tokens": BOS + BPE ids + EOS, "doc_flags" (as `DocumentToTokens`),
  "token_bytes": int32 bytes per token (BOS 0, EOS 1)}. Holds the tokenizer's path and loads it
  on first use, in whichever (grain worker) process maps."""

  def __init__(self, path: str):
    super().__init__()
    self.path, self._bpe = path, None

  def __getstate__(self):
    return self.__dict__ | {"_bpe": None}

  def map(self, element) -> dict[str, np.ndarray]:
    doc_bits = super().map(element)["doc_flags"][0]  # the byte tokens are not used
    if self._bpe is None:
      self._bpe = load(self.path)
    ids = self._bpe.encode(element[0])
    tokens = np.concatenate([[tokenizer.BOS_ID], ids, [tokenizer.EOS_ID]]).astype(np.int32)
    token_bytes = self._bpe.token_bytes[tokens]
    token_bytes[-1] = 1  # EOS: one target byte, as in the byte models
    doc_flags = np.zeros(tokens.shape, np.int8)
    doc_flags[0] = doc_bits
    return {"tokens": tokens, "doc_flags": doc_flags, "token_bytes": token_bytes}
