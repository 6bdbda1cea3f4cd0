"""The paper's FLOP-controlled comparisons (§6-7) in small, on the Python standard library.

    python -m bltjax.ablate --config=experiments/ablation.py [--root=DIR] [--budget=FLOPS]

Every run trains for `budget` training FLOPs (bltjax.train.flops accounting, per byte of text): its
steps are the budget over its FLOPs per step, so a model that spends fewer FLOPs per byte (larger
patches, BPE tokens) sees more bytes. All runs read the same documents, in the same order, and are
evaluated on the same held-out documents. The BLTs are the quickstart's (experiments/debug.py);
the byte-level transformer and the BPE baseline run its latent transformer's stack over bytes and
over BPE tokens.

The default budget finishes on a 2-core CPU machine in well under an hour in all (see
docs/paper-in-small.md); `:tiny` is a smoke run of a few steps per model.
"""

import copy
import os

import ml_collections

from bltjax.train import experiment

_HERE = os.path.dirname(__file__)


def _blt(base, **patching):
  c = copy.deepcopy(base)
  c.patching.update(patching)
  return c


def get_config(arg=None):
  tiny = arg == "tiny"
  if arg and not tiny:
    raise ValueError(f"unknown config argument {arg!r} (valid: tiny)")
  blt = experiment.load(os.path.join(_HERE, "debug.py:tiny" if tiny else "debug.py"))
  blt.train.eval_batches = 2 if tiny else 8  # 8 x 16 rows x 384 bytes = 49 KB of held-out text
  bpe = experiment.load(os.path.join(_HERE, "token_lm.py:tiny" if tiny else "token_lm.py"))

  c = ml_collections.ConfigDict()
  c.budget = 2e8 if tiny else 2.4e13  # training FLOPs per run (~4 min each for the BLTs here)
  c.schedule = dict(          # what follows from each run's planned steps
      evals=4,                # held-out evaluations per run (the curves' points)
      logs=20,                # metrics.jsonl records per run
      warmup_fraction=0.1)    # optim.warmup_steps = this fraction of the run's steps

  # The byte-level transformer: the BLT's latent stack (width, depth, heads) run over bytes,
  # as a plain causal byte LM with the BLT's data, batch and optimizer.
  byte = copy.deepcopy(blt.entropy_model)
  byte.model.transformer = copy.deepcopy(blt.model.latent)
  byte.model.transformer.attn_window = None  # full causal attention over the row, as the latent
  byte.seed = blt.seed
  byte.data.update({k: blt.data[k] for k in experiment.SHARED_DATA_FIELDS})
  byte.data.update(seq_len=blt.data.seq_len, num_workers=blt.data.num_workers)
  byte.train = copy.deepcopy(blt.train)
  byte.optim = copy.deepcopy(blt.optim)

  # The BPE baseline: the same stack over byte-level BPE tokens (experiments/token_lm.py), its
  # tokenizer trained on the training split; seq_len is in tokens there.
  bpe.model.transformer = copy.deepcopy(byte.model.transformer)
  bpe.seed = blt.seed
  bpe.data.update({k: blt.data[k] for k in experiment.SHARED_DATA_FIELDS})
  bpe.train = copy.deepcopy(blt.train)
  bpe.optim = copy.deepcopy(blt.optim)

  no_hash = _blt(blt, mode="entropy", target_patch_size=4.0)
  no_hash.model.hash_group_sizes = ()
  c.runs = dict(  # name -> a full trainer config; the run's workdir is ROOT/<name>
      byte=byte,
      bpe=bpe,
      static4=_blt(blt, mode="static", patch_size=4),
      static6=_blt(blt, mode="static", patch_size=6),
      space=_blt(blt, mode="space"),
      entropy4=_blt(blt, mode="entropy", target_patch_size=4.0),
      entropy6=_blt(blt, mode="entropy", target_patch_size=6.0),
      entropy4_no_hash=no_hash)
  c.descriptions = dict(  # the results table's "what" column
      byte="byte-level transformer (the latent stack over bytes)",
      bpe="BPE-token transformer (the latent stack over BPE tokens)",
      static4="BLT, static patches of 4 bytes",
      static6="BLT, static patches of 6 bytes",
      space="BLT, space patching",
      entropy4="BLT, entropy patching (~4 bytes/patch)",
      entropy6="BLT, entropy patching (~6 bytes/patch)",
      entropy4_no_hash="BLT, entropy patching (~4 bytes/patch), no hash n-gram embeddings")
  return c
