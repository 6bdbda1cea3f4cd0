"""Offline entropies (python -m bltjax.preprocess): stored rows are the online pipeline's rows,
on 1 or 2 processes, after a kill and a re-run; training cuts any patching from them."""

import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from bltjax.checkpoint import checkpointer
from bltjax.data import pipeline, preprocessed as pre
from bltjax.model import patching
from bltjax.model.config import LMConfig
from bltjax.model.lm import TransformerLM
from bltjax.train import experiment, patcher

from tests.gcs import gcs  # noqa: F401  (fixture)
from tests.test_data_pipeline import corpus  # noqa: F401  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(REPO, "experiments", "debug.py")
# One row per device and call: the devices compute the same [1, N] shapes in every run layout.
ROWS_PER_DEVICE = 1


def overrides(corpus, model):
  return {"data.source": "text", "data.paths": (str(corpus / "*.txt"),), "data.seq_len": 64,
          "data.eval_fraction": 0.25, "data.shards": 2, "model.encoder.attn_window": 32,
          "model.decoder.attn_window": 32, "patching.max_patches": 40,
          "patching.entropy_model_checkpoint": str(model), "train.steps": 3,
          "train.batch_size": 4, "train.eval_batches": 1}


def make_config(corpus, model, **extra):
  cfg = experiment.tiny(experiment.load(DEBUG))
  for key, value in (overrides(corpus, model) | extra).items():
    section, field = key.split(".", 1)
    node = cfg[section]
    *path, last = field.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


@pytest.fixture(scope="module")
def entropy_model(tmp_path_factory):
  """A tiny entropy model with random params, scaled up so that entropies vary."""
  return save_entropy_model(tmp_path_factory.mktemp("ent"), seed=0)


def save_entropy_model(directory, seed):
  stage = experiment.entropy_stage_config(experiment.tiny(experiment.load(DEBUG)))
  model = TransformerLM(LMConfig.from_dict(stage.model.to_dict()))
  params = nn.unbox(model.init(jax.random.key(seed), np.ones((1, 8), np.int32))["params"])
  params = jax.tree.map(lambda x: np.asarray(x) * 4.0, params)
  checkpointer.save_params(str(directory), params, stage.to_dict(), {})
  return directory


def stored_rows(directory) -> dict:
  """{(split, shard): decoded rows} of every shard file."""
  m = pre.read_manifest(directory)
  out = {}
  for split in m["rows_per_shard"]:
    for s in range(m["shards"]):
      r = ArrayRecordReader(str(pre.shard_path(directory, split, s, m["shards"])))
      recs = np.stack([np.frombuffer(x, np.uint8) for x in r.read_all()])
      out[split, s] = pre.decode_rows(recs, m["seq_len"], m["entropy_dtype"])
  return out


def assert_same_rows(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    for field in a[key]:
      np.testing.assert_array_equal(a[key][field], b[key][field], err_msg=f"{key} {field}")


def starts(lengths_BxP, n=64):
  """bool [B, N + 1]: where patches start."""
  mask = np.zeros((len(lengths_BxP), n + 1), bool)
  for r, row in enumerate(patching.patch_start_positions(lengths_BxP, n + 1)):
    mask[r, row] = True
  return mask


def run_preprocess(cfg, out, dtype="float32"):
  from bltjax.train import preprocess
  return preprocess.preprocess(cfg, str(out), entropy_dtype=dtype,
                               rows_per_device=ROWS_PER_DEVICE)


def cli(corpus, model, out, dtype="float32"):
  flags = [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
           for k, v in overrides(corpus, model).items()]
  return [f"--config={DEBUG}:tiny", f"--out={out}", f"--entropy_dtype={dtype}",
          f"--rows_per_device={ROWS_PER_DEVICE}", *flags]


def env(**extra):
  return dict(os.environ, JAX_PLATFORMS="cpu", BLTJAX_MALLOC_TUNING="0", **extra)


def test_stored_rows_are_the_online_rows_and_patch_like_online(tmp_path, corpus, entropy_model):
  cfg = make_config(corpus, entropy_model)
  out = tmp_path / "pre"
  m = run_preprocess(cfg, out)
  assert m["complete"] and m["rows_per_shard"] == {"train": 6, "eval": 2}
  assert m["entropy_model"]["sha256"] == checkpointer.params_hash(
      checkpointer.load_params(str(entropy_model))[0])
  ent16 = tmp_path / "pre16"
  run_preprocess(cfg, ent16, dtype="float16")
  sample = pre.sample_entropies(make_config(corpus, entropy_model,
                                            **{"data.preprocessed_dir": str(out)}), 4)
  assert sample.shape == (4, 64) and sample.dtype == np.float32
  # Two patchings cut from the same stored entropies, no preprocess re-run. Round thresholds:
  # a calibrated one is a stored value, which the corpus' repetitive documents repeat many times.
  for threshold, max_patches, max_len in ((0.25, 40, None), (0.6, 20, 6)):
    kw = {"patching.threshold": threshold, "patching.max_patches": max_patches,
          "patching.max_patch_length": max_len}
    online_cfg = make_config(corpus, entropy_model, **kw)
    online = patcher.setup(online_cfg, str(entropy_model), None).host_transform()
    starts_differ = 0
    for directory, exact in ((out, True), (ent16, False)):
      cfg_pre = make_config(corpus, entropy_model, **kw, **{"data.preprocessed_dir":
                                                             str(directory)})
      manifest = pre.read_manifest(directory)
      offline = patcher.setup(cfg_pre, None, None, stored=manifest).host_transform()
      for split, steps in (("train", 3), ("eval", 1)):
        a = iter(pipeline.make_dataset(online_cfg, split, local_batch_size=4, patch=online,
                                       process_index=0, process_count=1))
        b = iter(pipeline.make_dataset(cfg_pre, split, local_batch_size=4, patch=offline,
                                       process_index=0, process_count=1))
        for _ in range(steps):
          x, y = next(a), next(b)
          for key in ("tokens", "targets", "mask", "doc_flag_counts"):
            np.testing.assert_array_equal(x[key], y[key])
          if exact:
            np.testing.assert_array_equal(x["patch_lengths"], y["patch_lengths"])
          else:
            starts_differ += int(np.sum(starts(x["patch_lengths"]) != starts(y["patch_lengths"])))
    print(f"float16 entropies, threshold {threshold}, max_patches {max_patches}: "
          f"{starts_differ} of {16 * 65} patch start flags differ from float32/online")


def test_two_processes_write_the_rows_of_one(tmp_path, corpus, entropy_model):
  one = tmp_path / "one"
  run_preprocess(make_config(corpus, entropy_model), one)
  two = tmp_path / "two"
  launch = [os.path.join(REPO, "launch", "local_multiprocess.sh")]
  subprocess.run(["bash", *launch, *cli(corpus, entropy_model, two)], check=True, cwd=REPO,
                 env=env(MODULE="bltjax.preprocess", NUM_PROCESSES="2", DEVICES_PER_PROCESS="2"),
                 timeout=300)
  assert pre.read_manifest(two)["complete"]
  assert_same_rows(stored_rows(one), stored_rows(two))


def test_killed_run_resumes_with_the_same_rows(tmp_path, corpus, entropy_model):
  out = tmp_path / "killed"
  cmd = [sys.executable, "-m", "bltjax.preprocess", *cli(corpus, entropy_model, out)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env(
      BLTJAX_PREPROCESS_SLEEP_AFTER_SHARD="5",
      XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while not list(out.glob("*/*.done")):
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() < deadline
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = list(out.glob("*/*.done"))
  assert len(finished) == 1, finished  # 4 shard files: 2 data shards x (train, eval)
  shard = finished[0].with_suffix(".arrayrecord")
  inode = shard.stat().st_ino
  # What a kill inside a shard leaves: a temporary file, or a renamed file without its marker.
  undone = sorted(set(out.glob("*/*.arrayrecord*")) - {shard} | {
      out / "train" / "shard-00001-of-00002.arrayrecord.tmp-host-1"})
  for path in undone:
    path.write_bytes(b"partial")
  cfg = make_config(corpus, entropy_model)
  with pytest.raises(ValueError, match="incomplete: 3 shard"):
    next(iter(pipeline.make_dataset(make_config(
        corpus, entropy_model, **{"data.preprocessed_dir": str(out)}), "train",
        local_batch_size=4, process_index=0, process_count=1)))
  run_preprocess(cfg, out)
  assert shard.stat().st_ino == inode  # skipped, not rewritten
  assert not list(out.glob("*/*.tmp-*"))
  ref = tmp_path / "ref"
  run_preprocess(cfg, ref)
  assert_same_rows(stored_rows(ref), stored_rows(out))


def test_batches_resume_from_a_state_and_repeat_after_the_stored_rows(tmp_path, corpus,
                                                                      entropy_model, caplog):
  out = tmp_path / "pre"
  run_preprocess(make_config(corpus, entropy_model), out)
  cfg = make_config(corpus, entropy_model, **{"data.preprocessed_dir": str(out)})
  ds = pipeline.make_dataset(cfg, "train", local_batch_size=4, process_index=0, process_count=1)
  it = iter(ds)
  first = next(it)
  state = it.get_state()
  second = next(it)
  again = iter(ds)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["entropies"], second["entropies"])
  next(it)
  with caplog.at_level("WARNING"):
    fourth = next(it)  # 3 steps of 4 rows are stored: the 4th batch is the first again
  for key in first:
    np.testing.assert_array_equal(first[key], fourth[key])
  assert "stored rows are used up" in caplog.text


def test_clear_errors(tmp_path, corpus, entropy_model):
  out = tmp_path / "pre"
  cfg = make_config(corpus, entropy_model)
  run_preprocess(cfg, out)
  read = lambda **kw: pipeline.make_dataset(
      make_config(corpus, entropy_model, **{"data.preprocessed_dir": str(out)} | kw), "train",
      local_batch_size=4, process_index=0, process_count=1)
  read()
  with pytest.raises(ValueError, match="data.seq_len=64, this run has data.seq_len=32"):
    read(**{"data.seq_len": 32, "model.encoder.attn_window": 16, "model.decoder.attn_window": 16})
  with pytest.raises(ValueError, match="2 data shards, this run reads 4"):
    read(**{"data.shards": 4})
  other = save_entropy_model(tmp_path / "other_ent", seed=1)
  with pytest.raises(ValueError, match="holds the entropies of entropy model"):
    # Checked where the run's patching is set up (the reader in data/ loads no checkpoint).
    patcher.setup(make_config(corpus, entropy_model, **{
        "data.preprocessed_dir": str(out), "patching.entropy_model_checkpoint": str(other)}),
        None, None, stored=pre.read_manifest(out))
  with pytest.raises(FileNotFoundError, match="no manifest.json"):
    pre.read_manifest(tmp_path / "nothing")
  # Another config into the same --out; shards that do not divide.
  with pytest.raises(ValueError, match="holds rows written with another config .rows_per_shard"):
    run_preprocess(make_config(corpus, entropy_model, **{"train.steps": 6}), out)
  with pytest.raises(ValueError, match="does not split over 3 data shards"):
    run_preprocess(make_config(corpus, entropy_model, **{"data.shards": 3}), tmp_path / "x")
  from bltjax.train import preprocess
  with pytest.raises(ValueError, match="not a multiple of --num_training_processes=4"):
    preprocess.num_shards(make_config(corpus, entropy_model, **{"data.shards": 2}), 4)
  (out / "eval" / "shard-00001-of-00002.done").unlink()
  with pytest.raises(ValueError, match=r"incomplete: 1 shard\(s\) unfinished \(eval/shard-00001"):
    read()


def test_gcs_directory(tmp_path, corpus, entropy_model, gcs):
  """--out and data.preprocessed_dir on gs:// (emulator): shards are written locally and copied
  up; training reads them in place. The clients read the emulator's address at import: the gs://
  side runs in a subprocess."""
  local = tmp_path / "local"
  run_preprocess(make_config(corpus, entropy_model), local)
  url = gcs.gs("pre")
  proc = gcs.python(f"""
from bltjax.runtime import process_setup
process_setup.set_defaults()  # the XLA flags of this process (tests/conftest.py): same entropies
import logging, pathlib
import numpy as np
from bltjax.data import pipeline
from tests import test_preprocess as t
logging.basicConfig()
logging.getLogger().setLevel(logging.INFO)
corpus, model = pathlib.Path({str(corpus)!r}), pathlib.Path({str(entropy_model)!r})
t.run_preprocess(t.make_config(corpus, model), {url!r})
t.run_preprocess(t.make_config(corpus, model), {url!r})  # finished: every shard skipped
a, b = (iter(pipeline.make_dataset(t.make_config(corpus, model, **{{
    "data.preprocessed_dir": d, "data.read_threads": 0, "data.read_buffer": 0}}), "train",
    local_batch_size=4, process_index=0, process_count=1)) for d in ({str(local)!r}, {url!r}))
for _ in range(4):
  x, y = next(a), next(b)
  assert all(np.array_equal(x[k], y[k]) for k in x)
print("same batches")
""")
  assert "same batches" in proc.stdout
  assert "skipped 4 shard file(s)" in proc.stderr
  names = gcs.list("pre/")
  assert len(names) == 9 and not [n for n in names if "tmp" in n], names
  assert gcs.read("pre/train/shard-00001-of-00002.arrayrecord") == (
      local / "train" / "shard-00001-of-00002.arrayrecord").read_bytes()


def test_mixture_stores_each_sources_eval_rows(tmp_path, corpus, entropy_model):
  mix = ({"name": "low", "source": "text", "paths": (str(corpus / "doc0*.txt"),), "weight": 1.0},
         {"name": "high", "source": "text", "paths": (str(corpus / "doc[12]*.txt"),),
          "weight": 2.0})
  mixed = {"data.paths": (), "data.mixture": mix, "data.eval_fraction": 0.5}
  cfg = make_config(corpus, entropy_model, **mixed)
  out = tmp_path / "pre"
  m = run_preprocess(cfg, out)
  assert m["rows_per_shard"] == {"train": 6, "eval": 2, "eval_by_source/low": 2,
                                 "eval_by_source/high": 2}
  cfg_pre = make_config(corpus, entropy_model, **mixed, **{"data.preprocessed_dir": str(out)})
  for source in (None, "low", "high"):
    split = "train" if source is None else "eval"
    online = next(iter(pipeline.make_dataset(cfg, split, local_batch_size=4, source=source,
                                             process_index=0, process_count=1)))
    stored = next(iter(pre.batches(cfg_pre, split, local_batch_size=4, process_index=0,
                                   process_count=1, source=source)))
    for key in online:
      np.testing.assert_array_equal(online[key], stored[key])


@pytest.mark.long  # two short training runs (~1 min): keeps the default suite under 15 min
def test_training_on_stored_entropies_matches_online_patching(tmp_path, corpus, entropy_model):
  """The same losses and patch statistics: online host patching (entropy model in the input
  pipeline) vs stored float32 entropies cut on the accelerators (no entropy model loaded)."""
  from bltjax.train import metrics, trainer
  settings = {"patching.threshold": 0.4, "train.steps": 4, "train.log_every": 1,
              "train.eval_every": 4, "train.checkpoint_every": 4, "train.batch_size": 8}
  out = tmp_path / "pre"
  run_preprocess(make_config(corpus, entropy_model, **settings), out)
  trainer.run(make_config(corpus, entropy_model, **settings), str(tmp_path / "online"))
  stored = make_config(corpus, entropy_model, **settings, **{
      "data.preprocessed_dir": str(out), "patching.device": "accelerator"})
  trainer.run(stored, str(tmp_path / "stored"))
  a, b = (metrics.read_metrics(str(tmp_path / n)) for n in ("online", "stored"))
  assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 5
  for x, y in zip(a, b):
    for key in ("loss", "bytes_per_patch", "patch_overflow", "eval_bpb"):
      if key in x:
        np.testing.assert_allclose(y[key], x[key], rtol=1e-6, err_msg=f"step {x['step']} {key}")
