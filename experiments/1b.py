"""BLT-1B as released by Meta ("blt-1b"): 4.53B parameters, 3.07B of them in hash n-gram tables.

    python -m bltjax.main --config=experiments/1b.py --config.data.source=jsonl \
        --config.data.paths="('/data/corpus/*.jsonl',)"
    python -m bltjax.main --config=experiments/1b.py:tiny      # same structure, smoke-run size

Architecture from the released checkpoint (docs/reference-notes.md §2); optimizer from the paper
(§4.8); rows of 16k bytes (the paper's BLT-1T runs average 16k-byte contexts). Corpus, input
pipeline and schedule are the entropy model's (experiments/entropy_model.py), written once there;
experiments/8b.py is this file with the 8B's sizes.
"""

import copy
import os

import ml_collections
from ml_collections.config_dict import placeholder

from bltjax.train import experiment


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.model_type = "blt"
  c.init_from = placeholder(str)  # start from these params (python -m bltjax.convert/export
                                  # output, or a workdir); its entropy model cuts the patches
  encoder = dict(dim=1024, n_layers=1, n_heads=16, n_kv_heads=16,  # local encoder
                 ffn_dim=2816,          # int(2*4*1024/3) rounded up to 256
                 rope_theta=500000.0, norm_eps=1e-5,
                 attn_window=512)       # 512-byte sliding window (paper)
  c.model = dict(
      encoder=encoder,
      latent=dict(dim=2048, n_layers=25, n_heads=16, n_kv_heads=16,  # latent transformer
                  ffn_dim=5632, rope_theta=500000.0, norm_eps=1e-5,
                  attn_window=placeholder(int)),  # block-causal over all patches
      decoder=dict(encoder, n_layers=9),   # local decoder: the encoder's stack, 9 layers
      cross_attn_k=2,                      # k*D_E = 2048 = D_G: no latent input projection
      cross_attn_nheads=16,                # the local head count (as the HF conversion)
      cross_attn_all_layers_encoder=False,  # one encoder layer: CA after it
      cross_attn_all_layers_decoder=True,   # CA before every decoder layer
      hash_group_sizes=(3, 4, 5, 6, 7, 8),  # byte n-grams with hash embeddings
      hash_vocab=500002,                    # rows per table
      hash_functions=1,
      runtime=dict(dtype="bfloat16", param_dtype="float32",
                   # keep every projection and the attention context (splash's residuals
                   # too): only norms, RoPE and SiLU are recomputed. Chosen by AOT memory:
                   # 8B on v5p-256 needs 25.2 GiB of 95 per chip with it (docs/accelerators.md)
                   remat_policy="minimal_with_context",
                   attention="auto",  # splash on TPU, cuDNN on GPU where it applies, xla on CPU
                   attn_block=512,  # splash blocks of 512 rows (the local window; latent: 512)
                   attn_chunk=128,  # xla: local attention in 128-query blocks (divides the window)
                   attn_loop=False,  # all blocks as one batched op (accelerators)
                   scan_unroll=1))  # rolled layer loops: compile time independent of depth
  c.patching = dict(
      mode="entropy",
      threshold=1.335442066192627,  # the released global threshold (nats)
      target_patch_size=placeholder(float),  # only used when threshold is None
      threshold_add=placeholder(float),
      monotonic=False,
      patch_size=placeholder(int),
      max_patch_length=placeholder(int),
      max_patches=4096,             # per row: 16384 bytes at ~4.5 bytes/patch need ~3640
      device="accelerator",         # where patches are cut: "host" | "accelerator"
                                    # (the entropy model runs on the mesh, one batch ahead)
      entropy_model_checkpoint=placeholder(str))  # None: stage 1 trains experiments/entropy_model
  # Stage 1, the released entropy model. Its corpus, input pipeline and schedule are this
  # stage's too, with longer rows and larger batches.
  c.entropy_model = experiment.load(os.path.join(os.path.dirname(__file__), "entropy_model.py"))
  c.data = copy.deepcopy(c.entropy_model.data)
  c.data.update(seq_len=16384,  # bytes per row
                num_workers=16)  # grain workers per host (they run the entropy model)
  c.train = copy.deepcopy(c.entropy_model.train)
  c.train.update(
      batch_size=1024,          # 1024 x 16k bytes = 16.8M bytes per step (paper: ~16M)
      microbatches=placeholder(int),  # None: they follow from rows_per_device, device count
      rows_per_device=1,        # 1 row of 16k bytes per device per pass: 8 microbatches on
                                # v5p-256 (128 chips), 4 on v6e-256, 16 on 64 GPUs, 128 on 8
      checkpoint_every=1_000,
      entropy_figure=True)      # at each evaluation, log the next-byte entropy and patches of a
                                # held-out snippet to TensorBoard (patches/entropy; needs [plot])
  c.optim = dict(lr=4e-4, warmup_steps=2000, lr_min_ratio=0.0,  # paper: cosine to 0
                 b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                 clip_norm=1.0)                                   # paper
  c.mesh = dict(shape=(1, -1, 1))  # FSDP over every device (e.g. a v5p-256 slice: 128 chips)
  if arg == "tiny":
    return experiment.tiny(c)
  if arg:
    raise ValueError(f"unknown config argument {arg!r} (valid: tiny)")
  return c
