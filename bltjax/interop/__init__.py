"""Checkpoints in other people's formats: Hugging Face `transformers` (`hf`, `hf_config`) and
Meta's released BLTs (`meta`, `meta_config`), read (and, for HF, written) without torch."""
