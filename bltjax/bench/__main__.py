"""Benchmarks that print figures (never timed assertions): `python -m bltjax.bench <what>`.

  train     train-step bytes/s of bltjax and of the `transformers` BLT port (PyTorch CPU; a test
            extra) on the same architecture, batch of bytes and patch lengths, thread count,
            interleaved in one run; then bltjax's step time at N and 2N bytes per row.
  generate  cached generation vs. full recomputation (see bltjax.generate).
  pipeline  how a pod is fed: entropy FLOPs share, host cores needed, host pipeline
            bytes/s per core, start-up time and memory per process on a multi-GB corpus;
            --part=host or --part=startup runs only the host pipeline's bytes/s per core
            [--seconds=8] or only the start-up measurement [--corpus_gb=2].
  step      a few real train steps of any config (--config=experiments/1b.py, overrides as for
            bltjax.main) on the devices present, per attention backend (--attention=xla,cudnn;
            default xla and the platform's fused kernel): step time, bytes/s, MFU, peak
            memory, attention's share; see bltjax.bench.step.
  compress  gzip -9, xz -9e and zstd -19 bits per byte on exactly the held-out bytes the trainer's
            eval_bpb covers (--config=experiments/small.py[:arg], default experiments/debug.py;
            --config.field=value overrides as for bltjax.main); see bltjax.bench.compress.

These machines are noisy: each figure is a median over several timed steps, and ratios are taken
between measurements interleaved in the same run. One module per benchmark (bltjax.bench.train,
.generate, .pipeline, .step, .compress); `_port` and `_pipeline` are their worker processes.
"""

from absl import app, flags
from ml_collections import config_flags

from bltjax.bench import compress, generate, pipeline, step, train
from bltjax.runtime import cli

_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "bytes per row")
_BATCH = flags.DEFINE_integer("batch", 4, "rows per step (pipeline: rows per batch of the host "
                              "pipeline)")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps per measurement")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "interleaved rounds (bltjax, port, bltjax, ...)")
_THREADS = flags.DEFINE_integer("threads", 2, "CPU threads for the PyTorch port")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "bltjax compute dtype (params stay float32)")
_PORT_DTYPE = flags.DEFINE_string("port_dtype", "float32", "internal: the port worker's dtype")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "generate: a trained model to use (default: "
                                  "the debug architecture, randomly initialised)")
_NEW_BYTES = flags.DEFINE_integer("new_bytes", 1024, "generate: bytes to generate")
_CONFIGS = flags.DEFINE_list("configs", ["experiments/8b.py", "experiments/1b.py"],
                             "pipeline: experiment configs")
_ROW_BYTES = flags.DEFINE_integer("row_bytes", 2048, "pipeline: bytes per measured row (the cost "
                                  "per byte does not depend on it beyond the 512-byte window)")
_CORPUS_GB = flags.DEFINE_float("corpus_gb", 2.0, "pipeline: size of the synthetic corpus for "
                                "the start-up measurement")
_PART = flags.DEFINE_enum("part", "all", pipeline.PARTS, "pipeline: everything, or only the host "
                          "pipeline's bytes/s per core (rows of the first config's seq_len) or "
                          "only the start-up measurement")
_SECONDS = flags.DEFINE_float("seconds", 8.0, "pipeline: seconds per host pipeline measurement")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "compress: the experiment whose held-out bytes to compress (default: "
    "experiments/debug.py); step: the experiment to run", lock_config=False)
_ATTENTION = flags.DEFINE_list("attention", None, "step: attention backends to compare (default: "
                               "xla and the platform's fused one: splash on TPU, cudnn on GPU)")
_WARMUP = flags.DEFINE_integer("warmup", 2, "step: untimed steps after compilation")
_BYTES_PER_PATCH = flags.DEFINE_float("bytes_per_patch", 4.5, "step: mean patch size of the "
                                      "synthetic batch")


def main(argv):
  runs = {
      "train": lambda: train.run(
          seq_len=_SEQ_LEN.value, batch=_BATCH.value, steps=_STEPS.value, rounds=_ROUNDS.value,
          threads=_THREADS.value, dtype=_DTYPE.value),
      "generate": lambda: generate.run(checkpoint=_CHECKPOINT.value, new_bytes=_NEW_BYTES.value),
      "pipeline": lambda: pipeline.run(
          configs=_CONFIGS.value, row_bytes=_ROW_BYTES.value, corpus_gb=_CORPUS_GB.value,
          part=_PART.value, batch=_BATCH.value, seconds=_SECONDS.value),
      "step": lambda: step.main(_CONFIG.value, attentions=_ATTENTION.value, steps=_STEPS.value,
                                warmup=_WARMUP.value, bytes_per_patch=_BYTES_PER_PATCH.value),
      "compress": lambda: compress.run(_CONFIG.value, None if _CONFIG.value is None else
                                       flags.FLAGS["config"].config_filename),
      "_port": lambda: train.port_worker(
          port_dtype=_PORT_DTYPE.value, seq_len=_SEQ_LEN.value, batch=_BATCH.value,
          threads=_THREADS.value, dtype=_DTYPE.value),
      "_pipeline": lambda: pipeline.patching_worker(config=_CONFIGS.value[0],
                                                    row_bytes=_ROW_BYTES.value),
  }
  if len(argv) != 2 or argv[1] not in runs:
    raise app.UsageError(f"usage: python -m bltjax.bench {{{','.join(runs)}}} [--flags]")
  runs[argv[1]]()


if __name__ == "__main__":
  cli.run(main, malloc_tuning=True)
