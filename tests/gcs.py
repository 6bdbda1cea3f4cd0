"""A Cloud Storage emulator for tests: `gcp-storage-emulator` on a free localhost port.

The clients read their endpoints when imported (gcsfs, tensorstore), so code under test runs in
subprocesses with `emulator.env`; this module only talks to the emulator's JSON API over HTTP.

    from tests.gcs import gcs  # noqa: F401  (the fixture)
    def test_x(gcs):
      gcs.upload("data/a.txt", b"hello")
      gcs.python("from bltjax.train import metrics; ...")   # runs with the emulator's environment
      assert gcs.list("data/") == ["data/a.txt"]
"""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import portpicker
import pytest

BUCKET = "bltjax-test"  # tensorstore rejects bucket names under 3 characters
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# gcp-storage-emulator (2026.7.19) sends no x-goog-generation header with object contents.
# tensorstore then stamps every read with a generation that is not a number, and the conditional
# write that follows (OCDBT re-reading and updating its manifest, which Orbax does now and then)
# fails with "Malformed StorageGeneration". Real Cloud Storage sends the header; so does this shim.
_EMULATOR = """
import sys
from http import HTTPStatus
from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

original = objects.download

def download(request, response, storage, *args, **kwargs):
  original(request, response, storage, *args, **kwargs)
  if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

objects.download = download  # (objects.get calls it for ?alt=media)
server.HANDLERS = tuple((regex, {m: download if h is original else h for m, h in handlers.items()})
                        for regex, handlers in server.HANDLERS)
main(sys.argv[1:])
"""


class Emulator:
  """A running emulator: its URL, the client environment and helpers over its JSON API."""

  def __init__(self, port: int, bucket: str = BUCKET):
    self.url, self.bucket = f"http://127.0.0.1:{port}", bucket
    self.env = {
        "STORAGE_EMULATOR_HOST": self.url,           # gcsfs, hence etils.epath
        "TENSORSTORE_GCS_HTTP_URL": self.url,        # tensorstore, hence Orbax
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore skips its credential search
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # no gRPC bucket-type probe (60 s timeouts)
        "JAX_PLATFORMS": "cpu",
    }

  def gs(self, *parts: str) -> str:
    """gs://BUCKET/part/part..."""
    return "/".join([f"gs://{self.bucket}", *[p.strip("/") for p in parts]])

  def environ(self, **overrides) -> dict:
    """os.environ with the emulator's variables (an override of None removes a variable)."""
    env = dict(os.environ, **self.env)
    env.pop("XLA_FLAGS", None)  # the subprocess sets up its own devices
    for k, v in overrides.items():
      if v is None:
        env.pop(k, None)
      else:
        env[k] = v
    return env

  def python(self, code: str, *, check: bool = True, timeout: float = 300,
             **env_overrides) -> subprocess.CompletedProcess:
    """Runs `python -c code` in the repo root with the emulator's environment; text output."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=self.environ(**env_overrides),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
      raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc

  def _request(self, method: str, path: str, data: bytes | None = None, **query):
    url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    headers = {"Content-Type": "application/octet-stream"} if data is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method,
                                                       headers=headers), timeout=30) as r:
      return r.read()

  def _object(self, name: str) -> str:
    return f"/storage/v1/b/{self.bucket}/o/{urllib.parse.quote(name, safe='')}"

  def upload(self, name: str, data: bytes):
    self._request("POST", f"/upload/storage/v1/b/{self.bucket}/o", data=data,
                  uploadType="media", name=name)

  def upload_tree(self, local_dir: str, prefix: str):
    """Every file under `local_dir` to PREFIX/<relative path>."""
    for root, _, files in os.walk(local_dir):
      for f in files:
        rel = os.path.relpath(os.path.join(root, f), local_dir)
        with open(os.path.join(root, f), "rb") as fh:
          self.upload(f"{prefix.strip('/')}/{rel}", fh.read())

  def list(self, prefix: str = "") -> list[str]:
    """Object names under `prefix`, sorted."""
    names, token = [], None
    while True:
      query = {"prefix": prefix} | ({"pageToken": token} if token else {})
      page = json.loads(self._request("GET", f"/storage/v1/b/{self.bucket}/o", **query))
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    return self._request("GET", self._object(name), alt="media")


def _wait_until_up(proc: subprocess.Popen, emulator: Emulator, log_path: str, timeout=60.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      with open(log_path) as f:
        raise RuntimeError(f"gcp-storage-emulator exited ({proc.returncode}):\n{f.read()[-2000:]}")
    try:
      emulator._request("GET", f"/storage/v1/b/{emulator.bucket}")
      return
    except (urllib.error.URLError, ConnectionError):
      time.sleep(0.1)
  raise RuntimeError(f"gcp-storage-emulator did not answer on {emulator.url} in {timeout:.0f} s")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """An emulator with an empty bucket BUCKET for the test module; stopped (and its files
  removed with pytest's temporary directory) afterwards."""
  root = tmp_path_factory.mktemp("gcs")
  port = portpicker.pick_unused_port()
  emulator = Emulator(port)
  log_path = str(root / "emulator.log")
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-c", _EMULATOR, f"--data-dir={root / 'data'}",
                             "start", "--host=127.0.0.1", f"--port={port}",
                             f"--default-bucket={emulator.bucket}", "--quiet"],
                            cwd=str(root), stdout=log, stderr=subprocess.STDOUT)
  try:
    _wait_until_up(proc, emulator, log_path)
    yield emulator
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
