"""`BLT`: the user-facing handle around a BLT, its entropy model and its patching settings.

    from bltjax import BLT, tokenizer
    blt = BLT.from_hf("path/to/blt-1b-hf")      # config.json + model.safetensors
    tokens = tokenizer.encode("Hello", add_eos=False)[None]   # int [B, N]
    blt.entropies(tokens)      # [B, N] nats
    blt.patch_lengths(tokens)  # [B, P], rows sum to N + 1 (reference convention), zero padded
    blt.logits(tokens)         # [B, N, 260] float32
"""

import functools
import logging
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath

from bltjax.checkpoint import checkpointer
from bltjax.inference import generator, sampling as sampling_lib
from bltjax.interop import hf, hf_config, meta
from bltjax.model import patching, tokenizer
from bltjax.model.blt import ByteLatentTransformer
from bltjax.model.config import BLTConfig, LMConfig, PatchingConfig, RuntimeConfig, to_dict
from bltjax.model.lm import TransformerLM, entropies_from_logits
from bltjax.runtime import sharding, storage


def param_shapes(module: nn.Module, *example_args) -> dict:
  """{param path: shape} of `module`, from abstract evaluation (nothing is allocated)."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args))
  flat = jax.tree_util.tree_flatten_with_path(sharding.unbox(abstract["params"]))[0]
  return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def blt_param_shapes(cfg: BLTConfig) -> dict:
  return param_shapes(ByteLatentTransformer(cfg), np.ones((1, 4), np.int32),
                      np.ones((1, 5), np.int32))


def entropy_param_shapes(cfg: LMConfig) -> dict:
  return param_shapes(TransformerLM(cfg), np.ones((1, 4), np.int32))


def _with_runtime(model: dict, dtype: str) -> dict:
  """Inference runtime: the requested compute dtype, fp32 params, no rematerialisation."""
  return dict(model, runtime=RuntimeConfig.for_inference(dtype))


def _as_tokens(tokens) -> np.ndarray:
  arr = np.asarray(tokens)
  if arr.ndim != 2:
    raise ValueError(f"tokens must be a 2-D int array [B, N], got shape {arr.shape}")
  if arr.shape[1] == 0:
    raise ValueError("tokens has no bytes (N == 0)")
  tokenizer.validate_ids(arr, name="tokens")
  return arr.astype(np.int32)


class BLT:
  """A BLT with its entropy model and patching settings; all methods take and return numpy."""

  def __init__(self, model_cfg: BLTConfig, params, *, patching_cfg: PatchingConfig,
               entropy_cfg: LMConfig | None = None, entropy_params=None,
               max_context: int = 24576):
    if patching_cfg.mode == "entropy" and entropy_params is None:
      raise ValueError("patching.mode='entropy' needs an entropy model (entropy_params is None)")
    self.config, self.entropy_config, self.patching_config = model_cfg, entropy_cfg, patching_cfg
    self.max_context = max_context  # bytes per row the model was trained/converted for
    self.model = ByteLatentTransformer(model_cfg)
    self.params = jax.device_put(params)
    self.entropy_model = TransformerLM(entropy_cfg) if entropy_cfg is not None else None
    self.entropy_params = None if entropy_params is None else jax.device_put(entropy_params)

  @classmethod
  def from_hf(cls, path: str, *, dtype: str = "float32") -> "BLT":
    """Loads a `transformers` BLT checkpoint directory (local or gs://), its entropy model
    ("patcher") included."""
    storage.check_access(path)
    runtime = RuntimeConfig.for_inference(dtype)
    hf_cfg = hf_config.read_config(path)
    model_cfg, entropy_cfg, patching_cfg = hf_config.configs_from_hf(hf_cfg, runtime)
    reader = hf.SafetensorsReader(path)
    maps = [hf.blt_key_map(model_cfg)]
    if entropy_cfg is not None:
      maps.append(hf.entropy_key_map(entropy_cfg))
    hf.check_tensor_names(reader, *maps, where=path)
    params = hf.load_params(reader, maps[0], blt_param_shapes(model_cfg), where=path)
    entropy_params = None
    if entropy_cfg is not None:
      entropy_params = hf.load_params(reader, maps[1], entropy_param_shapes(entropy_cfg),
                                      where=path)
    logging.info("Loaded BLT from %s (patching: %s)", path, patching_cfg)
    max_context = hf_config.max_context(hf_cfg)
    return cls(model_cfg, params, patching_cfg=patching_cfg, entropy_cfg=entropy_cfg,
               entropy_params=entropy_params, max_context=max_context)

  @classmethod
  def from_checkpoint(cls, path: str, *, dtype: str = "float32") -> "BLT":
    """Loads a training workdir (its latest checkpoint's params, no optimizer state) or a
    directory written by `BLT.save` / `python -m bltjax.export` / `python -m bltjax.convert`
    (local or gs://)."""
    storage.check_access(path)
    params, config, metadata, _ = checkpointer.load_params(path)
    if config.get("model_type") != "blt":
      raise ValueError(f"{path}: holds a {config.get('model_type')!r} model, not a BLT")
    model_cfg = BLTConfig.from_dict(_with_runtime(config["model"], dtype))
    fields = {k: v for k, v in config["patching"].items()
              if k in PatchingConfig.__dataclass_fields__}
    if fields.get("threshold") is None:
      fields["threshold"] = metadata.get("patching_threshold")
    patching_cfg = PatchingConfig.from_dict(fields)
    entropy_cfg = entropy_params = None
    if patching_cfg.mode == "entropy":
      recorded = (metadata.get("entropy_model") or {}).get("path")
      ent_path = checkpointer.resolve(storage.abspath(path), recorded) if recorded else \
          config["patching"].get("entropy_model_checkpoint")
      if not ent_path:
        raise ValueError(f"{path}: entropy patching, but no entropy model is recorded")
      entropy_params, ent_config, _, _ = checkpointer.load_params(ent_path)
      entropy_cfg = LMConfig.from_dict(_with_runtime(ent_config["model"], dtype))
    return cls(model_cfg, params, patching_cfg=patching_cfg, entropy_cfg=entropy_cfg,
               entropy_params=entropy_params, max_context=int(config["data"]["seq_len"]))

  @classmethod
  def from_meta(cls, path: str, entropy_dir: str | None = None, *,
                dtype: str = "float32") -> "BLT":
    """Loads a checkpoint as Meta publishes it (local or gs://): the hub format
    (facebook/blt-1b, -7b: config.json {"args": ...} + model.safetensors + train_args.json) or
    the consolidated one (facebook/blt: params.json + consolidated.pth, needs torch). The entropy
    model comes from `entropy_dir` (hub facebook/blt-entropy or consolidated), else from an
    entropy_model/ inside or beside `path`."""
    storage.check_access(path)
    got = meta.load(path, entropy_dir, dtype=dtype, blt_shapes=blt_param_shapes,
                    entropy_shapes=entropy_param_shapes)
    return cls(got["model_cfg"], got["params"], patching_cfg=got["patching_cfg"],
               entropy_cfg=got["entropy_cfg"], entropy_params=got["entropy_params"],
               max_context=got["max_context"])

  @classmethod
  def load(cls, path: str, *, entropy_dir: str | None = None, dtype: str = "float32") -> "BLT":
    """A Meta BLT directory (hub or consolidated format; `entropy_dir` as in `from_meta`), a
    Hugging Face BLT directory, an exported/converted model, or a training workdir (each local or
    gs://)."""
    storage.check_access(path)
    if meta.is_meta_dir(path):
      return cls.from_meta(path, entropy_dir, dtype=dtype)
    if entropy_dir is not None:
      raise ValueError(f"{path}: entropy_dir is only used for Meta-format checkpoints")
    root = epath.Path(path)
    if (root / "config.json").exists() and ((root / "model.safetensors").exists() or
                                           (root / "model.safetensors.index.json").exists()):
      return cls.from_hf(path, dtype=dtype)
    return cls.from_checkpoint(path, dtype=dtype)

  def save(self, directory: str, *, format: str = "orbax", dtype: str = "float32"):  # noqa: A002
    """`orbax`: params-only checkpoint + configs (`BLT.from_checkpoint`, training `init_from`);
    `hf`: config.json + model.safetensors for `transformers`' BltForCausalLM. `directory` may be
    local or gs://."""
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    cast = lambda tree: jax.tree.map(lambda x: np.asarray(x).astype(np_dtype), tree)  # noqa
    if format == "hf":
      hf.save_hf(directory, self.config, cast(self.params), self.patching_config,
                 self.entropy_config, None if self.entropy_params is None else
                 cast(self.entropy_params), dtype=np_dtype, max_context=self.max_context)
      return
    if format != "orbax":
      raise ValueError(f"format must be 'orbax' or 'hf', got {format!r}")
    metadata = {"patching_threshold": self.patching_config.threshold}
    if self.entropy_params is not None:
      ent_dir = storage.join(directory, "entropy_model")
      checkpointer.save_params(ent_dir, cast(self.entropy_params), dict(
          model_type="entropy_model", model=to_dict(self.entropy_config),
          data=dict(seq_len=self.max_context)), {})
      metadata["entropy_model"] = dict(path="entropy_model",
                                       sha256=checkpointer.params_hash(self.entropy_params))
    config = dict(model_type="blt", model=to_dict(self.config),
                  patching=to_dict(self.patching_config), data=dict(seq_len=self.max_context))
    checkpointer.save_params(directory, cast(self.params), config, metadata)

  # -- entropy model and patching ------------------------------------------------------------------

  @functools.cached_property
  def _entropies_fn(self):
    def fn(params, tokens):
      return entropies_from_logits(self.entropy_model.apply({"params": params}, tokens))
    return jax.jit(fn)

  def entropies(self, tokens) -> np.ndarray:
    """Next-byte entropies [B, N] in nats; H[b, t] is the entropy of byte t+1 given bytes 0..t."""
    if self.entropy_model is None:
      raise ValueError("this BLT has no entropy model")
    return np.asarray(self._entropies_fn(self.entropy_params, _as_tokens(tokens)))

  def patch_lengths(self, tokens) -> np.ndarray:
    """Patch lengths [B, P] with the checkpoint's patching settings; rows sum to N + 1."""
    tokens = _as_tokens(tokens)
    pc = self.patching_config
    if pc.mode == "entropy":
      return patching.patch_lengths_from_entropies(
          self.entropies(tokens), pc.threshold, monotonic=pc.monotonic,
          threshold_add=pc.threshold_add, max_patch_length=pc.max_patch_length)
    mask = patching.start_mask(pc.mode, tokens=tokens, patch_size=pc.patch_size,
                               max_patch_length=pc.max_patch_length)
    return patching.lengths_from_start_mask(mask)

  # -- the BLT -------------------------------------------------------------------------------------

  @functools.cached_property
  def _logits_fn(self):
    return jax.jit(lambda params, tokens, lengths: self.model.apply({"params": params}, tokens,
                                                                    lengths))

  def logits(self, tokens, patch_lengths=None) -> np.ndarray:
    """Next-byte logits [B, N, 260] (float32). Patches with the entropy model when not given."""
    tokens = _as_tokens(tokens)
    if patch_lengths is None:
      patch_lengths = self.patch_lengths(tokens)
    patch_lengths = np.asarray(patch_lengths)
    if patch_lengths.ndim != 2 or patch_lengths.shape[0] != tokens.shape[0]:
      raise ValueError(f"patch_lengths must be [B, P] with B={tokens.shape[0]} (the batch of "
                       f"tokens), got shape {patch_lengths.shape}")
    patching.validate_patch_lengths(patch_lengths, tokens.shape[1])
    return np.asarray(self._logits_fn(self.params, tokens, jnp.asarray(patch_lengths, jnp.int32)))

  # -- generation ---------------------------------------------------------------------------------

  @functools.cached_property
  def _generator(self):
    return generator.Generator(self.config, self.entropy_config, self.patching_config)

  @functools.cached_property
  def _jit_steps(self):
    gen = self._generator

    @functools.partial(jax.jit, static_argnames=("sampling", "recompute"), donate_argnums=(2,))
    def one(params, eparams, state, sampling, recompute=False):
      fn = gen.recompute_step if recompute else gen.step
      return fn(params, eparams, state, sampling)

    @functools.partial(jax.jit, static_argnames=("sampling", "recompute"), donate_argnums=(2,))
    def until_done(params, eparams, state, sampling, recompute=False):
      fn = gen.recompute_step if recompute else gen.step
      last = state.tokens.shape[1] - 1
      return jax.lax.while_loop(lambda s: (s.t < last) & ~jnp.all(s.done),
                                lambda s: fn(params, eparams, s, sampling), state)
    return one, until_done

  def generate_bytes(self, prompts, max_new_bytes: int = 256, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                     on_bytes=None, recompute: bool = False, *, top_k: int = 0, stop=(),
                     repetition_penalty: float = 1.0) -> list[bytes]:
    """Continues each prompt (str or bytes) by up to `max_new_bytes` bytes.

    Greedy by default; `temperature` > 0 samples, among the `top_k` most likely bytes (0 = all)
    and then within the `top_p` nucleus, reproducibly for a `seed`. `repetition_penalty` (HF/CTRL,
    1.0 = off) divides the positive logits and multiplies the negative ones of the bytes already
    in the row, greedy included. A row stops at EOS with `stop_at_eos` (EOS excluded), and once
    its generated bytes end with one of the `stop` sequences (str as UTF-8, or bytes; a single
    one or a sequence): the output ends before the earliest stop sequence (OpenAI convention);
    prompt bytes never count towards a match. Special ids are dropped from the output.
    `on_bytes(chunk)` streams row 0's bytes as they are produced (bytes that may begin a stop
    sequence are held back until they cannot). `recompute=True` re-runs the whole model on the
    prefix for every byte (the reference's way, for comparison). An empty prompt generates from
    BOS; a prompt too long for the context keeps its last bytes.
    """
    sampling = sampling_lib.make_sampling(temperature, top_p, stop_at_eos, top_k,
                                          repetition_penalty)
    stops = sampling_lib.encode_stops(stop, self.max_context)
    tokens, lengths = generator.prepare_prompts(prompts, max_new_bytes, self.max_context,
                                                log=logging.warning)
    state = self._generator.init_state(tokens, lengths, seed, sampling_lib.stop_arrays(stops))
    one, until_done = self._jit_steps
    eparams = self.entropy_params if self.entropy_params is not None else {}
    if on_bytes is None:
      state = until_done(self.params, eparams, state, sampling, recompute=recompute)
    else:
      last = tokens.shape[1] - 1
      row0, sent = [], 0  # row 0's generated ids; how many of them went to on_bytes
      while int(state.t) < last:
        state = one(self.params, eparams, state, sampling, recompute=recompute)
        t = int(state.t)
        if lengths[0] <= t < lengths[0] + max_new_bytes and not bool(state.done[0]):
          row0.append(int(state.tokens[0, t]))
          safe = len(row0) - sampling_lib.held_back(row0, stops)
          if safe > sent:
            chunk = tokenizer.decode_bytes(np.array(row0[sent:safe], np.int32))
            sent = safe
            if chunk:
              on_bytes(chunk)
        if bool(jnp.all(state.done)):
          break
    out = generator.generated_ids(np.asarray(state.tokens), lengths, int(state.t),
                                  max_new_bytes, stop_at_eos, stops)
    if on_bytes is not None and len(out[0]) > sent:  # held back for a stop that never came
      tail = tokenizer.decode_bytes(out[0][sent:])
      if tail:
        on_bytes(tail)
    return [tokenizer.decode_bytes(ids) for ids in out]

  def generate(self, prompts, max_new_bytes: int = 256, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True, *, top_k: int = 0,
               stop=(), repetition_penalty: float = 1.0) -> list[str]:
    """Like `generate_bytes`, decoded as UTF-8 (invalid sequences become U+FFFD)."""
    return [b.decode("utf-8", errors="replace")
            for b in self.generate_bytes(prompts, max_new_bytes, temperature, top_p, seed,
                                         stop_at_eos, top_k=top_k, stop=stop,
                                         repetition_penalty=repetition_penalty)]


def stream_generation(blt: BLT, prompt: str, *, file=None, **options) -> bytes:
  """Writes `prompt`, then its continuation as `blt.generate_bytes` produces it, to `file`
  (default stdout), one complete UTF-8 character at a time (what `python -m bltjax.generate`
  prints). `options` are generate_bytes'. Returns the generated bytes."""
  file = sys.stdout if file is None else file
  file.write(prompt)
  file.flush()
  pending = b""

  def on_bytes(chunk):  # a character split across chunks waits for its last byte
    nonlocal pending
    pending += chunk
    text = pending.decode("utf-8", errors="ignore")
    keep = len(pending) - len(text.encode("utf-8"))
    if 0 < keep < 4 and pending[-keep:].decode("utf-8", errors="replace") == "\ufffd":
      pending = pending[-keep:]
    else:
      text, pending = pending.decode("utf-8", errors="replace"), b""
    file.write(text)
    file.flush()

  out = blt.generate_bytes([prompt.encode("utf-8", "surrogateescape")], on_bytes=on_bytes,
                           **options)[0]
  if pending:
    file.write(pending.decode("utf-8", errors="replace"))
  file.write("\n")
  file.flush()
  return out
