"""The token-level baseline: BLT's latent transformer over byte-level BPE tokens, on the stdlib.

    python -m bltjax.main --config=experiments/token_lm.py

The paper's comparison point (Llama-style BPE LM): embedding -> the same transformer stack as the
BLT latent (full causal attention, documents split at EOS) -> RMSNorm -> logits over the BPE
vocabulary. Its tokenizer (bltjax/data/bpe.py) is trained first, on the training split only, into
WORKDIR/tokenizer.json (a re-run reuses it). Loss and eval_bpb are bits per *byte* of text (each
token counts the bytes it covers, EOS one byte as for the byte models), so they compare directly
with a BLT's. Sized like experiments/debug.py's latent; `:tiny` shrinks it for a smoke run.

data.seq_len counts TOKENS here (bytes in the byte models): 112 tokens x ~3.4 bytes/token on the
stdlib cover about the 384 bytes of a debug.py row.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from bltjax.train import experiment


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0                  # PRNG seed for initialisation and data order
  c.model_type = "token_lm"   # the BPE baseline (bltjax/data/bpe.py)
  c.init_from = placeholder(str)  # start from these params (a workdir or an exported model)

  c.model = dict(
      transformer=dict(       # the stack of debug.py's latent transformer
          dim=256,
          n_layers=2,
          n_heads=4,          # head_dim 64
          n_kv_heads=4,       # MHA
          ffn_dim=768,        # SwiGLU hidden width
          rope_theta=500000.0,  # as the BLT latent
          norm_eps=1e-5,
          attn_window=placeholder(int)),  # None: full causal attention over the row's tokens
      runtime=dict(
          dtype="float32",    # compute dtype; bf16 matmuls are slower than fp32 on these CPUs
          param_dtype="float32",
          remat_policy="none",  # no rematerialisation needed at this size
          attn_chunk=None,      # attention in one block
          attn_loop=False,      # all chunks as one batched op
          scan_unroll=1),       # layer loops stay rolled (compile time)
      vocab_size=4096)        # BPE vocabulary (ids 0..3 pad/BOS/EOS/unused, 256 bytes, merges)

  c.tokenizer = dict(
      path=placeholder(str),  # None: train one on the training split into WORKDIR/tokenizer.json
                              # (reused on re-runs); or a tokenizer.json saved by bltjax.data.bpe,
                              # used as is (its vocabulary must be model.vocab_size)
      train_bytes=16 << 20)   # train the BPE on the first this many bytes of training documents
                              # (unshuffled; the whole 12 MB stdlib training split here)

  c.data = dict(
      source="stdlib",        # the running Python's standard library: no download needed
      paths=(),               # files/globs for the text/jsonl/parquet/arrayrecord sources
      text_field="text",      # JSON field / Parquet column with the document text
      mixture=(),             # weighted sources (dicts: name, source, paths, weight, text_field);
                              # () = the source above; the tokenizer reads each by weight
      shuffle_window=1024,    # jsonl/parquet: documents shuffled within windows of this many
      max_document_bytes=64 << 20,  # longer documents keep their first 64 MiB: oversized_docs
      seq_len=112,            # N TOKENS per row (+1 for the targets): ~384 bytes, as debug.py
      eval_fraction=0.02,     # documents held out (by hashed path) for evaluation, as debug.py
      shards=0,               # data shards (0: one per process)
      num_workers=1,          # grain worker processes (BPE encoding runs there); 0 = in-process
      worker_buffer=16,       # batches buffered per worker
      prefetch=8,             # batches kept ready by the training process
      read_threads=2,         # document reading threads
      read_buffer=64,         # documents read ahead
      host_hash_ids=False,    # no hash embeddings in this model
      preprocessed_dir=placeholder(str))  # must stay None: token_lm reads documents online

  c.train = dict(
      steps=300,              # optimizer steps
      batch_size=16,          # global rows per step
      microbatches=1,         # gradient accumulation steps inside one train step
      log_every=20,           # steps between metrics.jsonl records
      eval_every=100,         # steps between held-out evaluations (0: never)
      eval_batches=4,         # batches per evaluation
      checkpoint_every=100,   # steps between checkpoints (and one at the end)
      keep_checkpoints=3,     # latest checkpoints kept
      nonfinite="stop",       # non-finite loss/gradients: stop ('skip': skip the update, go on)
      max_skipped_steps=10,   # consecutive skipped updates (either kind) before the run stops
      loss_spike_factor=0.0,  # >0: skip updates whose loss > factor x its running mean (0: off)
      loss_spike_horizon=100, # horizon of that running mean, in accepted updates
      eval_sets={})           # named held-out sources, logged as eval/<name>/bpb (bits per
                              # byte, as for the byte models), e.g.
                              # dict(wiki=dict(source="jsonl", paths=("/data/wiki/*.jsonl",),
                              #                text_field="text"))

  c.optim = dict(
      lr=3e-3,                # peak learning rate (tiny model, short run), as debug.py
      warmup_steps=30,        # linear warmup from 0
      lr_min_ratio=0.1,       # cosine decay to lr * lr_min_ratio
      b1=0.9, b2=0.95, eps=1e-8,  # AdamW
      weight_decay=0.1,       # on every parameter
      clip_norm=1.0)          # global-norm clipping (of the per-byte loss's gradient)

  c.mesh = dict(shape=(1, -1, 1))  # (data, fsdp, tensor); -1 = all remaining devices
  if arg == "tiny":  # a few steps of everything: the end-to-end test
    return experiment.tiny(c)
  if arg:
    raise ValueError(f"unknown config argument {arg!r} (valid: tiny)")
  return c
