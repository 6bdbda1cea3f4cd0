"""Bytes in: documents from every source, packed into rows and batches by a grain pipeline.

`sources` (random access: stdlib, text, arrayrecord) and `streams`/`formats` (JSONL, Parquet)
read documents; `documents` says what a reader returns (with its problems and `flag_table`'s
flags) and holds the held-out split; `mixture` and `paths` resolve the data section; `shards`
gives one data shard's documents; `pipeline` packs them into rows and batches (`prefetch` and
`workers` move them to the trainer); `preprocessed` reads stored entropies; `bpe` is the
token-level baseline's tokenizer.
"""
