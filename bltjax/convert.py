"""Import a released BLT into an Orbax checkpoint:

    python -m bltjax.convert --hf_dir=DIR --out=OUT
    python -m bltjax.convert --meta_dir=DIR [--entropy_dir=DIR] --out=OUT

--hf_dir reads a Hugging Face `transformers` BLT (`config.json` + `model.safetensors` as written by
`BltForCausalLM.save_pretrained`, e.g. itazap/blt-1b-hf; no torch needed). --meta_dir reads a
checkpoint as Meta publishes it: the hub format (facebook/blt-1b, facebook/blt-7b: `config.json`
{"args": ...} + `model.safetensors` + `train_args.json`; no torch needed) or the consolidated one
(facebook/blt: `params.json` + `consolidated.pth`; needs `pip install "bltjax[pth]"`). Its entropy
model comes from --entropy_dir (e.g. facebook/blt-entropy, or a consolidated `entropy_model/`),
else from an `entropy_model/` inside or beside --meta_dir.

Writes a params-only Orbax checkpoint with its entropy model under OUT/entropy_model. Continue
pretraining from it with `python -m bltjax.main --config=experiments/1b.py
--config.init_from=OUT` (the entropy model recorded there cuts the patches unless
patching.entropy_model_checkpoint says otherwise). Every path may be local or gs://. The
conversion itself is `bltjax.inference.conversion.convert`.
"""

from absl import flags

from bltjax.inference import conversion
from bltjax.runtime import cli

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face BLT checkpoint directory.")
_META_DIR = flags.DEFINE_string("meta_dir", None, "Meta BLT checkpoint directory (hub or "
                                "consolidated format).")
_ENTROPY_DIR = flags.DEFINE_string("entropy_dir", None, "Meta entropy model directory (with "
                                   "--meta_dir; default: entropy_model/ inside or beside it).")
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://).", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def main(argv):
  cli.no_arguments(argv)
  conversion.convert(_OUT.value, hf_dir=_HF_DIR.value, meta_dir=_META_DIR.value,
                     entropy_dir=_ENTROPY_DIR.value, dtype=_DTYPE.value)


if __name__ == "__main__":
  cli.run(main)
