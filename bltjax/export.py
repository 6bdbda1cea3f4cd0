"""Export a trained model: `python -m bltjax.export --workdir=DIR --out=DIR [--format=orbax|hf]
[--dtype=bfloat16]`.

`orbax` writes the params (no optimizer state) and the model/patching config, loadable with
`BLT.from_checkpoint(DIR)` and usable as `--config.init_from=DIR`; `hf` writes config.json +
model.safetensors for `transformers`' BltForCausalLM (entropy model included as its patcher).
The export itself is `bltjax.inference.conversion.export`.
"""

from absl import flags

from bltjax.inference import conversion
from bltjax.runtime import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (latest checkpoint) or an "
                               "exported/converted directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://).", required=True)
_FORMAT = flags.DEFINE_enum("format", "orbax", ["orbax", "hf"], "Output format.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def main(argv):
  cli.no_arguments(argv)
  conversion.export(_WORKDIR.value, _OUT.value, format=_FORMAT.value, dtype=_DTYPE.value)


if __name__ == "__main__":
  cli.run(main)
