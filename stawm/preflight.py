"""Checks a study makes before Ray starts: can it write its results, can it reach its MLflow store.

A study that fails one of these would otherwise fail minutes later, inside a trial on another
node, with a stack trace. Each check raises `PreflightError` with a one-line message that names
the path or URI, the cause, and what to do.

    storage = check_storage(args.storage)                    # for tune.RunConfig(storage_path=...)
    check_storage_for_cluster(storage, nodes=...)            # multi-node needs shared storage
    tracking_uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())

Environment:
    STAWM_SHARED_STORAGE=1  a local storage path is a mount every node shares (NFS, EFS, Lustre),
                            so `check_storage_for_cluster` accepts it on a multi-node cluster.

This module imports neither torch nor mlflow (urllib is enough to ask a tracking server), and
runs pyarrow only in a child process (see `_probe_remote_storage`).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

SHARED_STORAGE_ENV = "STAWM_SHARED_STORAGE"
# Schemes pyarrow opens that are not shared between nodes: "mock" is its in-memory test filesystem.
_LOCAL_SCHEMES = ("", "file", "mock")
# Tracking URIs MLflow accepts that these checks pass on unchecked (they need drivers or tokens).
_UNCHECKED_TRACKING_SCHEMES = ("postgresql", "mysql", "mssql", "databricks")


class PreflightError(ValueError):
    """A study cannot run as configured; the one-line message says what to change."""


# --- storage (Ray Tune's storage_path) ------------------------------------------------------------


def storage_is_shared(uri: str) -> bool:
    """True for URIs every node can reach (s3://, gs://, abfs://, hdfs://, ...), False for local paths."""
    return _scheme(uri) not in _LOCAL_SCHEMES


def check_storage(uri: str, *, timeout_s: float = 30.0) -> str:
    """Check that a study can write to `uri` and return it normalised for `RunConfig(storage_path=)`.

    A local path or file:// URI becomes an absolute path; the folder is created if needed and a
    probe file is written and removed. Any other URI is opened with pyarrow, as Ray Tune opens
    it, and a probe object is written and deleted; it is returned unchanged.
    """
    if not uri or not uri.strip():
        raise PreflightError("storage is empty: give a folder or a URI such as s3://BUCKET/ray")
    scheme = _scheme(uri)
    if scheme in ("", "file"):
        return _check_local_storage(_local_path(uri))
    _probe_remote_storage(uri, timeout_s)
    return uri


def check_storage_for_cluster(uri: str, nodes: int) -> None:
    """Reject storage on one machine when the Ray cluster has (or may grow to) several nodes.

    Ray no longer syncs results to the head: every trial writes its checkpoints to
    `storage_path` itself, from whichever node it runs on. Count the nodes the cluster can
    have, not only those alive now: an autoscaling cluster starts with the head alone.
    """
    if nodes <= 1 or storage_is_shared(uri) or _env_flag(SHARED_STORAGE_ENV):
        return
    raise PreflightError(
        f"storage {uri} is on this machine only, but the Ray cluster has {nodes} nodes and trials on"
        f" other nodes write their checkpoints there: use s3://BUCKET/PATH or gs://BUCKET/PATH, or"
        f" set {SHARED_STORAGE_ENV}=1 if it is a mount (NFS) shared by every node"
    )


def _check_local_storage(path: str) -> str:
    reason = _unwritable_folder(path)
    if reason:
        raise PreflightError(
            f"storage path {path} is not writable ({reason}): choose a folder you can write, or a"
            f" URI such as s3://BUCKET/ray"
        )
    return path


# The probe runs in a child process because pyarrow cannot be told, through a URI, to give up:
# against an unreachable endpoint its S3 client retries for about 12 s and its GCS client for up
# to 15 minutes, and even opening s3://BUCKET without ?region= makes a network call. A child can
# be killed at the deadline; a thread cannot. Ray Tune also creates the folder, so the probe does.
_PROBE_SCRIPT = """
import sys, uuid
from pyarrow import fs
try:
    filesystem, path = fs.FileSystem.from_uri(sys.argv[1])
    filesystem.create_dir(path, recursive=True)
    probe = path.rstrip("/") + "/.stawm-preflight-" + uuid.uuid4().hex
    with filesystem.open_output_stream(probe) as out:
        out.write(b"ok")
    filesystem.delete_file(probe)
except Exception as e:
    print(type(e).__name__ + ": " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(1)
"""


def _probe_remote_storage(uri: str, timeout_s: float) -> None:
    shown = _redact(uri)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT, uri],
            capture_output=True, text=True, timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise PreflightError(
            f"cannot write to storage {shown}: no answer within {timeout_s:g} s (check the"
            f" endpoint, the network and the credentials)"
        ) from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        cause = lines[-1] if lines else f"probe exited with status {done.returncode}"
        raise PreflightError(f"cannot write to storage {shown}: {cause}")


# --- MLflow tracking URI --------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI if set, else an SQLite file in the current folder.

    The path is absolute so Ray workers, which start in other folders, open the same file.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.join(os.getcwd(), "mlflow.db")


def check_tracking_uri(uri: str, *, timeout_s: float = 5.0) -> str:
    """Check that MLflow can use `uri` and return it normalised.

    sqlite:///PATH: the folder is created if needed and must be writable; returned with an
    absolute path. http(s)://: the server must answer /health within `timeout_s` and accept an
    API request. A plain path or file: URI (MLflow's deprecated file store) is rejected.
    postgresql://, mysql://, mssql:// and databricks URIs are returned unchecked.
    """
    scheme = _scheme(uri)
    if scheme == "sqlite":
        return _check_sqlite(uri)
    if scheme in ("http", "https"):
        return _check_tracking_server(uri.rstrip("/"), timeout_s)
    if scheme in ("", "file"):
        raise PreflightError(
            f"tracking URI {uri} is MLflow's file store, which is deprecated and refused unless"
            f" MLFLOW_ALLOW_FILE_STORE=true: use sqlite:///ABSOLUTE/PATH/mlflow.db or a tracking"
            f" server, http://HOST:5000"
        )
    if scheme.split("+")[0] in _UNCHECKED_TRACKING_SCHEMES:
        return uri
    raise PreflightError(
        f"tracking URI {uri} has an unknown scheme {scheme!r}: use sqlite:///PATH, http://HOST:PORT"
        f" or a database URI such as postgresql://USER@HOST/DB"
    )


def _check_sqlite(uri: str) -> str:
    # SQLAlchemy's form: sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite:// = memory.
    rest, _, query = uri[len("sqlite://"):].partition("?")
    if rest in ("", "/", "/:memory:"):
        raise PreflightError(
            f"tracking URI {uri} is an in-memory SQLite database, lost when the process exits:"
            f" give a file, sqlite:///ABSOLUTE/PATH/mlflow.db"
        )
    path = os.path.abspath(rest[1:])
    folder = os.path.dirname(path)
    reason = _unwritable_folder(folder)
    if reason:
        raise PreflightError(
            f"tracking database folder {folder} is not writable ({reason}): choose another"
            f" sqlite:///PATH or a tracking server"
        )
    if os.path.isdir(path):
        raise PreflightError(f"tracking database {path} is a folder: name a file, e.g. {path}/mlflow.db")
    return "sqlite:///" + path + (f"?{query}" if query else "")


def _check_tracking_server(uri: str, timeout_s: float) -> str:
    try:
        _get(f"{uri}/health", timeout_s)
    except OSError as e:  # URLError and HTTPError are OSErrors; a timeout is a TimeoutError
        cause = f"/health answered HTTP {e.code}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise PreflightError(
            f"cannot reach MLflow tracking server at {uri}: {cause} (is `mlflow server` running"
            f" there, and the port open?)"
        ) from None
    # MLflow 3 exempts /health from its Host-header check, so a server that answers /health
    # may still refuse every API call, e.g. when addressed by a public IP or a DNS name.
    try:
        _get(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout_s)
    except urllib.error.HTTPError as e:
        raise PreflightError(_refusal_message(uri, e)) from None
    except OSError as e:
        raise PreflightError(f"MLflow tracking server at {uri} stopped answering: {getattr(e, 'reason', e)}") from None
    return uri


def _refusal_message(uri: str, e: urllib.error.HTTPError) -> str:
    host = urllib.parse.urlsplit(uri).netloc
    if e.code == 403:
        return (
            f"MLflow tracking server at {uri} refuses requests addressed to {host} (HTTP 403): start"
            f" it with --allowed-hosts {host}, or address it by localhost or a private IP"
        )
    if e.code == 401:
        return (
            f"MLflow tracking server at {uri} wants credentials (HTTP 401): set"
            f" MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    return f"MLflow tracking server at {uri} answered HTTP {e.code} to an API request: is it an MLflow server?"


def _get(url: str, timeout_s: float) -> None:
    request = urllib.request.Request(url, headers=_auth_headers())
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


def _auth_headers() -> dict[str, str]:
    """The credentials the MLflow client itself would send, from the same variables."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


# --- small helpers ------------------------------------------------------------------------------


def _unwritable_folder(path: str) -> str | None:
    """Why `path` cannot hold files, or None once it exists and a probe file went in and out."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "it is a file"
    probe = os.path.join(path, f".stawm-preflight-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def _scheme(uri: str) -> str:
    """The URI scheme, lower case; "" for a plain path (also one with a colon, or C:\\...)."""
    if "://" not in uri and not uri.startswith("file:"):
        return ""
    return urllib.parse.urlsplit(uri).scheme.lower()


def _local_path(uri: str) -> str:
    if uri.startswith("file:"):
        parts = urllib.parse.urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise PreflightError(f"storage {uri} names another host: file:// URIs must be file:///PATH")
        return os.path.abspath(urllib.request.url2pathname(parts.path))
    return os.path.abspath(os.path.expanduser(uri))


def _redact(uri: str) -> str:
    """The URI with the secret of s3://KEY:SECRET@bucket/... replaced, fit for a message."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@" + parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
