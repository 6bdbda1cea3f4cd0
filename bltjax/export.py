"""Export a trained model: `python -m bltjax.export --workdir=DIR --out=DIR [--format=orbax|hf]
[--dtype=bfloat16]`.

`orbax` writes the params (no optimizer state) and the model/patching config, loadable with
`BLT.from_checkpoint(DIR)` and usable as `--config.init_from=DIR`; `hf` writes config.json +
model.safetensors for `transformers`' BltForCausalLM (entropy model included as its patcher).
"""

from absl import flags, logging

from bltjax.runtime import process_setup

process_setup.set_defaults()

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (latest checkpoint) or an "
                               "exported/converted directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://).")
_FORMAT = flags.DEFINE_enum("format", "orbax", ["orbax", "hf"], "Output format.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def main(argv):
  del argv
  from bltjax import BLT
  from bltjax.runtime import logs, storage
  logs.quiet_libraries()
  storage.check_access(_WORKDIR.value)  # both fail here, before the model is loaded
  storage.check_access(_OUT.value, write=True)
  blt = BLT.from_checkpoint(_WORKDIR.value)
  blt.save(_OUT.value, format=_FORMAT.value, dtype=_DTYPE.value)
  logging.info("exported %s -> %s (%s, %s)", _WORKDIR.value, _OUT.value, _FORMAT.value,
               _DTYPE.value)


if __name__ == "__main__":
  from bltjax.runtime import cli
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(main)  # errors as one line (--verbose: traceback), exit 1
