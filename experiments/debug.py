"""CPU quickstart: trains a tiny entropy model, then a tiny BLT, on the Python standard library.

    python -m bltjax.main --config=experiments/debug.py

Sized to finish both stages in a few minutes on a 2-core CPU machine. The architecture keeps every
BLT ingredient (hash n-grams, windowed local attention, cross-attention pooling with k > 1,
block-causal latent model, decoder cross-attention in every layer, entropy patching).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from bltjax.train import experiment


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0                  # PRNG seed for initialisation and data order
  c.model_type = "blt"        # 'blt', 'entropy_model' or 'token_lm'
  c.init_from = placeholder(str)  # start from these params (python -m bltjax.convert/export
                                  # output, or a workdir); its entropy model cuts the patches

  encoder = dict(             # local encoder: bytes, windowed self-attention
      dim=128,                # D_E (the decoder's width too)
      n_layers=1,             # the paper: one encoder layer suffices with hash n-grams
      n_heads=4,              # head_dim 32
      n_kv_heads=4,           # MHA
      ffn_dim=384,            # SwiGLU hidden width
      rope_theta=500000.0,    # as the released BLTs
      norm_eps=1e-5,
      attn_window=128)        # sliding window in bytes (512 in the paper; rows are short here)
  c.model = dict(
      encoder=encoder,
      latent=dict(            # latent transformer over patches
          dim=256,            # D_G
          n_layers=2,
          n_heads=4,
          n_kv_heads=4,
          ffn_dim=768,
          rope_theta=500000.0,
          norm_eps=1e-5,
          attn_window=placeholder(int)),  # block-causal over all patches
      decoder=dict(encoder, n_layers=2),  # local decoder: bytes, cross-attends to patches; the
                                          # encoder's stack, one layer deeper (it runs per
                                          # byte: the costliest part per parameter)
      cross_attn_k=2,         # sub-queries per patch: latent input width k*D_E = 256 = D_G
      cross_attn_nheads=4,    # heads of every cross-attention
      cross_attn_all_layers_encoder=False,  # CA after the last encoder layer
      cross_attn_all_layers_decoder=True,   # CA before every decoder layer (as released)
      hash_group_sizes=(3, 4, 5, 6),  # byte n-gram sizes with hash embeddings
      hash_vocab=16381,       # rows per hash table (500002 in the released models)
      hash_functions=1,       # hash functions (primes) per n-gram size
      runtime=dict(
          dtype="float32",    # compute dtype; bf16 matmuls are slower than fp32 on these CPUs
          param_dtype="float32",
          remat_policy="none",  # no rematerialisation needed at this size
          attention="auto",     # xla on CPU, splash on TPU, cuDNN on GPU where it applies
          attn_block=128,       # splash blocks of 128 rows (the 128-byte window)
          attn_chunk=None,      # xla: local attention in query chunks of the whole window
          attn_loop=False,      # all chunks as one batched op
          scan_unroll=1))       # layer loops stay rolled (compile time)

  c.patching = dict(
      mode="entropy",         # entropy | space | static | byte
      threshold=placeholder(float),         # None: calibrate on held-out data for target_patch_size
      target_patch_size=3.0,  # bytes per patch aimed for by the calibration
      threshold_add=placeholder(float),     # global+monotonic mode (None: off)
      monotonic=False,        # approximate monotonic constraint
      patch_size=placeholder(int),        # static mode only
      max_patch_length=placeholder(int),  # split longer patches (None: no limit)
      max_patches=256,        # patches per row (fixed shape); surplus merged and counted
      device="host",          # where patches are cut: "host" | "accelerator"
                              # (on CPU: the input workers patch while the step runs)
      entropy_model_checkpoint=placeholder(str))  # None: stage 1 trains one into
                                                  # WORKDIR/entropy_model

  c.data = dict(
      source="stdlib",        # the running Python's standard library: no download needed
      paths=(),               # files/globs for the text/jsonl/parquet/arrayrecord sources
      text_field="text",      # JSON field / Parquet column with the document text
      mixture=(),             # weighted sources, e.g. (dict(name="web", source="jsonl",
                              # paths=(...), weight=0.7, text_field="text"), ...); () = the
                              # source above
      shuffle_window=1024,    # jsonl/parquet: documents shuffled within windows of this many
      max_document_bytes=64 << 20,  # longer documents (a multi-GB one-line file or JSONL
                                    # record) keep their first 64 MiB: oversized_docs
      seq_len=384,            # N bytes per row (+1 for the targets)
      eval_fraction=0.02,     # documents held out (by hashed path) for evaluation
      shards=0,               # data shards (0: one per process); fixing it makes the batches
                              # independent of the number of processes
      num_workers=1,          # grain worker processes (patching runs there); 0 = in-process
      worker_buffer=16,       # batches buffered per worker (deep: on a 2-core machine the worker
                              # mostly runs in bursts, between train steps)
      prefetch=8,             # batches kept ready by the training process
      read_threads=2,         # document reading threads
      read_buffer=64,         # documents read ahead
      host_hash_ids=False,    # compute hash n-gram ids on the device (exact 64-bit emulation)
      preprocessed_dir=placeholder(str))  # read rows written by `python -m bltjax.preprocess`
                                          # instead

  c.train = dict(
      steps=300,              # optimizer steps (~4 minutes on 2 CPU cores)
      batch_size=16,          # global rows per step
      microbatches=1,         # gradient accumulation steps inside one train step
      rows_per_device=placeholder(int),  # or: rows per device per microbatch (then
                                         # microbatches=None)
      log_every=20,           # steps between metrics.jsonl records
      eval_every=100,         # steps between held-out evaluations (0: never)
      eval_batches=4,         # batches per evaluation
      checkpoint_every=100,   # steps between checkpoints (and one at the end)
      keep_checkpoints=3,     # latest checkpoints kept
      nonfinite="stop",       # non-finite loss/gradients: stop the run, with the last good
                              # checkpoint kept ('skip': skip such updates and go on)
      max_skipped_steps=10,   # consecutive skipped updates (either kind) before the run stops
      loss_spike_factor=0.0,  # >0: skip updates whose loss > factor x its running mean (0: off)
      loss_spike_horizon=100, # horizon of that running mean, in accepted updates
      entropy_figure=True,    # at each evaluation, log the next-byte entropy and patches of a
                              # held-out snippet to TensorBoard (patches/entropy; needs [plot])
      eval_sets={})           # named held-out sources, each read whole and logged as
                              # eval/<name>/bpb and eval/<name>/loss at every evaluation
                              # (train.eval_batches batches each), e.g.
                              # dict(wiki=dict(source="jsonl", paths=("/data/wiki/*.jsonl",),
                              #                text_field="text"));
                              # on the command line: --config.train.eval_sets="{'wiki':
                              # {'source': 'jsonl', 'paths': ('/data/wiki/*.jsonl',),
                              # 'text_field': 'text'}}"

  c.optim = dict(
      lr=3e-3,                # peak learning rate (tiny model, short run)
      warmup_steps=30,        # linear warmup from 0
      lr_min_ratio=0.1,       # cosine decay to lr * lr_min_ratio (reference configs)
      b1=0.9, b2=0.95, eps=1e-8,  # AdamW (reference)
      weight_decay=0.1,       # on every parameter (reference)
      clip_norm=1.0)          # global-norm clipping

  c.mesh = dict(shape=(1, -1, 1))  # (data, fsdp, tensor); -1 = all remaining devices

  # Stage 1: the entropy model, trained first when patching.mode == 'entropy' and no
  # checkpoint is given. It reads the same documents (data.source/paths/text_field/eval_fraction
  # come from the section above).
  c.entropy_model = dict(
      seed=1,
      model_type="entropy_model",
      init_from=placeholder(str),  # start from these params instead of a random init
      model=dict(
          transformer=dict(
              dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=384,
              rope_theta=10000.0,  # the released entropy model keeps the default 10000
              norm_eps=1e-5,
              attn_window=128),  # sliding window (512 in the released model)
          runtime=dict(dtype="float32", param_dtype="float32", remat_policy="none",
                       attention="auto", attn_block=128, attn_chunk=None, attn_loop=False,
                       scan_unroll=1)),  # as for BLT above
      data=dict(seq_len=384, num_workers=0, worker_buffer=4, prefetch=2, read_threads=2,
                read_buffer=64,
                host_hash_ids=False, preprocessed_dir=placeholder(str)),
      train=dict(steps=200, batch_size=16, microbatches=1, rows_per_device=placeholder(int),
                 log_every=20,
                 eval_every=100,
                 eval_batches=4, checkpoint_every=100, keep_checkpoints=2,
                 nonfinite="stop", max_skipped_steps=10, loss_spike_factor=0.0,
                 loss_spike_horizon=100,  # the update guard, as above
                 eval_sets={}),  # named eval sets, as above
      optim=dict(lr=3e-3, warmup_steps=20, lr_min_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8,
                 weight_decay=0.1, clip_norm=1.0),
      mesh=dict(shape=(1, -1, 1)))
  if arg == "tiny":  # a few steps of everything: the end-to-end test
    return experiment.tiny(c)
  if arg:
    raise ValueError(f"unknown config argument {arg!r} (valid: tiny)")
  return c
