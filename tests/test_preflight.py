"""The preflight checks against real folders, real pyarrow filesystems and a real MLflow server."""

from __future__ import annotations

import os
import socket
import time

import pytest

from stawm.flags import default_tracking_uri
from stawm.study.preflight import (
    PreflightError,
    check_for_cluster,
    check_outside_job_folder,
    check_storage,
    check_tracking_uri,
    storage_is_shared,
)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- storage ------------------------------------------------------------------------------------


def test_local_storage_is_created_and_returned_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_storage("results/ray") == str(tmp_path / "results" / "ray")
    assert os.listdir(tmp_path / "results" / "ray") == []  # the probe file is gone


def test_file_uri_is_a_local_path(tmp_path):
    assert check_storage(f"file://{tmp_path}/ray") == str(tmp_path / "ray")
    assert (tmp_path / "ray").is_dir()


@pytest.mark.parametrize("where", ["under_a_file", "under_proc"])
def test_unwritable_local_storage_fails_naming_the_path(tmp_path, where):
    # Tests may run as root, which ignores permission bits: use places no one can write.
    if where == "under_a_file":
        (tmp_path / "plain").write_text("not a folder")
        path = str(tmp_path / "plain" / "ray")
    else:
        path = "/proc/stawm-preflight/ray"
    with pytest.raises(PreflightError) as err:
        check_storage(path)
    assert path in one_line(err)


def test_pyarrow_uri_is_probed_by_writing():
    # mock:// is pyarrow's in-memory filesystem: the same code path as s3:// and gs://, offline.
    assert check_storage("mock:///bucket/ray") == "mock:///bucket/ray"


def test_unknown_scheme_fails_with_pyarrows_reason():
    with pytest.raises(PreflightError) as err:
        check_storage("nosuch://bucket/ray")
    message = one_line(err)
    assert "nosuch://bucket/ray" in message and "Unrecognized filesystem type" in message


def test_unreachable_s3_fails_at_the_deadline_without_showing_secrets(free_port):
    uri = f"s3://AKIDEXAMPLE:hunter2@bucket/ray?endpoint_override=127.0.0.1:{free_port}&scheme=http"
    start = time.monotonic()
    with pytest.raises(PreflightError) as err:
        check_storage(uri, timeout_s=3)
    assert time.monotonic() - start < 10
    message = one_line(err)
    assert "no answer within 3 s" in message and f"127.0.0.1:{free_port}" in message
    assert "hunter2" not in message


@pytest.mark.slow
def test_unreachable_s3_reports_the_connection_error(free_port):
    # pyarrow retries for about 12 s before it gives up on a closed port.
    uri = f"s3://bucket/ray?endpoint_override=127.0.0.1:{free_port}&scheme=http"
    with pytest.raises(PreflightError) as err:
        check_storage(uri)
    assert "Could not connect" in one_line(err)


@pytest.mark.parametrize("uri, shared", [
    ("s3://bucket/ray", True),
    ("gs://bucket/ray", True),
    ("hdfs://namenode:8020/ray", True),
    ("/mnt/results", False),
    ("ray_results", False),
    ("file:///mnt/results", False),
    ("mock:///bucket", False),
])
def test_storage_is_shared(uri, shared):
    assert storage_is_shared(uri) is shared


CLUSTER = "the autoscaling Ray cluster (1 node now, up to 5)"


def test_local_storage_is_refused_for_a_cluster_that_may_grow(tmp_path, monkeypatch):
    monkeypatch.delenv("STAWM_SHARED_STORAGE", raising=False)
    check_for_cluster("s3://bucket/ray", "http://10.0.1.23:5000", CLUSTER)
    with pytest.raises(PreflightError) as err:
        check_for_cluster(str(tmp_path), "http://10.0.1.23:5000", CLUSTER)
    message = one_line(err)
    assert str(tmp_path) in message and "STAWM_SHARED_STORAGE=1" in message and CLUSTER in message


def test_local_storage_marked_shared_is_accepted_on_a_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("STAWM_SHARED_STORAGE", "1")
    check_for_cluster(str(tmp_path), "http://10.0.1.23:5000", CLUSTER)


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "/tmp/mlruns", "file:///tmp/mlruns"])
def test_a_tracking_file_is_refused_on_a_cluster_even_on_shared_storage(uri, monkeypatch):
    monkeypatch.setenv("STAWM_SHARED_STORAGE", "1")  # SQLite over NFS from several nodes: still no
    with pytest.raises(PreflightError) as err:
        check_for_cluster("s3://bucket/ray", uri, CLUSTER)
    assert "mlflow server" in one_line(err) and "--tracking-uri http://" in one_line(err)


def test_credentials_never_reach_a_message(monkeypatch):
    monkeypatch.delenv("STAWM_SHARED_STORAGE", raising=False)
    check_for_cluster("s3://KEY:SECRET@bucket/ray", "postgresql://stawm:hunter2@db:5432/mlflow", CLUSTER)
    with pytest.raises(PreflightError) as err:
        check_tracking_uri("mystery://stawm:hunter2@db/x")
    assert "hunter2" not in str(err.value) and "stawm:***@db" in str(err.value)


# --- the temporary folder of a Ray job ------------------------------------------------------------

JOB_CONFIG = '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}'


@pytest.fixture
def in_a_job(tmp_path, monkeypatch):
    """This process as a `ray job submit --working-dir` driver: Ray's variable set, the cwd its package copy."""
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_CONFIG)
    return package


@pytest.mark.parametrize("flag, value", [("--storage", "ray_results"), ("--tracking-uri", "sqlite:///mlflow.db"),
                                         ("--data-root", "data"), ("--optuna-storage", "sqlite:///optuna.db")])
def test_paths_inside_a_jobs_temporary_copy_are_refused(in_a_job, flag, value):
    with pytest.raises(PreflightError) as err:
        check_outside_job_folder({flag: value})
    message = one_line(err)
    assert message.startswith(f"{flag} {value}") and str(in_a_job) in message and "ray job submit" in message


def test_paths_outside_the_job_folder_and_servers_pass(in_a_job, tmp_path):
    check_outside_job_folder({"--storage": "s3://bucket/ray", "--tracking-uri": "http://10.0.1.23:5000",
                              "--data-root": str(tmp_path / "data"), "--optuna-storage": "postgresql://h/db"})


def test_outside_a_job_relative_paths_are_fine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    check_outside_job_folder({"--storage": "ray_results", "--tracking-uri": "sqlite:///mlflow.db"})
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')  # a job without --working-dir
    check_outside_job_folder({"--storage": "ray_results"})


# --- tracking URI -------------------------------------------------------------------------------


def test_sqlite_uri_is_made_absolute_and_its_folder_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_tracking_uri("sqlite:///stores/mlflow.db") == f"sqlite:///{tmp_path}/stores/mlflow.db"
    assert (tmp_path / "stores").is_dir()
    absolute = f"sqlite:///{tmp_path}/mlflow.db"
    assert check_tracking_uri(absolute) == absolute


def test_unwritable_sqlite_folder_fails_naming_it(tmp_path):
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(PreflightError) as err:
        check_tracking_uri(f"sqlite:///{tmp_path}/plain/mlflow.db")
    assert str(tmp_path / "plain") in one_line(err)


def test_in_memory_sqlite_is_refused():
    with pytest.raises(PreflightError, match="in-memory"):
        check_tracking_uri("sqlite://")


@pytest.mark.parametrize("uri", ["mlruns", "/tmp/mlruns", "file:///tmp/mlruns"])
def test_file_store_is_refused(uri):
    with pytest.raises(PreflightError) as err:
        check_tracking_uri(uri)
    message = one_line(err)
    assert "deprecated" in message and "sqlite:///" in message


def test_unknown_tracking_scheme_is_refused():
    with pytest.raises(PreflightError, match="unknown scheme"):
        check_tracking_uri("htp://127.0.0.1:5000")


def test_unreachable_tracking_server_fails_fast(free_port):
    uri = f"http://127.0.0.1:{free_port}"
    start = time.monotonic()
    with pytest.raises(PreflightError) as err:
        check_tracking_uri(uri)
    assert time.monotonic() - start < 5
    assert one_line(err).startswith(f"cannot reach MLflow tracking server at {uri}: ")


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert default_tracking_uri() == "http://head:5000"


@pytest.mark.slow
def test_real_tracking_server_passes_and_records(mlflow_server):
    from mlflow import MlflowClient

    assert check_tracking_uri(mlflow_server + "/") == mlflow_server
    client = MlflowClient(mlflow_server)
    experiment_id = client.create_experiment("preflight")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_metric(run_id, "test_error", 0.25, step=1)
    client.log_text(run_id, "proxied through the server", "note.txt")  # --artifacts-destination
    assert [m.value for m in client.get_metric_history(run_id, "test_error")] == [0.25]
    assert client.download_artifacts(run_id, "note.txt")


@pytest.mark.slow
def test_server_addressed_by_an_unlisted_name_is_refused(mlflow_server):
    # MLflow 3 answers /health to any Host but refuses API calls addressed to names outside
    # --allowed-hosts (default: localhost and private IPs). Needs a name resolving to 127.0.0.1.
    name = socket.gethostname()
    try:
        resolves_to_loopback = socket.gethostbyname(name) == "127.0.0.1"
    except OSError:
        resolves_to_loopback = False
    if not resolves_to_loopback or name == "localhost":
        pytest.skip(f"the host name {name!r} does not resolve to 127.0.0.1")
    port = mlflow_server.rsplit(":", 1)[1]
    with pytest.raises(PreflightError) as err:
        check_tracking_uri(f"http://{name}:{port}")
    assert f"--allowed-hosts {name}:{port}" in one_line(err)


# --- the artifact store, written and cleaned before any trial ---------------------------------------


def test_artifacts_are_probed_where_the_runs_write_them_and_the_probe_is_removed(tmp_path):
    from mlflow import MlflowClient

    from stawm.study.tracking import check_artifacts

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    good = client.create_experiment("good", artifact_location=(tmp_path / "artifacts").as_uri())
    check_artifacts(client, good)
    assert not list((tmp_path / "artifacts").rglob("*probe*"))  # written, then deleted
    (tmp_path / "a-file").write_text("not a folder")
    bad = client.create_experiment("bad", artifact_location=(tmp_path / "a-file" / "artifacts").as_uri())
    with pytest.raises(PreflightError) as err:
        check_artifacts(client, bad)
    message = one_line(err)
    assert message.startswith(f"cannot write MLflow artifacts to {(tmp_path / 'a-file' / 'artifacts').as_uri()}")
    assert "--artifacts-destination" in message
