"""Checks a study makes before Ray starts: can it write its results, can it reach its MLflow store.

A study that fails one of these would otherwise fail minutes later, inside a trial on another
node, with a stack trace. Each check raises `PreflightError` with a one-line message that names
the path or URI, the cause, and what to do.

    check_outside_job_folder({"--storage": ..., ...})         # not in `ray job submit`'s temporary copy
    storage = check_storage(args.storage)                    # for tune.RunConfig(storage_path=...)
    tracking_uri = check_tracking_uri(args.tracking_uri or stawm.flags.default_tracking_uri())
    check_for_cluster(storage, tracking_uri, cluster="...")  # once Ray is up: several nodes need shared ones

Environment:
    STAWM_SHARED_STORAGE=1  a local storage path is a mount every node shares (NFS, EFS, Lustre),
                            so `check_storage_for_cluster` accepts it on a multi-node cluster.

This module imports neither torch nor mlflow at import time: MLflow's REST client is loaded only to ask a
tracking server (so it sends the credentials the client would), and pyarrow runs only in a child process
(see `_probe_remote_storage`). Messages never show a password (`provenance.redact`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

from .. import store_uri
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
    return store_uri.scheme(uri) not in _LOCAL_SCHEMES


def check_storage(uri: str, *, timeout_s: float = 30.0) -> str:
    """Check that a study can write to `uri` and return it normalised for `RunConfig(storage_path=)`.

    A local path or file:// URI becomes an absolute path; the folder is created if needed and a
    probe file is written and removed. Any other URI is opened with pyarrow, as Ray Tune opens
    it, and a probe object is written and deleted; it is returned unchanged.
    """
    if not uri or not uri.strip():
        raise PreflightError("storage is empty: give a folder or a URI such as s3://BUCKET/ray")
    if store_uri.scheme(uri) in ("", "file"):
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
    if store_uri.scheme(tracking_uri) in ("sqlite", "", "file"):
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
    """The absolute path a flag's value names on this machine, None for a remote URI, a server or an
    in-memory database."""
    database = store_uri.sqlite_path(value)
    if database is not None:
        return Path(os.path.abspath(database))
    return Path(_local_path(value)) if store_uri.scheme(value) in ("", "file") else None


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


def check_tracking_uri(uri: str, *, timeout_s: float = 5.0) -> str:
    """Check that MLflow can use `uri` and return it normalised.

    sqlite:///PATH: the folder is created if needed and must be writable; returned with an
    absolute path. http(s)://: the server must answer /health within `timeout_s` and accept an
    API request. A plain path or file: URI (MLflow's deprecated file store) is rejected.
    postgresql://, mysql://, mssql:// and databricks URIs are returned unchecked.
    """
    scheme = store_uri.scheme(uri)
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
    database = store_uri.sqlite_path(uri)  # no file: sqlite://, sqlite:///:memory:
    if database is None:
        raise PreflightError(
            f"tracking URI {uri} is an in-memory SQLite database, lost when the process exits:"
            f" give a file, sqlite:///ABSOLUTE/PATH/mlflow.db"
        )
    path = os.path.abspath(database)
    query = uri.partition("?")[2]  # driver options such as ?timeout=20 stay
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
    from mlflow.exceptions import MlflowException  # here: the other checks stay free of MLflow's import time

    try:
        status = _get(uri, "/health", timeout_s)
        cause = f"/health answered HTTP {status}" if status >= 400 else None
    except MlflowException as e:
        cause = _no_answer_reason(e)
    if cause:
        raise PreflightError(
            f"cannot reach MLflow tracking server at {uri}: {cause} (is `mlflow server` running"
            f" there, and the port open?)"
        )
    # MLflow 3 exempts /health from its Host-header check, so a server that answers /health
    # may still refuse every API call, e.g. when addressed by a public IP or a DNS name.
    try:
        status = _get(uri, "/api/2.0/mlflow/experiments/search?max_results=1", timeout_s)
    except MlflowException as e:
        raise PreflightError(f"MLflow tracking server at {uri} stopped answering: {_no_answer_reason(e)}") from None
    if status >= 400:
        raise PreflightError(_refusal_message(uri, status))
    return uri


def _refusal_message(uri: str, status: int) -> str:
    host = urllib.parse.urlsplit(uri).netloc
    if status == 403:
        return (
            f"MLflow tracking server at {uri} refuses requests addressed to {host} (HTTP 403): start"
            f" it with --allowed-hosts {host}, or address it by localhost or a private IP"
        )
    if status == 401:
        return (
            f"MLflow tracking server at {uri} wants credentials (HTTP 401): set"
            f" MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    return f"MLflow tracking server at {uri} answered HTTP {status} to an API request: is it an MLflow server?"


def _get(uri: str, endpoint: str, timeout_s: float) -> int:
    """The HTTP status of a GET of `endpoint`, sent as the MLflow client sends its requests: its credentials
    (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, ~/.mlflow/credentials, an auth plugin) and TLS settings.
    Tried once, within `timeout_s`; MlflowException when no answer came."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    response = http_request(get_default_host_creds(uri), endpoint, "GET", max_retries=0, backoff_factor=0,
                            timeout=timeout_s, raise_on_status=False)
    return response.status_code


def _no_answer_reason(e: Exception) -> str:
    """Why a request got no answer, in urllib3's words ("...: [Errno 111] Connection refused"): `http_request`
    wraps requests' exception, whose first argument is urllib3's, which holds the reason."""
    wrapped = e.__cause__ or e.__context__ or e
    inner = wrapped.args[0] if wrapped.args else wrapped
    return " ".join(str(getattr(inner, "reason", inner)).split())


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


def _local_path(uri: str) -> str:
    """The absolute path of a plain path or file: URI; a file:// URI naming another host is refused."""
    try:
        return os.path.abspath(store_uri.local_path(uri))
    except ValueError as e:
        raise PreflightError(f"storage {uri} {e}") from None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
