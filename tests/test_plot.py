"""Pictures (bltjax.viz, python -m bltjax.plot): the entropy figure shows the model's own
entropies and patches, PNG sizes, training curves from metrics.jsonl (bltjax.train.run_curves),
the commands, and TensorBoard images (the training hook, bltjax.train.entropy_figure)."""

import json
import math
import os
import struct
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from bltjax import BLT  # noqa: E402
from bltjax.model import patching, tokenizer  # noqa: E402
from bltjax.model.blt import ByteLatentTransformer  # noqa: E402
from bltjax.model.config import PatchingConfig, to_dict  # noqa: E402
from bltjax.model.lm import TransformerLM  # noqa: E402
from bltjax.train import entropy_figure, metrics, patcher, run_curves  # noqa: E402
from bltjax.viz import canvas, entropy  # noqa: E402
from tests import tiny  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "def f(x):\n    return x + 1  # Byte Latent Transformer, ünïcode\n"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def blt():
  """A tiny random BLT whose threshold (the median entropy over TEXT) cuts mixed patches."""
  cfg, ecfg = tiny.blt_config(), tiny.entropy_config()
  tokens = np.ones((1, 8), np.int32)
  # Only the entropy model computes here: the BLT's params are zeros (no compilation).
  shapes = jax.eval_shape(ByteLatentTransformer(cfg).init, jax.random.key(0), tokens,
                          np.ones((1, 9), np.int32))
  eparams = jax.jit(TransformerLM(ecfg).init)(jax.random.key(1), tokens)
  unbox = lambda t: jax.tree.map(lambda x: x.unbox(), t["params"],  # noqa: E731
                                 is_leaf=lambda x: hasattr(x, "unbox"))
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), unbox(shapes))
  pc = PatchingConfig("entropy", 0.0, None, False, None, None)
  model = BLT(cfg, params, patching_cfg=pc, entropy_cfg=ecfg, entropy_params=unbox(eparams),
              max_context=512)
  ent = model.entropies(tokenizer.encode(TEXT, add_eos=False)[None])
  model.patching_config = PatchingConfig("entropy", float(np.median(ent)), None, False, None,
                                         None)
  return model


def png_size(png: bytes) -> tuple[int, int]:
  """(width, height) from the IHDR chunk of a PNG."""
  assert png[:8] == PNG and png[12:16] == b"IHDR"
  return struct.unpack(">II", png[16:24])


def expected_size(n_bytes: int) -> tuple[int, int]:
  w, h = entropy.figure_size(n_bytes)
  return round(w * canvas.DPI), round(h * canvas.DPI)


def run_plot(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  res = subprocess.run([sys.executable, "-m", "bltjax.plot", *args], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=240)
  if check:
    assert res.returncode == 0, res.stderr[-3000:]
  return res


def test_figure_data_is_the_models_entropies_and_patches(blt):
  data = entropy.entropy_figure_data(blt, TEXT)
  raw = TEXT.encode()
  n = len(raw)
  tokens = tokenizer.encode(raw, add_eos=False)[None]
  assert data["bytes"] == raw and data["entropies"].shape == data["patch_starts"].shape == (n,)
  np.testing.assert_allclose(data["entropies"], blt.entropies(tokens)[0, :n], rtol=0, atol=1e-6)
  # Byte i is token i + 1: the BLT's own patch starts, shifted by the BOS.
  starts = patching.patch_start_positions(blt.patch_lengths(tokens), n + 1)[0]
  assert list(np.flatnonzero(data["patch_starts"]) + 1) == [s for s in starts if s >= 1]
  assert 5 < data["patch_starts"].sum() < n - 5
  assert data["threshold"] == blt.patching_config.threshold
  # A global threshold compares the entropy of the byte itself: the figure reads at a glance.
  h = data["entropies"]
  first = np.arange(n) == 0
  np.testing.assert_array_equal(data["patch_starts"], first | (h > data["threshold"]))

  low = float(np.quantile(h, 0.2))
  lower = entropy.entropy_figure_data(blt, TEXT, threshold=low)
  np.testing.assert_array_equal(lower["entropies"], h)
  np.testing.assert_array_equal(lower["patch_starts"], first | (h > low))
  assert lower["threshold"] == low
  want = patching.patch_start_positions(patching.patch_lengths_from_entropies(
      blt.entropies(tokens), low), n + 1)[0]
  assert list(np.flatnonzero(lower["patch_starts"]) + 1) == want[1:]

  mono = entropy.entropy_figure_data(blt, TEXT, threshold=0.01, monotonic=True)
  rise = np.concatenate([[np.inf], np.diff(h)]) > 0.01
  np.testing.assert_array_equal(mono["patch_starts"], (np.arange(n) < 2) | rise)
  assert mono["threshold"] is None and "monotonic" in mono["mode"]
  with pytest.raises(ValueError, match="--monotonic needs --threshold"):
    entropy.entropy_figure_data(blt, TEXT, monotonic=True)


def test_byte_labels():
  labels = entropy.byte_labels("a b\n\tü\x00".encode() + b"\xff")
  assert labels == ["a", "␣", "b", "⏎", "⇥", "ü", "·", "00", "ff"]


def test_figure_grows_with_the_bytes(blt):
  sizes = []
  for n in (40, 90, 250):
    data = entropy.entropy_figure_data(blt, (TEXT * 5)[:n])
    png = canvas.figure_png(entropy.draw_entropy(data))
    assert png_size(png) == expected_size(len(data["bytes"]))
    sizes.append(png_size(png))
  assert sizes[0][0] < sizes[1][0] <= sizes[2][0]  # wider up to a row of ROW_BYTES bytes,
  assert sizes[2][1] > sizes[1][1]                 # then more rows


def test_entropy_command(blt, tmp_path):
  blt.save(str(tmp_path / "model"))
  out = tmp_path / "fig.png"
  text = TEXT * 4
  run_plot("entropy", f"--checkpoint={tmp_path}/model", f"--text={text}", f"--out={out}",
           "--max_bytes=150")
  assert png_size(out.read_bytes()) == expected_size(150)


def write_run(workdir, records, batch_size=4, seq_len=8):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(dict(train=dict(batch_size=batch_size), data=dict(seq_len=seq_len)), f)


LN2 = math.log(2.0)
RECORDS = [  # 4 x 8 = 32 bytes per step
    dict(step=2, loss=3 * LN2, flops_per_byte=10.0, bytes_per_sec=1.0),
    dict(step=3, eval_bpb=2.5, eval_loss=2.5 * LN2),
    dict(step=4, loss=9.0, bpb=9.0, flops_per_byte=99.0),  # replaced by the resumed run's
    dict(step=4, loss=2 * LN2, bpb=2.0, flops_per_byte=20.0),
    dict(step=6, loss=1.5 * LN2, bpb=1.5, flops_per_byte=30.0),
    dict(step=6, eval_bpb=1.75),
    dict(step=8, eval_bpb=1.5),  # after the last training record: at its rate
]


def test_curve_data(tmp_path):
  wd = str(tmp_path / "run")
  write_run(wd, RECORDS)
  xs, ys = run_curves.curve_data(wd, "step", "bpb")
  np.testing.assert_allclose(xs, [2, 4, 6])
  np.testing.assert_allclose(ys, [3.0, 2.0, 1.5])
  xs, ys = run_curves.curve_data(wd, "bytes", "eval_bpb")
  np.testing.assert_allclose(xs, [96, 192, 256])
  np.testing.assert_allclose(ys, [2.5, 1.75, 1.5])
  # FLOPs: 2 steps x 32 bytes x 10, then 2 x 32 x 20, then 2 x 32 x 30.
  xs, _ = run_curves.curve_data(wd, "flops", "bpb")
  np.testing.assert_allclose(xs, [640, 1920, 3840])
  xs, _ = run_curves.curve_data(wd, "flops", "eval_bpb")
  np.testing.assert_allclose(xs, [640 + 32 * 20, 3840, 3840 + 2 * 32 * 30])
  # A token model logs its bytes per token: bytes follow it window by window.
  tok = str(tmp_path / "tokens")
  write_run(tok, [dict(step=2, loss=1.0, bytes_per_token=4.0, flops_per_byte=1.0),
                  dict(step=4, loss=1.0, bytes_per_token=2.0, flops_per_byte=1.0)])
  xs, _ = run_curves.curve_data(tok, "bytes", "bpb")
  np.testing.assert_allclose(xs, [2 * 32 * 4, 2 * 32 * 4 + 2 * 32 * 2])

  with pytest.raises(ValueError, match="no record has 'eval/wiki/bpb'"):
    run_curves.curve_data(wd, "step", "eval/wiki/bpb")
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    run_curves.curve_data(str(tmp_path / "nothing"), "step", "bpb")
  with pytest.raises(ValueError, match="--x='tokens'"):
    run_curves.curve_data(wd, "tokens", "bpb")
  os.remove(os.path.join(wd, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    run_curves.curve_data(wd, "bytes", "bpb")


def test_curves_command(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  write_run(a, RECORDS)
  write_run(b, [dict(r, step=r["step"] * 2) for r in RECORDS])
  out = tmp_path / "curves.png"
  run_plot("curves", f"--workdirs={a},{b}", "--x=flops", "--y=eval_bpb", f"--out={out}",
           "--logx", "--labels=small,large")
  assert png_size(out.read_bytes()) == (700, 450)
  res = run_plot("curves", f"--workdirs={a},{tmp_path}/missing", f"--out={out}", check=False)
  assert res.returncode == 1 and "Traceback" not in res.stderr
  assert res.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path}/missing: no metrics.jsonl (not a training workdir?)")


def tensorboard_images(tb_dir, tag):
  """[(step, Summary.Image)] of `tag` in the event files under `tb_dir` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  found = []
  for name in sorted(os.listdir(tb_dir)):
    with open(os.path.join(tb_dir, name), "rb") as f:
      blob = f.read()
    i = 0
    while i + 12 <= len(blob):
      (size,) = struct.unpack("<Q", blob[i:i + 8])
      event = event_pb2.Event.FromString(blob[i + 12:i + 12 + size])
      i += 12 + size + 4
      found += [(event.step, v.image) for v in event.summary.value
                if v.tag == tag and v.HasField("image")]
  return found


def test_write_image(blt, tmp_path):
  png = canvas.figure_png(entropy.draw_entropy(entropy.entropy_figure_data(blt, TEXT)))
  writer = metrics.MetricWriter(str(tmp_path / "wd"))
  writer.write_image(7, "patches/entropy", png)
  writer.close()
  [(step, image)] = tensorboard_images(str(tmp_path / "wd" / "tensorboard"), "patches/entropy")
  assert step == 7 and (image.width, image.height) == png_size(png)
  assert image.encoded_image_string[:8] == PNG
  # The gs:// branch: under its lock, marked for the next upload.
  from tensorboardX import SummaryWriter
  remote = metrics.MetricWriter.__new__(metrics.MetricWriter)
  remote.enabled, remote.remote, remote._dirty = True, True, False
  remote._lock, remote._tb = threading.Lock(), SummaryWriter(str(tmp_path / "remote"))
  remote.write_image(8, "patches/entropy", png)
  remote._tb.close()
  assert remote._dirty and tensorboard_images(str(tmp_path / "remote"), "patches/entropy")


class _Evaluator:  # what TrainingFigure reads of heldout.Evaluator: its first eval batch
  def __init__(self, rows):
    self.rows = [np.array(rows, np.int32)[0]]

  def first_rows(self):
    return self.rows


def test_training_figure(blt, tmp_path):
  blt.save(str(tmp_path / "model"))
  spec = patcher.EntropySpec(str(tmp_path / "model" / "entropy_model"),
                             to_dict(blt.entropy_config))
  run = patcher.Patcher(blt.patching_config, 64, "host", spec, None, {})
  doc = tokenizer.encode(TEXT)  # BOS ... EOS, then the next document
  row = np.concatenate([doc, tokenizer.encode("next document")])[None]
  evaluator = _Evaluator(row)
  assert entropy_figure.eval_snippet(evaluator) == TEXT.encode()
  # No byte: the constant.
  assert entropy_figure.eval_snippet(_Evaluator([[1] * 8])) == entropy_figure.SNIPPET
  writer = metrics.MetricWriter(str(tmp_path / "wd"))
  figure = entropy_figure.TrainingFigure.create(run)
  figure.log(writer, 4, evaluator)
  figure.log(writer, 8, evaluator)
  writer.close()
  images = tensorboard_images(str(tmp_path / "wd" / "tensorboard"), entropy_figure.TAG)
  assert [s for s, _ in images] == [4, 8] and not figure.off
  assert (images[0][1].width, images[0][1].height) == expected_size(len(TEXT.encode()))
  # The same picture as the checkpoint's own figure (same entropies and patches).
  want = canvas.figure_png(entropy.draw_entropy(entropy.entropy_figure_data(blt, TEXT),
                                               title="step 4: next-byte entropy and patches of a "
                                               "held-out snippet"))
  assert images[0][1].encoded_image_string == _reencoded(want)

  assert entropy_figure.TrainingFigure.create(None) is None
  broken = entropy_figure.TrainingFigure.create(patcher.Patcher(
      blt.patching_config, 64, "host", patcher.EntropySpec(str(tmp_path / "none"), spec.model),
      None, {}))
  broken.log(writer, 4, evaluator)  # logged, never raised
  assert broken.off


def _reencoded(png: bytes) -> bytes:
  """`png` as tensorboardX stores it (decoded to RGB and encoded again by PIL)."""
  import io
  from PIL import Image
  from tensorboardX.summary import make_image
  rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
  return make_image(rgb).encoded_image_string


@pytest.mark.long  # two tiny training stages (~2-3 min on 2 busy cores)
def test_training_run_logs_the_entropy_figure(tmp_path):
  from bltjax.train import experiment, trainer
  workdir = str(tmp_path / "wd")
  config = experiment.tiny(experiment.load(os.path.join(REPO, "experiments", "debug.py")))
  config.train.entropy_figure = True  # tiny() turns it off
  trainer.run(config, workdir)
  images = tensorboard_images(os.path.join(workdir, "tensorboard"), entropy_figure.TAG)
  assert [s for s, _ in images] == [4]
  assert not tensorboard_images(os.path.join(workdir, "entropy_model", "tensorboard"),
                                entropy_figure.TAG)
  # The BLT workdir plots with its stage-1 entropy model (WORKDIR/entropy_model).
  data = entropy.entropy_figure_data(BLT.load(workdir), TEXT)
  assert data["threshold"] == BLT.load(workdir).patching_config.threshold
  out = tmp_path / "fig.png"
  run_plot("entropy", f"--checkpoint={workdir}", f"--text={TEXT}", f"--out={out}")
  assert png_size(out.read_bytes()) == expected_size(len(TEXT.encode()))
