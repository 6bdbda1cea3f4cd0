"""Import a Hugging Face BLT: `python -m bltjax.convert --hf_dir=DIR --out=DIR`.

Reads `config.json` + `model.safetensors` (as written by `BltForCausalLM.save_pretrained`, the
format of the released BLT-1B/7B conversions; no torch needed) and writes a params-only Orbax
checkpoint with its entropy model under DIR/entropy_model. Continue pretraining from it with
`python -m bltjax.main --config=experiments/1b.py --config.init_from=DIR` (the entropy model
recorded there cuts the patches unless patching.entropy_model_checkpoint says otherwise).
"""

from absl import flags, logging

from bltjax import xla_flags

xla_flags.set_defaults()

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face BLT checkpoint directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def main(argv):
  del argv
  from bltjax import BLT, logs, storage
  logs.quiet_libraries()
  storage.check_access(_HF_DIR.value)  # both fail here, before the model is loaded
  storage.check_access(_OUT.value, write=True)
  BLT.from_hf(_HF_DIR.value).save(_OUT.value, format="orbax", dtype=_DTYPE.value)
  logging.info("converted %s -> %s", _HF_DIR.value, _OUT.value)


if __name__ == "__main__":
  from bltjax import cli
  flags.mark_flags_as_required(["hf_dir", "out"])
  cli.run(main)  # errors as one line (--verbose: traceback), exit 1
