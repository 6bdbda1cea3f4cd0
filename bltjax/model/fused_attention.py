"""Self-attention's one entry point, `self_attention`, and the fused kernels behind it.

Every self-attention of the product goes through `self_attention`: the latent transformer
(block-causal over patches, documents split after EOS), the local encoder and decoder and the
entropy model (sliding window, documents), in training, accelerator patching, preprocessing and
generation's prefill. Cached decode steps stay `attention.cached_attention` (one query per row).

`model.runtime.attention` picks the backend. It changes how, never what, is computed (params and
checkpoints are the same whatever it is):

  xla     `attention.local_attention`: blockwise XLA, O(N·window), flash-style custom VJP.
  splash  Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): one fused
          kernel per head group, a `CausalMask` or a causal `LocalMask` for the window and
          `SegmentIds` for documents; blocks the mask leaves empty are skipped. A TPU kernel; on
          any other platform it runs in Pallas interpret mode (slow, but the same kernel, so it
          is tested on CPU against xla).
  cudnn   cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`) on a
          GPU: causal, `local_window_size` for the window, documents through a boolean mask.
  auto    splash on TPU; cudnn on GPU where its constraints hold, else xla with one warning
          naming the reason; xla elsewhere.

Conventions, whatever the backend (as `bltjax.model.attention`): query i sees key j iff they are
in the same segment and i - window < j <= i; softmax statistics are fp32; a query always sees
itself, so no row is empty. Under a mesh (`runtime.sharding.mesh_context`), the fused kernels run
per device in `shard_map`, over the batch axes and, where the head counts divide, the tensor axis:
a custom call is not partitioned by XLA.
"""

import contextlib
import contextvars
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from bltjax.model import attention
from bltjax.model.config import ATTENTION_BACKENDS, RuntimeConfig

LANES = 128  # splash blocks are multiples of the TPU's 128 lanes; rows are padded to a block
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention's input dtypes
CUDNN_HEAD_DIMS = (64, 128, 256)  # head dims its kernels cover for training (and multiples of 8)
# cuDNN takes documents as a [N, N] boolean mask: above this many keys per row, it costs more
# memory than the attention it replaces, and `auto` keeps xla.
CUDNN_MAX_MASKED_KEYS = 8192


_TARGET = contextvars.ContextVar("bltjax_attention_target", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
  """Inside: kernels are chosen and built for `platform` ('tpu', 'gpu', 'cpu'), not for the
  process's own backend: `bltjax.aot` compiles a TPU step on a CPU host (splash as a Mosaic
  kernel, not in interpret mode)."""
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def target_platform() -> str:
  """The platform the kernels are built for: `compiling_for`'s, else JAX's default backend."""
  return _TARGET.get() or jax.default_backend()


def resolve(backend: str, *, head_dim: int, dtype, length: int) -> tuple[str, str | None]:
  """(the backend that runs, the reason when `auto` on a GPU falls back to xla)."""
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(f"model.runtime.attention={backend!r} must be one of {ATTENTION_BACKENDS}")
  if backend != "auto":
    return backend, None
  platform = target_platform()
  if platform == "tpu":
    return "splash", None
  if platform == "gpu":
    why = cudnn_unsupported(head_dim=head_dim, dtype=dtype, length=length)
    return ("xla", why) if why else ("cudnn", None)
  return "xla", None


def cudnn_unsupported(*, head_dim: int, dtype, length: int) -> str | None:
  """Why cuDNN flash attention cannot run this attention (None: it can)."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
    return f"cuDNN flash attention needs bfloat16 or float16 inputs, not {jnp.dtype(dtype)}"
  if head_dim not in CUDNN_HEAD_DIMS:
    return f"cuDNN flash attention covers head dims {CUDNN_HEAD_DIMS}, not {head_dim}"
  if length > CUDNN_MAX_MASKED_KEYS:
    return (f"documents go to cuDNN as an [N, N] mask; N={length} is above "
            f"{CUDNN_MAX_MASKED_KEYS}")
  return None


@functools.lru_cache(maxsize=None)
def _warn_once(where: str, reason: str):
  logging.warning("model.runtime.attention='auto': xla attention for %s: %s", where, reason)


def self_attention(q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN, *, window: int | None,
                   rt: RuntimeConfig):
  """Causal self-attention within segments (documents) and the window, by `rt.attention`.
  Queries and keys are at row positions 0..N-1. Returns [B, N, H, E] in q's dtype."""
  n, e = q_BxNxHxE.shape[1], q_BxNxHxE.shape[-1]
  backend, why = resolve(rt.attention, head_dim=e, dtype=q_BxNxHxE.dtype, length=n)
  if why:
    _warn_once(f"window {window}" if window else "the latent transformer", why)
  if backend == "xla":
    return attention.local_attention(q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN,
                                      window=window, chunk=rt.chunk_for(window),
                                      loop=rt.attn_loop)
  if backend == "splash":
    kernel = functools.partial(splash_attention, window=window, block=rt.attn_block,
                               interpret=target_platform() != "tpu")
  else:
    kernel = functools.partial(cudnn_attention, window=window)
  return _per_device(kernel, q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN)


def _per_device(kernel, q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN):
  """`kernel` on each device's rows (and heads) under the current mesh; directly without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN)
  batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", "act_heads", None))
  b, _, h, _ = q_BxNxHxE.shape
  # Rows and heads are split over the mesh axes whose sizes divide them (a held-out snippet of
  # one row stays whole on every device); the kernel needs whole heads and rows per device.
  batch = _dividing(mesh, batch, b)
  heads = _dividing(mesh, heads, math.gcd(h, k_BxNxKxE.shape[2]))
  qkv, seg = P(batch, None, heads, None), P(batch, None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                       check_vma=False)(q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN)


def _dividing(mesh, axes, size: int):
  """The longest prefix of the mesh axes `axes` (a name, a tuple or None) whose product divides
  `size`, or None."""
  axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  kept, product = [], 1
  for a in axes:
    if size % (product * mesh.shape[a]):
      break
    kept.append(a)
    product *= mesh.shape[a]
  return tuple(kept) if len(kept) > 1 else (kept[0] if kept else None)


# -- splash (TPU; Pallas interpret mode elsewhere) ------------------------------------------------


def splash_block(length: int, block: int) -> int:
  """The splash block for rows of `length`: `block` (a multiple of 128), or the row rounded up to
  128 lanes when shorter."""
  if block % LANES:
    raise ValueError(f"model.runtime.attn_block={block} must be a multiple of {LANES}")
  return min(block, -(-length // LANES) * LANES)


def _splash_kernel(length: int, window: int | None, group: int, block: int, interpret: bool):
  """The kernel for padded rows of `length` and `group` query heads per KV head (MQA for a group
  of several, else MHA for one head). Built in each trace: its mask tables become constants of
  that trace (splash caches the numpy work of `process_mask` per mask and block shape)."""
  shape = (length, length)
  mask = (masks.CausalMask(shape) if window is None
          else masks.LocalMask(shape, window_size=(window - 1, 0), offset=0))
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  make = splash.make_splash_mqa_single_device if group > 1 else splash.make_splash_mha_single_device
  # Its output and row log-sum-exp are tagged 'context' (as the xla path's output is, in
  # SelfAttention): a remat policy that keeps the context also keeps what the backward kernels
  # need, so the forward kernel is not run again.
  return make(masks.MultiHeadMask([mask] * group), block_sizes=sizes, interpret=interpret,
              residual_checkpoint_name="context")


def splash_attention(q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN, *, window: int | None,
                     block: int, interpret: bool):
  """Splash attention on one device's rows. Rows are padded to a whole block (padding is a
  segment of its own, dropped after). One kernel call per KV head: the MQA kernel over its G =
  H / K query heads (GQA), or the MHA kernel over one head when G = 1."""
  b, n, h, e = q_BxNxHxE.shape
  num_kv = k_BxNxKxE.shape[2]
  g = h // num_kv
  blk = splash_block(n, block)
  n_pad = -(-n // blk) * blk
  pad = [(0, 0), (0, n_pad - n), (0, 0), (0, 0)]
  q = jnp.pad(q_BxNxHxE * (e**-0.5), pad)  # splash does not scale the scores
  k, v = jnp.pad(k_BxNxKxE, pad), jnp.pad(v_BxNxKxE, pad)
  seg = jnp.pad(segment_ids_BxN, [(0, 0), (0, n_pad - n)], constant_values=-1)
  kernel = _splash_kernel(n_pad, window, g, blk, interpret)

  def one_row(q_KxGxNxE, k_KxNxE, v_KxNxE, seg_N):
    ids = splash.SegmentIds(q=seg_N, kv=seg_N)

    def one_kv_head(q_GxNxE, k_NxE, v_NxE):
      if g == 1:  # the MHA kernel, one head: [1, N, E] against [1, N, E]
        return kernel(q_GxNxE, k_NxE[None], v_NxE[None], segment_ids=ids)
      return kernel(q_GxNxE, k_NxE, v_NxE, segment_ids=ids)  # MQA: G heads share k and v
    return jax.vmap(one_kv_head)(q_KxGxNxE, k_KxNxE, v_KxNxE)

  q = q.reshape(b, n_pad, num_kv, g, e).transpose(0, 2, 3, 1, 4)  # [B, K, G, N, E]
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, N, E]
  o = jax.vmap(one_row)(q, k, v, seg)  # [B, K, G, N, E]
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, n_pad, h, e)[:, :n]
  return o.astype(q_BxNxHxE.dtype)


# -- cuDNN (GPU) ----------------------------------------------------------------------------------


def cudnn_attention(q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, segment_ids_BxN, *, window: int | None):
  """cuDNN flash attention on one device's rows: causal, the window as cuDNN's sliding window,
  documents as a boolean [B, 1, N, N] mask (True = may attend)."""
  same_doc = segment_ids_BxN[:, :, None] == segment_ids_BxN[:, None, :]
  return jax.nn.dot_product_attention(
      q_BxNxHxE, k_BxNxKxE, v_BxNxKxE, mask=same_doc[:, None], is_causal=True,
      local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")
