"""The token-level baseline: BLT's latent transformer over byte-level BPE tokens, on the stdlib.

    python -m bltjax.main --config=experiments/token_lm.py

The paper's comparison point (Llama-style BPE LM): embedding -> the same transformer stack as the
BLT latent (full causal attention, documents split at EOS) -> RMSNorm -> logits over the BPE
vocabulary. Its tokenizer (bltjax/data/bpe.py) is trained first, on the training split only, into
WORKDIR/tokenizer.json (a re-run reuses it). Loss and eval_bpb are bits per *byte* of text (each
token counts the bytes it covers, EOS one byte as for the byte models), so they compare directly
with a BLT's. It is experiments/debug.py's latent stack, documents, schedule and optimizer, taken
from that file; `:tiny` shrinks it for a smoke run.

data.seq_len counts TOKENS here (bytes in the byte models): 112 tokens x ~3.4 bytes/token on the
stdlib cover about the 384 bytes of a debug.py row.
"""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from bltjax.train import experiment


def get_config(arg=None):
  blt = experiment.load(os.path.join(os.path.dirname(__file__), "debug.py"))  # what it shares
  c = ml_collections.ConfigDict()
  c.seed = blt.seed           # debug.py's: the same initialisation seed and data order
  c.model_type = "token_lm"   # the BPE baseline (bltjax/data/bpe.py)
  c.init_from = placeholder(str)  # start from these params (a workdir or an exported model)

  c.model = dict(
      transformer=blt.model.latent,  # the stack of debug.py's latent transformer; its
                                     # attn_window None: full causal attention over the row
      runtime=blt.model.runtime,     # as debug.py's (fp32 on CPU, one attention block)
      vocab_size=4096)        # BPE vocabulary (ids 0..3 pad/BOS/EOS/unused, 256 bytes, merges)

  c.tokenizer = dict(
      path=placeholder(str),  # None: train one on the training split into WORKDIR/tokenizer.json
                              # (reused on re-runs); or a tokenizer.json saved by bltjax.data.bpe,
                              # used as is (its vocabulary must be model.vocab_size)
      train_bytes=16 << 20)   # train the BPE on the first this many bytes of training documents
                              # (unshuffled; the whole 12 MB stdlib training split here)

  # debug.py's documents and input pipeline: the tokenizer reads each mixture source by weight,
  # the grain workers run the BPE encoding, host_hash_ids is unused (no hash embeddings) and
  # preprocessed_dir must stay None (token_lm reads documents online).
  c.data = blt.data
  c.data.seq_len = 112        # N TOKENS per row (+1 for the targets): ~384 bytes, as debug.py

  # debug.py's schedule, optimizer and mesh (eval_sets are logged as eval/<name>/bpb, bits per
  # byte as for the byte models; clip_norm clips the per-byte loss's gradient), less the entropy
  # figure: it draws a BLT's patches.
  c.train = blt.train
  del c.train.entropy_figure
  c.optim = blt.optim
  c.mesh = blt.mesh
  if arg == "tiny":  # a few steps of everything: the end-to-end test
    return experiment.tiny(c)
  if arg:
    raise ValueError(f"unknown config argument {arg!r} (valid: tiny)")
  return c
