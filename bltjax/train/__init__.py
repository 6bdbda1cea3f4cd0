"""Training: `trainer.run(config, workdir)` runs the stages of an experiment (`experiment` loads
and checks its config).

The pieces, in the order a step meets them: `patcher` (who cuts the patches, and where), `batch`
(what a batch holds), `feed` (host batch -> global arrays), `train_state` and `optim` (sharded
state, AdamW), `step` (the pure train/eval step and the one place that jits it), `metrics` and
`flops` (what is logged, MFU), `heldout` (held-out bpb during training), `preemption`.
"""
