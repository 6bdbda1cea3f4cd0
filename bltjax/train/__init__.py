"""Training: `trainer.run(config, workdir)` runs the stages of an experiment (`experiment` loads
and checks its config).

The pieces, in the order a step meets them: `patcher` (who cuts the patches, and where), `batch`
(what a batch holds), `feed` (host batch -> global arrays), `train_state` and `optim` (sharded
state, AdamW), `step` (the pure train/eval step and the one place that jits it), `metrics` and
`flops` (what is logged, MFU), `heldout` (held-out bpb during training) and `entropy_figure` (its
TensorBoard picture), `preemption`.

Built on them, the libraries behind commands: `aot` (`python -m bltjax.aot`: compile the step for
a target topology), `preprocess` (`python -m bltjax.preprocess`: offline entropies), `ablation`
(`python -m bltjax.ablate`: FLOP-matched runs) and `run_curves` (`python -m bltjax.plot curves`).
"""
