"""A bltjax BLT as a model for EleutherAI's lm-evaluation-harness (`lm_eval`), named "bltjax".

    from lm_eval import simple_evaluate
    from bltjax.inference.harness import BLTLM
    simple_evaluate(model=BLTLM(checkpoint="DIR", batch_size=8), tasks=["arc_easy"])

or `python -m bltjax.evaluate --checkpoint=DIR --tasks=arc_easy` (bltjax.inference.lm_evaluation:
the task checks, the results table and JSON).

Requests are scored in bytes: a row is [BOS] + context + continuation as UTF-8 bytes, patched as
a whole as in training (`BLT.logits`); a continuation's log-likelihood is the sum of its bytes'
log-probs. Rows are sorted by length and batched with fixed shapes (length and patch-count
buckets, batches padded to `batch_size` rows) so jit compiles a bounded number of programs;
padding follows the real bytes, and the model is causal, so it does not change the results.
A request longer than the context is an error unless `truncate_context=True` (the context then
keeps its last bytes, as lm-eval's HF model does). `max_gen_toks` counts bytes.
"""

import math

import numpy as np
from absl import logging
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from bltjax.inference.api import BLT
from bltjax.model import tokenizer
from bltjax.runtime import errors

MIN_BUCKET = 64  # shortest padded row and smallest patch count: fewer programs to compile
DEFAULT_MAX_GEN_BYTES = 256
_KNOWN_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p",
                     "repetition_penalty", "seed")


class ContextTooLong(errors.Error):
  """A request needs more bytes than the model's context (names the task and the lengths)."""


def bucket(n: int, cap: int) -> int:
  """The padded size for n: the next power of two (at least MIN_BUCKET), at most `cap`."""
  return min(cap, max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(n, 1))))))


def _ids(text: str) -> np.ndarray:
  return tokenizer.encode(text, add_bos=False, add_eos=False)


def _where(req, i: int) -> str:
  task, doc = getattr(req, "task_name", None), getattr(req, "doc_id", None)
  if task is None:
    return f"request {i}"
  return f"task {task!r}" + ("" if doc is None else f" doc {doc}")


def _patches_of_rows(lengths: np.ndarray, row_lengths: list[int], n: int) -> np.ndarray:
  """The patches [B, P] of end-padded rows: each row's own patches, as if unpadded (patching is
  causal), up to the one that may start right after its last input (its logits see whether the
  next byte starts a patch); that last one stretched over the padding, then zero-length patches
  up to a bucketed P, so that the patch count takes few values."""
  starts = np.cumsum(lengths, axis=1) - lengths  # where each patch starts
  out = []
  for r, real in enumerate(row_lengths):
    keep = lengths[r][(lengths[r] > 0) & (starts[r] <= real)].copy()
    keep[-1] = n + 1 - starts[r][len(keep) - 1]  # rows sum to n + 1 (reference convention)
    out.append(keep)
  p = min(n + 1, bucket(max(len(k) for k in out), n + 1))
  padded = np.zeros((len(out), p), np.int32)
  for r, keep in enumerate(out):
    padded[r, :len(keep)] = keep
  return padded


@register_model("bltjax")
class BLTLM(LM):
  """lm-eval model over a bltjax BLT (a training workdir, an exported model or an HF BLT dir)."""

  def __init__(self, checkpoint: str | None = None, batch_size: int | str = 8,
               max_length: int | None = None, dtype: str = "float32",
               entropy_dir: str | None = None, truncate_context: bool = False, seed: int = 0,
               blt: BLT | None = None, **unused):
    super().__init__()
    for key in ("max_batch_size", "device"):  # passed by lm-eval's CLI; meaningless here
      unused.pop(key, None)
    if unused:
      raise ValueError(f"unknown bltjax model argument(s): {', '.join(sorted(unused))}")
    if (checkpoint is None) == (blt is None):
      raise ValueError("give the bltjax model a checkpoint (model_args checkpoint=DIR)")
    self.blt = blt if blt is not None else BLT.load(str(checkpoint), dtype=dtype,
                                                    entropy_dir=entropy_dir)
    if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
      batch_size = 8  # no automatic batch size search: shapes are fixed per bucket anyway
    self.batch_size = int(batch_size)
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    context = int(self.blt.max_context)
    self.max_length = context if max_length in (None, "") else int(max_length)
    if not 2 <= self.max_length <= context:
      raise ValueError(f"max_length={self.max_length} is outside [2, {context}] (the model's "
                       f"context is {context} bytes)")
    self.truncate_context = str(truncate_context).lower() in ("true", "1", "yes")
    self.seed = int(seed)
    self.truncated = 0  # requests whose context was cut (truncate_context=True)

  # -- scoring ------------------------------------------------------------------------------------

  def _logprobs(self, rows: list[tuple[np.ndarray, np.ndarray]], desc: str):
    """rows: (input ids [L], target ids [k]): the last k inputs predict the targets. Returns
    [(sum of the targets' log-probs, every target is the argmax)] in the order of `rows`."""
    out = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: OOM early
    bs = self.batch_size
    with tqdm(total=len(rows), desc=desc, disable=None) as bar:
      for start in range(0, len(order), bs):
        idx = order[start:start + bs]
        n = bucket(max(len(rows[i][0]) for i in idx), self.max_length)
        tokens = np.full((bs, n), tokenizer.PAD_ID, np.int32)
        tokens[:, 0] = tokenizer.BOS_ID  # filler rows: [BOS] + padding
        for r, i in enumerate(idx):
          tokens[r, :len(rows[i][0])] = rows[i][0]
        lengths = _patches_of_rows(self.blt.patch_lengths(tokens),
                                   [len(rows[i][0]) for i in idx] + [1] * (bs - len(idx)), n)
        logits = self.blt.logits(tokens, lengths)
        for r, i in enumerate(idx):
          inputs, targets = rows[i]
          end, k = len(inputs), len(targets)
          lg = logits[r, end - k:end].astype(np.float64)
          m = lg.max(-1, keepdims=True)
          logp = lg - m - np.log(np.exp(lg - m).sum(-1, keepdims=True))
          out[i] = (float(logp[np.arange(k), targets].sum()),
                    bool((lg.argmax(-1) == targets).all()))
        bar.update(len(idx))
    return out

  def _row(self, context: np.ndarray, continuation: np.ndarray, where: str):
    """[BOS] + context + continuation as (inputs, targets), left-truncated to max_length when
    allowed; context may already start with BOS (rolling windows)."""
    full = np.concatenate([context, continuation]).astype(np.int32)
    k, n = len(continuation), len(full) - 1
    if n > self.max_length:
      if k > self.max_length:
        raise ContextTooLong(f"{where}: its continuation alone is {k} bytes, more than the "
                             f"model's context of {self.max_length} bytes")
      if not self.truncate_context:
        raise ContextTooLong(
            f"{where}: the request is {n} bytes (context {n - k}, continuation {k}), more than "
            f"the model's context of {self.max_length} bytes (the task asks for more context "
            "than the model has; --truncate_context / truncate_context=True keeps the "
            "context's last bytes)")
      self.truncated += 1
      full = full[-(self.max_length + 1):]
    return full[:-1], full[1:][-k:]

  def _log_truncated(self, before: int):
    if self.truncated > before:
      logging.warning("truncate_context: %d request(s) longer than the context (%d bytes) kept "
                      "only their last bytes", self.truncated - before, self.max_length)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    del disable_tqdm
    bos = np.array([tokenizer.BOS_ID], np.int32)
    before, rows, keep = self.truncated, [], []
    results = [(0.0, True)] * len(requests)  # an empty continuation: log 1
    for i, req in enumerate(requests):
      context, continuation = req.args[0], req.args[1]
      cont = _ids(continuation)
      if len(cont):
        rows.append(self._row(np.concatenate([bos, _ids(context)]), cont, _where(req, i)))
        keep.append(i)
    self._log_truncated(before)
    for i, res in zip(keep, self._logprobs(rows, "bltjax loglikelihood")):
      results[i] = res
    for req, res in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", req.args, res)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each document's total log-likelihood (nats) over lm-eval's disjoint rolling windows of
    max_length bytes (BOS before the first), so documents longer than the context work."""
    del disable_tqdm
    rows, owner = [], []
    for i, req in enumerate(requests):
      windows = lm_utils.get_rolling_token_windows(
          token_list=_ids(req.args[0]).tolist(), prefix_token=tokenizer.BOS_ID,
          max_seq_len=self.max_length, context_len=1)
      for context, continuation in map(lm_utils.make_disjoint_window, windows):
        rows.append(self._row(np.asarray(context, np.int32), np.asarray(continuation, np.int32),
                              _where(req, i)))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, self._logprobs(rows, "bltjax loglikelihood_rolling")):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # -- generation ---------------------------------------------------------------------------------

  def _sampling(self, kwargs: dict) -> dict:
    """gen_kwargs -> generate_bytes arguments (max_gen_toks in bytes; greedy unless sampling)."""
    unknown = sorted(set(kwargs) - set(_KNOWN_GEN_KWARGS))
    if unknown:
      logging.warning("bltjax ignores the generation argument(s) %s", ", ".join(unknown))
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(kwargs.get("max_gen_toks") or DEFAULT_MAX_GEN_BYTES)
    if not 1 <= max_new < self.max_length:
      raise ValueError(f"max_gen_toks={max_new} (bytes) must be in [1, {self.max_length}) for "
                       f"the model's context of {self.max_length} bytes")
    temperature = float(kwargs.get("temperature") or 0.0)
    do_sample = kwargs.get("do_sample")
    if do_sample is False or str(do_sample).lower() == "false":
      temperature = 0.0
    elif do_sample and temperature == 0.0:
      temperature = 1.0
    return dict(until=[u for u in until if u], max_new=max_new, temperature=temperature,
                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
                seed=int(kwargs.get("seed", self.seed)))

  def _generate(self, prompts: list[bytes], s: dict) -> list[bytes]:
    """One batch through BLT.generate_bytes, rows padded to batch_size and the length of the
    row (prompt + new bytes) to a bucket, so jit compiles a bounded number of programs. The
    bytes past max_gen_toks that the bucket allows are cut off by the caller (a stop sequence
    that would have crossed max_gen_toks then also cuts its first bytes, a negligible case)."""
    rows = list(prompts) + [prompts[-1]] * (self.batch_size - len(prompts))
    longest = 1 + max(len(p) for p in rows)
    cap = min(self.max_length, int(self.blt.max_context))
    room = max(s["max_new"], bucket(longest + s["max_new"], cap) - longest)
    stop = tuple(u.encode("utf-8", "surrogateescape") for u in s["until"])
    out = self.blt.generate_bytes(rows, max_new_bytes=room, temperature=s["temperature"],
                                  top_p=s["top_p"], seed=s["seed"], stop_at_eos=True,
                                  top_k=s["top_k"], stop=stop,
                                  repetition_penalty=s["repetition_penalty"])
    return out[:len(prompts)]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    results = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):  # one batch shape and sampling setup per gen_kwargs
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    before = self.truncated
    bar = tqdm(total=len(requests), desc="bltjax generate_until", disable=None)
    for idx in groups.values():
      s = self._sampling(requests[idx[0]].args[1])
      room = self.max_length - s["max_new"] - 1  # prompt bytes that fit after BOS
      prompts = {}
      for i in idx:
        prompt = _ids(requests[i].args[0])
        if len(prompt) > room:
          if not self.truncate_context:
            raise ContextTooLong(
                f"{_where(requests[i], i)}: the prompt is {len(prompt)} bytes, with "
                f"max_gen_toks={s['max_new']} more than the model's context of "
                f"{self.max_length} bytes (--truncate_context / truncate_context=True keeps its "
                "last bytes)")
          self.truncated += 1
          prompt = prompt[len(prompt) - room:]
        prompts[i] = tokenizer.decode_bytes(prompt)
      idx = sorted(idx, key=lambda i: -len(prompts[i]))
      for start in range(0, len(idx), self.batch_size):
        batch = idx[start:start + self.batch_size]
        outs = self._generate([prompts[i] for i in batch], s)
        for i, raw in zip(batch, outs):
          text = raw[:s["max_new"]].decode("utf-8", errors="replace")
          for stop in s["until"]:  # lm-eval's convention: cut at the first stop string
            text = text.split(stop, 1)[0]
          results[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(len(batch))
    bar.close()
    self._log_truncated(before)
    return results
