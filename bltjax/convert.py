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
patching.entropy_model_checkpoint says otherwise). Every path may be local or gs://.
"""

from absl import flags, logging

from bltjax.runtime import process_setup

process_setup.set_defaults()

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face BLT checkpoint directory.")
_META_DIR = flags.DEFINE_string("meta_dir", None, "Meta BLT checkpoint directory (hub or "
                                "consolidated format).")
_ENTROPY_DIR = flags.DEFINE_string("entropy_dir", None, "Meta entropy model directory (with "
                                   "--meta_dir; default: entropy_model/ inside or beside it).")
_OUT = flags.DEFINE_string("out", None, "Output directory (local or gs://).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")


def main(argv):
  del argv
  from bltjax import BLT
  from bltjax.runtime import logs, storage
  logs.quiet_libraries()
  if (_HF_DIR.value is None) == (_META_DIR.value is None):
    raise ValueError("pass exactly one of --hf_dir and --meta_dir")
  if _ENTROPY_DIR.value is not None and _META_DIR.value is None:
    raise ValueError("--entropy_dir goes with --meta_dir (a --hf_dir checkpoint holds its "
                     "entropy model)")
  src = _HF_DIR.value or _META_DIR.value
  for path in (src, _ENTROPY_DIR.value):  # all fail here, before the model is loaded
    if path is not None:
      storage.check_access(path)
  storage.check_access(_OUT.value, write=True)
  if _HF_DIR.value is not None:
    blt = BLT.from_hf(src)
  else:
    blt = BLT.from_meta(src, _ENTROPY_DIR.value)
  blt.save(_OUT.value, format="orbax", dtype=_DTYPE.value)
  logging.info("converted %s -> %s", src, _OUT.value)


if __name__ == "__main__":
  from bltjax.runtime import cli
  flags.mark_flags_as_required(["out"])
  cli.run(main)  # errors as one line (--verbose: traceback), exit 1
