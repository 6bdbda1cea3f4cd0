"""bltjax.checkpoint.workdir_lock: one run per workdir. Holders other than this process are simulated with
lock files naming a live `sleep` subprocess, a killed one, another host or another machine, and with
real subprocesses for the SIGKILL and race cases; gs:// against the emulator of tests/gcs.py."""

import datetime
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from bltjax.checkpoint import workdir_lock
from bltjax.runtime import errors
from tests.gcs import REPO, gcs  # noqa: F401 (the fixture)

LOCK = workdir_lock.LOCK_NAME


def _ago(seconds: float) -> str:
  t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)
  return t.isoformat(timespec="seconds")


def _holder(**overrides) -> dict:
  """A lock record as this process would write it, with `overrides`."""
  return workdir_lock._record("training run") | overrides


def _write(directory, record) -> str:
  path = os.path.join(directory, LOCK)
  with open(path, "w") as f:
    f.write(record if isinstance(record, str) else json.dumps(record))
  return path


def _read(directory) -> dict:
  with open(os.path.join(directory, LOCK)) as f:
    return json.load(f)


@pytest.fixture
def sleeper():
  """A live process that is not this one: (pid, its /proc start time)."""
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    yield proc.pid, workdir_lock._proc_stat(proc.pid)[1]
  finally:
    proc.kill()
    proc.wait()


def _warnings(caplog) -> str:
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_acquire_writes_the_holder_and_release_removes_it(tmp_path):
  workdir = str(tmp_path / "run")  # created by hold
  with workdir_lock.hold(workdir, enabled=True, what="preprocessing run") as lock:
    h = _read(workdir)
    assert h["pid"] == os.getpid() and h["host"] == workdir_lock._HOST
    assert h["process_start"] == workdir_lock._proc_stat(os.getpid())[1]
    assert h["argv"] == sys.argv and h["what"] == "preprocessing run" and len(h["token"]) == 32
    started = datetime.datetime.fromisoformat(h["started"])
    assert abs(started.timestamp() - time.time()) < 5 and h["heartbeat"] == h["started"]
    assert not lock.lost
  assert os.listdir(workdir) == []  # no lock, no temporary files


def test_default_enabled_is_jax_process_0(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    assert os.path.exists(tmp_path / LOCK)
  with workdir_lock.hold(str(tmp_path), enabled=False):
    assert not os.path.exists(tmp_path / LOCK)


def test_live_holder_is_refused_with_one_line_naming_it(tmp_path, sleeper):
  pid, start = sleeper
  record = _holder(pid=pid, process_start=start, started=_ago(3600), heartbeat=_ago(5))
  _write(tmp_path, record)
  with pytest.raises(errors.WorkdirLocked) as e:
    with workdir_lock.hold(str(tmp_path), enabled=True):
      pytest.fail("entered a held workdir")
  message = str(e.value)
  assert "\n" not in message and str(tmp_path) in message
  for part in (f"host {workdir_lock._HOST}", f"PID {pid}", record["started"], record["heartbeat"],
               "--force_unlock"):
    assert part in message, (part, message)
  assert _read(tmp_path) == record  # untouched


def test_lock_of_a_sigkilled_run_is_taken_over(tmp_path, caplog):
  """A real holder killed with SIGKILL leaves its lock; the next run sees the dead PID."""
  code = textwrap.dedent(f"""
      import os, signal
      from bltjax.checkpoint import workdir_lock
      with workdir_lock.hold({str(tmp_path)!r}, enabled=True):
        os.kill(os.getpid(), signal.SIGKILL)
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  dead = _read(tmp_path)["pid"]
  assert dead == proc.pid
  with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path), enabled=True):
    assert _read(tmp_path)["pid"] == os.getpid()
  assert f"PID {dead}" in _warnings(caplog) and f"process {dead} has exited" in _warnings(caplog)


@pytest.mark.parametrize("shift,taken", [(0, False), (1, True)])
def test_reused_pid_is_told_apart_by_its_start_time(tmp_path, sleeper, shift, taken, caplog):
  pid, start = sleeper
  _write(tmp_path, _holder(pid=pid, process_start=start + shift))
  lock = workdir_lock.hold(str(tmp_path), enabled=True)
  if not taken:
    with pytest.raises(errors.WorkdirLocked):
      lock.__enter__()
    return
  with caplog.at_level(logging.WARNING), lock:
    assert _read(tmp_path)["pid"] == os.getpid()
  assert f"PID {pid} now belongs to another process" in _warnings(caplog)


@pytest.mark.parametrize("age,stale_after,taken", [(60, 600, False), (1200, 600, True),
                                                   (60, 30, True)])
def test_other_host_is_judged_by_its_heartbeat(tmp_path, age, stale_after, taken, caplog):
  _write(tmp_path, _holder(host="elsewhere", pid=1, heartbeat=_ago(age)))
  lock = workdir_lock.hold(str(tmp_path), enabled=True, stale_after=stale_after,
                           heartbeat_every=10)
  if not taken:
    with pytest.raises(errors.WorkdirLocked, match="on host elsewhere, PID 1,"):
      lock.__enter__()
    return
  with caplog.at_level(logging.WARNING), lock:
    assert _read(tmp_path)["host"] == workdir_lock._HOST
  assert "host elsewhere" in _warnings(caplog) and "no heartbeat for" in _warnings(caplog)


def test_pid_is_not_trusted_in_another_pid_namespace(tmp_path):
  """Same host name, other machine/container: a PID that does not exist here proves nothing."""
  dead = subprocess.Popen([sys.executable, "-c", ""])
  dead.wait()
  _write(tmp_path, _holder(pid=dead.pid, machine="other-boot/pid:[1]", heartbeat=_ago(5)))
  with pytest.raises(errors.WorkdirLocked, match=f"PID {dead.pid}"):
    workdir_lock.hold(str(tmp_path), enabled=True).__enter__()


def test_force_takes_a_live_lock(tmp_path, sleeper, caplog):
  pid, start = sleeper
  _write(tmp_path, _holder(pid=pid, process_start=start))
  with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path), enabled=True, force=True):
    assert _read(tmp_path)["pid"] == os.getpid()
  assert f"PID {pid}" in _warnings(caplog) and "(forced)" in _warnings(caplog)
  assert not os.path.exists(tmp_path / LOCK)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_released_on_exception(tmp_path, exc):
  with pytest.raises(exc):
    with workdir_lock.hold(str(tmp_path), enabled=True):
      assert os.path.exists(tmp_path / LOCK)
      raise exc("boom")
  assert not os.path.exists(tmp_path / LOCK)


def test_nested_hold_in_one_process_is_a_no_op(tmp_path):
  with workdir_lock.hold(str(tmp_path), enabled=True):
    token = _read(tmp_path)["token"]
    with workdir_lock.hold(str(tmp_path) + "/", enabled=True):
      assert _read(tmp_path)["token"] == token
    assert _read(tmp_path)["token"] == token  # the inner exit released nothing
  assert not os.path.exists(tmp_path / LOCK)


def test_heartbeat_refreshes_and_stops_at_release(tmp_path):
  with workdir_lock.hold(str(tmp_path), enabled=True, heartbeat_every=0.2, stale_after=10) as lk:
    time.sleep(1.5)
    h = _read(tmp_path)
    assert h["heartbeat"] > h["started"]
    thread = lk._thread
    assert thread.is_alive()
  assert not thread.is_alive()
  time.sleep(0.5)
  assert not os.path.exists(tmp_path / LOCK)  # no heartbeat wrote it back


def test_heartbeat_failures_are_logged_not_raised(tmp_path, caplog):
  with caplog.at_level(logging.WARNING), \
      workdir_lock.hold(str(tmp_path), enabled=True, heartbeat_every=0.1, stale_after=10) as lk:
    def fail(data):
      raise OSError("disk on fire")
    lk._store.write = fail
    time.sleep(0.5)
    assert lk._thread.is_alive()
  assert "lock heartbeat failed (disk on fire)" in _warnings(caplog)
  assert not os.path.exists(tmp_path / LOCK)


def test_a_lock_taken_by_another_run_is_reported_lost_and_left_alone(tmp_path, caplog):
  with workdir_lock.hold(str(tmp_path), enabled=True, heartbeat_every=0.1, stale_after=10) as lk:
    other = _holder(host="elsewhere")
    _write(tmp_path, other)  # as a --force_unlock run would
    deadline = time.monotonic() + 5
    while not lk.lost and time.monotonic() < deadline:
      time.sleep(0.05)
    assert lk.lost
  assert _read(tmp_path) == other
  assert any("lost the lock" in r.getMessage() and "host elsewhere" in r.getMessage()
             for r in caplog.records if r.levelno == logging.ERROR)


def test_old_corrupt_lock_is_taken_over_at_once(tmp_path, caplog):
  path = _write(tmp_path, "")  # a writer killed between creating and writing it
  os.utime(path, (time.time() - 3600,) * 2)
  t = time.monotonic()
  with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path), enabled=True):
    assert time.monotonic() - t < 1
    assert _read(tmp_path)["pid"] == os.getpid()
  assert "unreadable lock file" in _warnings(caplog)


def test_young_corrupt_lock_is_waited_for(tmp_path, sleeper, monkeypatch):
  monkeypatch.setattr(workdir_lock, "CORRUPT_GRACE_S", 1.5)
  _write(tmp_path, "{")
  t = time.monotonic()
  with workdir_lock.hold(str(tmp_path), enabled=True):
    assert time.monotonic() - t > 1.0
  # A young one that becomes a live holder's lock (it was mid-write) is refused.
  pid, start = sleeper
  _write(tmp_path, "")
  writer = threading.Timer(0.3, _write, (tmp_path, _holder(pid=pid, process_start=start)))
  writer.start()
  with pytest.raises(errors.WorkdirLocked, match=f"PID {pid}"):
    workdir_lock.hold(str(tmp_path), enabled=True).__enter__()
  writer.join()


_RACER = """
import sys, time
from bltjax.checkpoint import workdir_lock
from bltjax.runtime import errors
path, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
try:
  with workdir_lock.hold(path, enabled=True):
    print("won", flush=True)
    time.sleep(float(sys.argv[3]))
except errors.WorkdirLocked as e:
  print("locked:", e, flush=True)
"""


def _race(path: str, n: int, env=None, hold_s: float = 3.0) -> list[str]:
  start_at = time.time() + 2.0  # after every racer has imported the module
  procs = [subprocess.Popen([sys.executable, "-c", _RACER, path, str(start_at), str(hold_s)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(n)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err
  return sorted(out.split()[0] for out, _ in outs)


@pytest.mark.long
@pytest.mark.parametrize("stale", [False, True])
def test_racing_runs_exactly_one_wins(tmp_path, stale):
  """Simultaneous starts on a free workdir, or on one whose holder is dead (all take over)."""
  if stale:
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    _write(tmp_path, _holder(pid=dead.pid))
  assert _race(str(tmp_path), 4) == ["locked:"] * 3 + ["won"]
  assert not os.path.exists(tmp_path / LOCK)


def test_bad_intervals_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="heartbeat_every"):
    workdir_lock.hold(str(tmp_path), enabled=True, heartbeat_every=60, stale_after=60)


_GCS_HOLDER = """
import sys
from bltjax.checkpoint import workdir_lock
with workdir_lock.hold(sys.argv[1], enabled=True):
  print("held", flush=True)
  sys.stdin.readline()
"""


def test_gcs_acquire_refuse_release(gcs):
  url = gcs.gs("locked/run")
  holder = subprocess.Popen([sys.executable, "-c", _GCS_HOLDER, url], cwd=REPO,
                            env=gcs.environ(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    h = json.loads(gcs.read("locked/run/.lock"))
    assert h["pid"] == holder.pid and h["host"] == workdir_lock._HOST
    second = gcs.python(f"""
from bltjax.checkpoint import workdir_lock
from bltjax.runtime import errors
try:
  workdir_lock.hold({url!r}, enabled=True).__enter__()
  print("entered")
except errors.WorkdirLocked as e:
  print(e)
""")
    assert f"{url} is in use by a training run on host {workdir_lock._HOST}, PID {holder.pid}" \
        in second.stdout, second.stdout
    assert json.loads(gcs.read("locked/run/.lock"))["token"] == h["token"]
  finally:
    holder.communicate("\n", timeout=60)
  assert holder.returncode == 0
  assert gcs.list("locked/") == []


@pytest.mark.long
def test_gcs_stale_lock_is_taken_over_and_races_have_one_winner(gcs):
  gcs.upload("stale/run/.lock", json.dumps(_holder(host="elsewhere", heartbeat=_ago(3600))).encode())
  out = gcs.python(f"""
from bltjax.checkpoint import workdir_lock
with workdir_lock.hold({gcs.gs("stale/run")!r}, enabled=True):
  print("won")
""")
  assert out.stdout == "won\n" and "taking over the lock of a training run on host elsewhere" \
      in out.stderr, out.stderr
  assert gcs.list("stale/") == []
  # The emulator ignores ifGenerationMatch: the re-read after writing decides the race.
  assert _race(gcs.gs("race/run"), 3, env=gcs.environ(), hold_s=6.0) == ["locked:"] * 2 + ["won"]
  assert gcs.list("race/") == []


def test_local_store_creates_once_and_removes_only_what_it_judged(tmp_path):
  """The two primitives the races rely on, deterministically: O_EXCL creation, and removal of a
  stale lock that leaves alone a new lock another run wrote since it was read."""
  store = workdir_lock._Local(str(tmp_path))
  assert store.create(b"first") and not store.create(b"second")
  assert store.read()[0] == b"first"
  store.remove(b"stale lock read earlier")
  assert store.read()[0] == b"first"
  store.remove(b"first")
  assert store.read() == (None, None) and os.listdir(tmp_path) == []


def test_gcs_create_sends_the_create_only_precondition(gcs):
  """Real Cloud Storage answers a second create with HTTP 412 (the emulator ignores the
  precondition): check that the request carries it and that the refusal reads as "exists"."""
  out = gcs.python(f"""
from bltjax.checkpoint import workdir_lock
store = workdir_lock._Gcs({gcs.gs("precondition/run")!r})
calls, original = [], store.fs._call
async def spy(method, path, *args, **kwargs):
  calls.append((method, kwargs.get("ifGenerationMatch")))
  return await original(method, path, *args, **kwargs)
store.fs._call = spy
assert store.create(b"a")
print([c for c in calls if c[0] == "POST"])
async def precondition_failed(*args, **kwargs):
  raise FileExistsError("HTTP 412")  # what gcsfs raises for a 412
store.fs._call = precondition_failed
print(store.create(b"b"))
""")
  assert out.stdout.splitlines() == ["[('POST', '0')]", "False"], out.stdout
  assert gcs.read("precondition/run/.lock") == b"a"


def test_gcs_a_racer_writing_after_us_wins(gcs):
  """Where the precondition is ignored (the emulator), a racer that saw no lock either may write
  after us: the re-read after GCS_SETTLE_S sees its lock, and we stand down."""
  out = gcs.python(f"""
import json
from bltjax.checkpoint import workdir_lock
from bltjax.runtime import errors
create = workdir_lock._Gcs.create
def create_then_overwritten(self, data):
  created = create(self, data)
  other = workdir_lock._record("training run") | {{"host": "racer"}}
  self.fs.pipe_file(self.path, json.dumps(other).encode())
  return created
workdir_lock._Gcs.create = create_then_overwritten
try:
  workdir_lock.hold({gcs.gs("overwritten/run")!r}, enabled=True).__enter__()
  print("entered")
except errors.WorkdirLocked as e:
  print(e)
""")
  assert "is in use by a training run on host racer" in out.stdout, out.stdout
  assert json.loads(gcs.read("overwritten/run/.lock"))["host"] == "racer"
