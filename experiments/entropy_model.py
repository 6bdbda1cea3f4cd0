"""The entropy model as released with BLT: a 14-layer, 768-wide byte LM with a 512-byte window.

    python -m bltjax.main --config=experiments/entropy_model.py --config.data.source=jsonl \
        --config.data.paths="('/data/corpus/*.jsonl',)"

99.5M parameters. Settings follow Meta's `bytelatent/configs/entropy_model.yaml` (the paper's
text says 512 wide; the released weights are 768 wide, and a BLT must be patched by the model it
was trained with). `:tiny` shrinks it for a smoke run. experiments/1b.py trains its BLT on this
corpus, input pipeline and schedule.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from bltjax.train import experiment


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 42                  # the reference's model seed
  c.model_type = "entropy_model"
  c.init_from = placeholder(str)  # start from these params (an exported model or a workdir)
  c.model = dict(
      transformer=dict(
          dim=768,             # width
          n_layers=14,
          n_heads=12,          # head_dim 64
          n_kv_heads=12,       # MHA
          ffn_dim=2048,        # int(2*4*768/3) rounded up to a multiple of 256
          rope_theta=10000.0,  # the reference never overrides the default for this model
          norm_eps=1e-5,
          attn_window=512),    # sliding window (hard-coded 512 in the reference)
      runtime=dict(
          dtype="bfloat16",    # bf16 compute, fp32 master weights and loss
          param_dtype="float32",
          remat_policy="dots_with_no_batch_dims_saveable",  # keep projections, recompute attention
          attention="auto",    # splash on TPU, cuDNN on GPU where it applies, xla on CPU
          attn_block=512,      # splash blocks of 512 rows: a query block sees two key blocks
          attn_chunk=128,      # xla: local attention in 128-query blocks (20% of scores wasted)
          attn_loop=False,     # all blocks as one batched op (accelerators); True helps on CPU
          scan_unroll=1))      # rolled layer loop: compile time independent of depth
  c.data = dict(
      source="stdlib",         # replace with your corpus (jsonl/parquet/arrayrecord/text)
      paths=(),                # globs for file sources
      text_field="text",       # JSON field / Parquet column
      mixture=(),              # weighted sources (dicts: name, source, paths, weight, text_field);
                               # () = the single source above. Weights are shares of bytes.
      shuffle_window=1024,     # jsonl/parquet: documents shuffled within windows of this many
      max_document_bytes=64 << 20,  # longer documents (a multi-GB one-line file or JSONL
                                    # record) keep their first 64 MiB: oversized_docs
      seq_len=8192,            # bytes per row (reference: seq_len = max_encoder_seq_length = 8192)
      eval_fraction=0.001,     # held-out documents
      shards=0,                # data shards (0: one per process)
      num_workers=8,           # grain worker processes per host
      worker_buffer=2,         # batches buffered per worker
      prefetch=2,              # global batches kept ready
      read_threads=16,         # document reading threads
      read_buffer=256,         # documents read ahead
      host_hash_ids=False,     # a BLT's hash n-gram ids on the device (none in this model)
      preprocessed_dir=placeholder(str))
  c.train = dict(
      steps=100_000,           # reference
      batch_size=256,          # global rows (2 per GPU in the reference, on 128 GPUs)
      microbatches=1,          # gradient accumulation steps inside one train step
      rows_per_device=placeholder(int),  # or: rows per device per microbatch (microbatches
                                         # then follow from the device count: set them None)
      log_every=50,
      eval_every=2_000,
      eval_batches=16,
      checkpoint_every=2_000,
      keep_checkpoints=3,
      nonfinite="stop",         # non-finite loss/gradients: stop ('skip': skip the update, go on)
      max_skipped_steps=10,     # consecutive skipped updates before the run stops
      loss_spike_factor=0.0,    # >0: skip updates whose loss > factor x running mean (0: off)
      loss_spike_horizon=100,   # horizon of that running mean (accepted steps)
      eval_sets={})             # named held-out sources, each read whole and logged as
                                # eval/<name>/bpb (and /loss) at every evaluation, e.g.
                                # dict(wiki=dict(source="parquet", paths=("gs://b/wiki/*.parquet",),
                                #                text_field="text"));
                                # command line: --config.train.eval_sets="{'wiki': {'source':
                                # 'parquet', 'paths': ('gs://b/wiki/*.parquet',), 'text_field':
                                # 'text'}}"
  c.optim = dict(
      lr=4e-4, warmup_steps=500, lr_min_ratio=0.1,  # reference entropy_model.yaml
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,  # reference AdamW, decay on every parameter
      clip_norm=10.0)                               # reference entropy_model.yaml
  c.mesh = dict(shape=(1, -1, 1))  # pure FSDP: a 100M model needs no tensor parallelism
  if arg == "tiny":
    return experiment.tiny(c)
  if arg:
    raise ValueError(f"unknown config argument {arg!r} (valid: tiny)")
  return c
