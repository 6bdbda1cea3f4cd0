"""Using a trained BLT: the `BLT` handle (`api`: load any format, entropies, patches, logits,
generate, save), cached byte generation (`generator`, `sampling`) and the lm-evaluation-harness
model (`harness`)."""
