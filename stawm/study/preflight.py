"""Checks a study makes before Ray starts: can it write its results, can it reach its MLflow store.

A study that fails one of these would otherwise fail minutes later, inside a trial on another
node, with a stack trace. Each check raises `PreflightError` with a one-line message that names
the path or URI, the cause, and what to do.

    check_outside_job_folder({"--storage": ..., ...})         # not in `ray job submit`'s temporary copy
    storage = check_storage(args.storage)                    # for tune.RunConfig(storage_path=...)
    tracking_uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
    check_for_cluster(storage, tracking_uri, cluster="...")  # once Ray is up: several nodes need shared ones

Environment:
    STAWM_SHARED_STORAGE=1  a local storage path is a mount every node shares (NFS, EFS, Lustre),
                            so `check_storage_for_cluster` accepts it on a multi-node cluster.

This module imports neither torch nor mlflow (urllib is enough to ask a tracking server), and
runs pyarrow only in a child process (see `_probe_remote_storage`). Messages never show a password
(`provenance.redact`).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..provenance import redact

SHARED_STORAGE_ENV = "STAWM_SHARED_STORAGE"
# Schemes pyarrow opens that are not shared between nodes: "mock" is its in-memory test filesystem.
_LOCAL_SCHEMES = ("", "file", "mock")
# Tracking URIs MLflow accepts that these checks pass on unchecked (they need drivers or tokens).
_UNCHECKED_TRACKING_SCHEMES = ("postgresql", "mysql", "mssql", "databricks")


class PreflightError(ValueError):
    """A study cannot run as configured; the one-line message says what to change (and shows no password)."""

    def __init__(self, message: str):
        super().__init__(redact(message))


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


def check_for_cluster(storage: str, tracking_uri: str, cluster: str) -> None:
    """Refuse storage and a tracking store that live on this machine only, for a cluster whose trials may run
    on other machines (`cluster`: which cluster, for the message; `stawm.cluster.ClusterShape.describe`).

    Ray no longer syncs results to the head: every trial writes its checkpoints to `storage_path` itself,
    from whichever node it runs on. A trial on another node cannot open the driver's SQLite file either.
    The caller decides from what the cluster can grow to, not from the nodes alive now: an autoscaling
    cluster starts with the head alone.
    """
    if not (storage_is_shared(storage) or _env_flag(SHARED_STORAGE_ENV)):
        raise PreflightError(
            f"storage {redact(storage)} is on this machine only, but {cluster} runs trials on other nodes, which"
            f" write their checkpoints there: use s3://BUCKET/PATH or gs://BUCKET/PATH, or set"
            f" {SHARED_STORAGE_ENV}=1 if it is a mount (NFS) shared by every node"
        )
    if _scheme(tracking_uri) in ("sqlite", "", "file"):
        raise PreflightError(
            f"tracking URI {redact(tracking_uri)} is a file on this machine, but {cluster} runs trials on other"
            f" nodes, which cannot open it: start `mlflow server` on the head (cluster.yaml does) and pass"
            f" --tracking-uri http://HEAD_PRIVATE_IP:5000"
        )


# --- the temporary folder of a Ray job ------------------------------------------------------------

# `ray job submit --working-dir .` runs the driver in Ray's temporary copy of the checkout
# (.../runtime_resources/working_dir_files/_ray_pkg_...): a relative or default path lands there, is lost
# when Ray restarts, and is found again by the next job with the same files. Ray passes the job's
# runtime environment to its driver in this variable.
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_JOB_FOLDER_FIX = {
    "--storage": "s3://BUCKET/PATH, or an absolute folder outside it that every node shares",
    "--tracking-uri": "the head's tracking server, http://HEAD_PRIVATE_IP:5000",
    "--data-root": "an absolute folder, e.g. ~/data (or leave it: $STAWM_DATA or ~/.cache/stawm)",
    "--optuna-storage": "a database outside it, e.g. sqlite:////home/ubuntu/mlflow/optuna.db on the head",
}


def job_working_dir() -> Path | None:
    """The folder a `ray job submit --working-dir` job's driver runs in (Ray's temporary copy), else None."""
    raw = os.environ.get(_RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def check_outside_job_folder(paths: dict[str, str]) -> None:
    """Refuse any of `paths` ({flag: local path, sqlite:/// URI or remote URI}) that lies in a Ray job's
    temporary working folder, naming the flag and what to pass instead. Nothing to check outside a job."""
    folder = job_working_dir()
    if folder is None:
        return
    for flag, value in paths.items():
        local = _local_file(value)
        if local is not None and local.is_relative_to(folder):
            raise PreflightError(
                f"{flag} {redact(value)} lies in this job's temporary copy of your checkout ({folder}, made by"
                f" `ray job submit --working-dir`), which Ray deletes when it restarts and a later job finds"
                f" again: pass {flag} {_JOB_FOLDER_FIX.get(flag, 'a path outside it')}"
            )


def _local_file(value: str) -> Path | None:
    """The absolute path a flag's value names on this machine, None for a remote URI or a server."""
    scheme = _scheme(value)
    if scheme == "sqlite":
        return Path(os.path.abspath(value[len("sqlite:///"):].partition("?")[0] or "."))
    if scheme in ("", "file"):
        return Path(_local_path(value))
    return None


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
    shown = redact(uri)
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


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
