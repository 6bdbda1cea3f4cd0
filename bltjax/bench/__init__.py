"""Benchmarks that print figures (never timed assertions): `python -m bltjax.bench <what>`
(`__main__`: the flags and the dispatch). One module per benchmark:

  train     the train step against the `transformers` port, and at N vs. 2N bytes per row
  generate  cached generation against full recomputation
  pipeline  how a pod is fed: entropy FLOPs share, host cores, host pipeline (see `host`)
  compress  general-purpose compressors on the held-out bytes the trainer evaluates on

`common` holds what they share: rows of real bytes and a median timer.
"""
