"""gs:// everywhere, against a local Cloud Storage emulator (tests/gcs.py): checkpoints, metrics and
TensorBoard events, BLT.save/load and HF exports, and one-line errors for a missing bucket or
missing credentials. The code under test runs in subprocesses: the storage clients read the
emulator's address when they are imported."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import portpicker
import pytest

from tests.gcs import REPO, gcs  # noqa: F401 (the fixture)

DEBUG = os.path.join(REPO, "experiments", "debug.py")


def _code(src: str) -> str:
  return textwrap.dedent(src).strip() + "\n"


def test_checkpoints_in_a_bucket(gcs):
  """Checkpointer save/restore (state + grain iterator), find_checkpoint, load_params,
  restore_params, save_params and recorded_entropy_model on a gs:// workdir."""
  run, out = gcs.gs("ckpt/run"), gcs.gs("ckpt/params")
  gcs.python(_code(f"""
    import grain, jax, numpy as np
    from bltjax.checkpoint import checkpointer
    assert checkpointer.checkpoint_dir("{run}") == "{run}/checkpoints"
    state = {{"params": {{"w": np.arange(6.0).reshape(2, 3)}}, "opt": {{"m": np.ones(3)}}}}
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt = checkpointer.Checkpointer("{run}")
    for step in (1, 2):
      assert next(it) == step - 1
      ckpt.save(step, jax.tree.map(lambda x: x * step, state), it, {{"model_type": "blt"}},
                {{"entropy_model": {{"path": "entropy_model"}}}})
    ckpt.close()

    ckpt = checkpointer.Checkpointer("{run}")
    assert ckpt.latest_step() == 2
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), state)
    fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
    restored, fresh = ckpt.restore(2, abstract, fresh)
    np.testing.assert_array_equal(restored["params"]["w"], 2 * state["params"]["w"])
    assert next(fresh) == 2  # the iterator continues where it was saved
    assert ckpt.metadata(2)[0] == {{"model_type": "blt"}}
    ckpt.close()

    for path in ("{run}", "{run}/checkpoints", "{run}/checkpoints/1"):
      print(path, checkpointer.find_checkpoint(path))
    params, config, meta, step = checkpointer.load_params("{run}")
    assert step == 2 and config == {{"model_type": "blt"}}
    np.testing.assert_array_equal(params["w"], 2 * state["params"]["w"])
    again = checkpointer.restore_params("{run}", abstract["params"])
    np.testing.assert_array_equal(again["w"], 2 * state["params"]["w"])
    assert checkpointer.recorded_entropy_model("{run}") == "{run}/entropy_model"

    checkpointer.save_params("{out}", {{"w": np.ones(4, np.float32)}}, {{"model_type": "x"}}, {{}}, 7)
    params, _, _, step = checkpointer.load_params("{out}")
    assert step == 7 and params["w"].tolist() == [1.0] * 4
  """))
  names = gcs.list("ckpt/")
  assert "ckpt/run/checkpoints/2/commit_success.txt" in names, names[:20]
  assert any(n.startswith("ckpt/run/checkpoints/2/data/") for n in names)
  assert "ckpt/params/checkpoints/7/commit_success.txt" in names
  assert not os.path.exists(os.path.join(REPO, "gs:")), "a gs:// path was used as a local path"


def _tb_scalars(blob: bytes) -> dict:
  """{tag: [(step, value)]} of one TensorBoard event file (TFRecord: length, crc, data, crc)."""
  from tensorboardX.proto import event_pb2
  out, pos = {}, 0
  while pos < len(blob):
    (n,) = struct.unpack("<Q", blob[pos:pos + 8])
    event = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in event.summary.value:
      out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_metrics_and_tensorboard_in_a_bucket_across_two_sessions(gcs):
  """A resumed run appends to the same gs:// metrics.jsonl; records become visible while the
  writer runs (background upload), and each session's TensorBoard events land in the bucket."""
  workdir = gcs.gs("metrics/run")
  session = _code(f"""
    import sys, time
    from bltjax.train import metrics
    first = int(sys.argv[1])
    w = metrics.MetricWriter("{workdir}", flush_secs=0.1)
    for step in range(first, first + 3):
      w.write(step, {{"loss": 1.0 / step, "note": "text is kept"}})
    def seen():
      try:
        return len(metrics.read_metrics("{workdir}"))
      except FileNotFoundError:
        return 0
    deadline = time.time() + 20
    while seen() < first + 2 and time.time() < deadline:
      time.sleep(0.05)  # uploaded in the background, before close()
    print("seen before close:", seen())
    w.write(first + 3, {{"loss": 0.5}})
    w.close()
    print("read back:", [r["step"] for r in metrics.read_metrics("{workdir}")])
  """)
  for first in (1, 5):
    proc = subprocess.run([sys.executable, "-c", session, str(first)], cwd=REPO,
                          env=gcs.environ(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"seen before close: {first + 2}" in proc.stdout
  records = [json.loads(line) for line in gcs.read("metrics/run/metrics.jsonl").splitlines()]
  assert [r["step"] for r in records] == list(range(1, 9))
  assert records[0] == {"step": 1, "loss": 1.0, "note": "text is kept"}
  events = [n for n in gcs.list("metrics/run/tensorboard/") if "tfevents" in n]
  assert len(events) == 2, events
  steps = sorted(s for n in events for s, _ in _tb_scalars(gcs.read(n))["loss"])
  assert steps == list(range(1, 9))
  assert f"read back: {list(range(1, 9))}" in proc.stdout  # read_metrics, from the bucket


_TINY_BLT = """
  import jax, numpy as np
  from bltjax import BLT
  from bltjax.model.blt import ByteLatentTransformer
  from bltjax.model.config import PatchingConfig
  from bltjax.model.lm import TransformerLM
  from tests import tiny
  cfg, ecfg = tiny.blt_config(), tiny.entropy_config()
  t = np.ones((1, 8), np.int32)
  unbox = lambda p: jax.tree.map(lambda x: x.unbox(), p, is_leaf=lambda x: hasattr(x, "unbox"))
  params = unbox(jax.jit(ByteLatentTransformer(cfg).init)(jax.random.key(0), t,
                                                          np.ones((1, 9), np.int32)))
  eparams = unbox(jax.jit(TransformerLM(ecfg).init)(jax.random.key(1), t))
  pc = PatchingConfig("entropy", 2.0, None, False, None, None)
  blt = BLT(cfg, params["params"], patching_cfg=pc, entropy_cfg=ecfg,
            entropy_params=eparams["params"], max_context=256)

  def same(a, b, tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32), y, atol=tol),
                 a, b)
"""


def test_blt_save_load_and_hf_export_in_a_bucket(gcs, tmp_path):
  """BLT.save (orbax; hf in float32 and bfloat16) to gs:// and BLT.load back: the same params,
  entropy model and patching; the HF files equal a local export byte for byte; the export and
  convert CLIs read and write gs://."""
  local = str(tmp_path / "hf")
  gcs.python(_code(_TINY_BLT) + _code(f"""
    for fmt, dtype, tol in [("orbax", "float32", 0), ("hf", "float32", 0),
                            ("hf", "bfloat16", 0.01)]:
      path = "{gcs.gs('blt')}/" + fmt + "-" + dtype
      blt.save(path, format=fmt, dtype=dtype)
      got = BLT.load(path)
      same(got.params, blt.params, tol)
      same(got.entropy_params, blt.entropy_params, tol)
      assert got.patching_config.threshold == 2.0 and got.max_context == 256, path
    blt.save("{local}", format="hf")
  """))
def _one_line_error(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode != 0, proc.stdout
  return proc.stderr.strip().splitlines()[-1]


_CHECKS = """
  import sys
  from bltjax import BLT
  from bltjax.checkpoint import checkpointer
  from bltjax.runtime import storage
  for call in (lambda: storage.check_access(sys.argv[1], write=True),
               lambda: storage.check_access(sys.argv[1]),
               lambda: checkpointer.Checkpointer(sys.argv[1]),
               lambda: BLT.load(sys.argv[1])):
    try:
      call()
      print("no error")
    except (OSError, ValueError) as e:
      print(type(e).__name__ + ": " + str(e))
"""


def test_missing_bucket_fails_early_with_one_line(gcs, tmp_path):
  url = "gs://no-such-bucket-bltjax/run"
  proc = subprocess.run([sys.executable, "-c", _code(_CHECKS), url], cwd=str(tmp_path),
                        env=gcs.environ(), capture_output=True, text=True, timeout=120)
  want = f"FileNotFoundError: {url}: bucket gs://no-such-bucket-bltjax does not exist"
  assert proc.stdout.splitlines() == [want] * 4, proc.stdout + proc.stderr[-2000:]
  # A path in an existing bucket that holds nothing: reading fails, writing does not.
  proc = subprocess.run([sys.executable, "-c", _code(_CHECKS), gcs.gs("nothing/here")],
                        cwd=str(tmp_path), env=gcs.environ(), capture_output=True, text=True,
                        timeout=120)
  lines = proc.stdout.splitlines()
  assert lines[0] == "no error" and lines[1].startswith("FileNotFoundError: ") and \
      lines[1].endswith("nothing at gs://bltjax-test/nothing/here"), lines
  # The CLIs stop before loading anything, with one line that names the problem.
  proc = subprocess.run([sys.executable, "-m", "bltjax.export", f"--workdir={tmp_path}",
                         f"--out={url}"], cwd=str(tmp_path), env=gcs.environ(),
                        capture_output=True, text=True, timeout=120)
  assert _one_line_error(proc) == f"error: {url}: bucket gs://no-such-bucket-bltjax does not exist"
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "gs:")


def test_missing_credentials_fail_early_with_one_line(gcs, tmp_path):
  """Real Cloud Storage (no emulator variables) without credentials: no gcloud login under HOME,
  no GOOGLE_APPLICATION_CREDENTIALS, and no metadata server (pointed at a closed local port, as
  off Google Cloud). Also a key file that does not exist, and an emulator that is not running."""
  closed = f"127.0.0.1:{portpicker.pick_unused_port()}"
  no_emulator = dict(STORAGE_EMULATOR_HOST=None, TENSORSTORE_GCS_HTTP_URL=None,
                     GOOGLE_AUTH_TOKEN_FOR_TESTING=None, HOME=str(tmp_path),
                     GCE_METADATA_HOST=closed, GCE_METADATA_IP=closed, NO_GCE_CHECK="true")
  url = gcs.gs("run")
  key = tmp_path / "key.json"  # does not exist
  cases = [
      (dict(no_emulator, GOOGLE_APPLICATION_CREDENTIALS=None),
       f"ValueError: {url}: no Google Cloud credentials ("),
      (dict(no_emulator, GOOGLE_APPLICATION_CREDENTIALS=str(key)),
       f"ValueError: {url}: no Google Cloud credentials (File {key} was not found"),
      (dict(STORAGE_EMULATOR_HOST=f"http://{closed}", TENSORSTORE_GCS_HTTP_URL=f"http://{closed}"),
       f"ValueError: {url}: cannot reach Cloud Storage at http://{closed}: "),
      (dict(TENSORSTORE_GCS_HTTP_URL=None),
       f"ValueError: {url}: STORAGE_EMULATOR_HOST is set but TENSORSTORE_GCS_HTTP_URL is not"),
  ]
  for env, want in cases:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _code(_CHECKS), url], cwd=str(tmp_path),
                          env=gcs.environ(**env), capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith(want) for line in lines), \
        (want, proc.stdout, proc.stderr[-2000:])
    assert time.monotonic() - start < 60


def _main(workdir, data, *extra):
  return [sys.executable, "-m", "bltjax.main", f"--config={DEBUG}:tiny", f"--workdir={workdir}",
          "--config.data.source=text", f"--config.data.paths=('{data}',)",
          "--config.train.steps=12", "--config.train.checkpoint_every=3",
          "--config.train.log_every=1", *extra]


def _losses(gcs, prefix):
  records = [json.loads(line) for line in gcs.read(f"{prefix}/metrics.jsonl").splitlines()]
  return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.long
def test_two_stage_run_in_a_bucket_survives_sigkill(gcs, tmp_path):
  """Data and workdir in the bucket: both stages train, a SIGKILL during the BLT stage, the same
  command resumes with the losses of an uninterrupted run; then export and BLT.load from gs://."""
  import sysconfig
  stdlib = sysconfig.get_paths()["stdlib"]
  for i, name in enumerate(sorted(os.listdir(stdlib))):
    if name.endswith(".py") and i % 3 == 0:
      with open(os.path.join(stdlib, name), "rb") as f:
        gcs.upload(f"data/{name[:-3]}.txt", f.read())
  data = gcs.gs("data/*.txt")
  env = gcs.environ()
  cwd = str(tmp_path)  # a gs:// path mistaken for a local one would land here, not in the repo
  subprocess.run(_main(gcs.gs("ref"), data), check=True, env=env, cwd=cwd, timeout=900)
  want = _losses(gcs, "ref")
  assert sorted(want) == list(range(1, 13))

  proc = subprocess.Popen(_main(gcs.gs("killed"), data), env=env, cwd=cwd,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  marker = "killed/checkpoints/6/commit_success.txt"
  while marker not in gcs.list("killed/checkpoints/6/") and proc.poll() is None and \
      time.time() < deadline:
    time.sleep(0.2)
  assert marker in gcs.list("killed/checkpoints/6/"), "the run ended before its step-6 checkpoint"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert "killed/checkpoints/12/commit_success.txt" not in gcs.list("killed/checkpoints/12/")
  subprocess.run(_main(gcs.gs("killed"), data), check=True, env=env, cwd=cwd, timeout=900)
  assert _losses(gcs, "killed") == want
  assert gcs.list("killed/entropy_model/checkpoints/")
  assert [n for n in gcs.list("killed/tensorboard/") if "tfevents" in n]

  subprocess.run([sys.executable, "-m", "bltjax.export", f"--workdir={gcs.gs('killed')}",
                  f"--out={gcs.gs('export')}", "--format=hf"], check=True, env=env, cwd=cwd,
                 timeout=300)
  gcs.python(_code(f"""
    from bltjax import BLT
    for path in ("{gcs.gs('killed')}", "{gcs.gs('export')}"):
      assert len(BLT.load(path).generate(["def "], max_new_bytes=8)[0]) > 0
  """))
  assert not os.path.exists(os.path.join(cwd, "gs:")), "a gs:// path was used as a local path"
