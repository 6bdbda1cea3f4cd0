"""Using a trained BLT: the `BLT` handle (`api`: load any format, entropies, patches, logits,
generate, save), cached byte generation (`generator`, `sampling`), writing a model in another
format (`conversion`), and the lm-evaluation-harness model (`harness`) and runs
(`lm_evaluation`)."""
