"""Local and `gs://` paths: every user path goes through `etils.epath` (gcsfs for gs://, which
Orbax's tensorstore reads too), and `check_access` turns a missing bucket, missing credentials or
an unreachable endpoint into one clear error before any work starts.

Against an emulator the clients read STORAGE_EMULATOR_HOST (gcsfs, epath and this module) and
TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING (tensorstore, i.e. Orbax).
"""

import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid

if os.environ.get("STORAGE_EMULATOR_HOST"):
  # gcsfs 2026.x otherwise probes the bucket type over gRPC with 60 s timeouts on first access,
  # which an emulator never answers. Read when gcsfs is imported, so set it before that.
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from etils import epath  # noqa: E402

_GLOB = "*?["
_TIMEOUT_S = 30
_checked: set = set()


def is_remote(path) -> bool:
  """True for URLs (gs://, and any other scheme epath serves), False for local paths."""
  return "://" in os.fspath(path)


def abspath(path) -> str:
  """Local paths made absolute; URLs kept intact (os.path.abspath would make gs://b/x a local
  directory "gs:/b/x")."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(base, *parts) -> str:
  """`os.path.join` for local paths and URLs alike (returns a str)."""
  return os.fspath(epath.Path(base).joinpath(*parts))


def _split(url: str) -> tuple[str, str]:
  """gs://bucket/a/b -> ("bucket", "a/b")."""
  parsed = urllib.parse.urlparse(url)
  if not parsed.netloc:
    raise ValueError(f"{url}: no bucket name (expected gs://BUCKET/path)")
  return parsed.netloc, parsed.path.lstrip("/")


def _literal_prefix(key: str) -> tuple[str, bool]:
  """The part of a path before its first glob character, cut back to a directory if it has one;
  and whether it had one."""
  cut = min([key.index(c) for c in _GLOB if c in key], default=None)
  if cut is None:
    return key.rstrip("/"), False
  return os.path.dirname(key[:cut]), True


def check_access(path, *, write: bool = False):
  """Fails early, with one line naming `path`, where it cannot be read (`write=False`) or written.

  Reading: the path (a file, a directory, or the directory part of a glob such as
  gs://b/data/*.txt) must exist. Writing: local directories must be creatable; for gs:// a probe
  object is written and deleted under the path. Raises FileNotFoundError (missing path or bucket)
  or ValueError (no credentials, access denied, endpoint unreachable, not writable). Successful
  checks are remembered for the process.
  """
  path = os.fspath(path)
  key = (abspath(path), write)
  if key in _checked:
    return
  if not is_remote(path):
    _check_local(path, write)
  elif path.startswith("gs://"):
    _check_gcs(path, write)
  # Other schemes epath serves (s3://, ...) are left to their clients.
  _checked.add(key)


def _check_local(path: str, write: bool):
  literal, _ = _literal_prefix(os.path.abspath(path))
  if not write:
    if not os.path.exists(literal):
      raise FileNotFoundError(f"{path}: {literal} does not exist")
    return
  existing = literal
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{path}: cannot create a directory under {existing} (not a directory)")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{path}: {existing} is not writable")


def _endpoint() -> tuple[str, bool]:
  """(JSON API base URL, whether it is an emulator)."""
  host = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if host and host != "default":
    return (host if host.startswith(("http://", "https://")) else "http://" + host), True
  return "https://storage.googleapis.com", False


def _auth_header(path: str) -> dict:
  import google.auth  # noqa: PLC0415 (only needed for real Cloud Storage)
  import google.auth.exceptions  # noqa: PLC0415
  import google.auth.transport.requests  # noqa: PLC0415
  try:
    creds, _ = google.auth.default(
        scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
    creds.refresh(google.auth.transport.requests.Request())
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise ValueError(
        f"{path}: no Google Cloud credentials ({_one_line(e)}); run `gcloud auth "
        "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS (Cloud VMs and TPU "
        "VMs get them from the metadata server)") from None
  except google.auth.exceptions.GoogleAuthError as e:
    raise ValueError(f"{path}: Google Cloud credentials could not be used: {_one_line(e)}") \
        from None
  return {"Authorization": f"Bearer {creds.token}"}


def _check_gcs(path: str, write: bool):
  bucket, key = _split(path)
  prefix, globbed = _literal_prefix(key)
  base, emulated = _endpoint()
  if emulated and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
    raise ValueError(f"{path}: STORAGE_EMULATOR_HOST is set but TENSORSTORE_GCS_HTTP_URL is not, "
                     "so Orbax (tensorstore) would use the real Cloud Storage; set both")
  headers = {} if emulated else _auth_header(path)
  b = urllib.parse.quote(bucket, safe="")

  def call(method, url, data=None, *, missing_ok=False):
    request = urllib.request.Request(url, data=data, method=method, headers=headers | (
        {"Content-Type": "text/plain"} if data is not None else {}))
    try:
      with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        body = response.read()
      return json.loads(body) if body else {}
    except urllib.error.HTTPError as e:
      if e.code == 404 and missing_ok:
        return None
      if e.code == 404:  # the listing and the upload only 404 for a missing bucket
        raise FileNotFoundError(f"{path}: bucket gs://{bucket} does not exist") from None
      what = "write to" if write else "read"
      detail = _http_message(e)
      if e.code in (401, 403):
        raise ValueError(f"{path}: permission denied to {what} gs://{bucket} ({detail})") from None
      raise ValueError(f"{path}: cannot {what} gs://{bucket}: HTTP {e.code} {detail}") from None
    except (urllib.error.URLError, OSError) as e:
      reason = getattr(e, "reason", e)
      raise ValueError(f"{path}: cannot reach Cloud Storage at {base}: {reason}") from None

  def object_url(name):
    return f"{base}/storage/v1/b/{b}/o/{urllib.parse.quote(name, safe='')}"

  directory = prefix + "/" if prefix else ""
  query = urllib.parse.urlencode({"prefix": directory, "maxResults": 1})
  found = call("GET", f"{base}/storage/v1/b/{b}/o?{query}").get("items")
  if not write and prefix and not found and (
      globbed or call("GET", object_url(prefix), missing_ok=True) is None):
    raise FileNotFoundError(f"{path}: nothing at gs://{bucket}/{prefix}")
  if write:  # a probe object: permission to create objects is what a run needs
    name = f"{directory}.bltjax-write-check-{uuid.uuid4().hex}"
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    call("POST", f"{base}/upload/storage/v1/b/{b}/o?{query}", data=b"bltjax")
    call("DELETE", object_url(name), missing_ok=True)


def _http_message(e: urllib.error.HTTPError) -> str:
  try:
    return _one_line(json.loads(e.read())["error"]["message"])
  except Exception:  # noqa: BLE001 (any body: fall back to the status line)
    return _one_line(e.reason)


def _one_line(e) -> str:
  return " ".join(str(e).split())[:300]
