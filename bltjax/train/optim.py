"""AdamW with the reference's settings, linear warmup then cosine decay, global-norm clipping."""

import optax


def lr_schedule(optim_cfg, total_steps: int):
  """Linear warmup from 0 (the first update uses lr 0, as in the reference), then cosine decay to
  `lr_min_ratio * lr` at `total_steps` (the reference's configs use 0.1; the paper decays to 0)."""
  o = optim_cfg
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=max(total_steps, o.warmup_steps + 1), end_value=o.lr * o.lr_min_ratio)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW. Weight decay applies to every parameter, norms and embeddings
  included, as in the reference (one parameter group)."""
  o = optim_cfg
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                  weight_decay=o.weight_decay))
