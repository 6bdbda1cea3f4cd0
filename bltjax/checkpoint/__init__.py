"""A training workdir's checkpoints: Orbax save and restore (`checkpointer`), the fallback past
checkpoints that do not read (`repair`), and one writer per workdir (`workdir_lock`)."""
