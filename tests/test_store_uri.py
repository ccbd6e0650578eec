"""A store's URI to its scheme and its file on this machine (stawm.store_uri), and the sites that use it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stawm.store_uri import local_path, scheme, sqlite_path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", "sqlite"),
    ("postgresql+psycopg://stawm:hunter2@db:5432/mlflow", "postgresql+psycopg"),
    ("HTTP://head:5000", "http"),
    ("s3://bucket/ray", "s3"),
    ("file:///tmp/ray", "file"),
    ("file:relative/ray", "file"),
    ("ray_results", ""),
    ("/tmp/ray", ""),
    ("runs:2026", ""),  # a colon, no "//": a plain path
    ("C:\\ray", ""),
])
def test_scheme(uri, expected):
    assert scheme(uri) == expected


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", "mlflow.db"),  # three slashes: relative, to the working folder
    ("sqlite:///a/b.db", "a/b.db"),
    ("sqlite:////abs/b.db", "/abs/b.db"),  # four: absolute
    ("sqlite:///a/b.db?timeout=20", "a/b.db"),  # the query holds driver options, not the file
    ("sqlite:////abs/b.db?timeout=20&uri=false", "/abs/b.db"),
    ("sqlite+pysqlite:///c.db", "c.db"),  # a driver named
    ("sqlite:///a%20b.db", "a b.db"),  # %-escapes decoded, as SQLAlchemy hands the name to SQLite
])
def test_sqlite_path(uri, expected):
    assert sqlite_path(uri) == Path(expected)


@pytest.mark.parametrize("uri", [
    "sqlite://", "sqlite:///", "sqlite:///:memory:",  # in memory: no file
    "postgresql+psycopg://stawm:hunter2@db:5432/mlflow", "mysql://root:pw@db/mlflow",
    "http://head:5000", "https://user:pw@mlflow.example/x.db", "file:///tmp/mlflow.db", "mlflow.db",
])
def test_no_sqlite_file(uri):
    assert sqlite_path(uri) is None


def test_local_path():
    assert local_path("file:///tmp/ray") == Path("/tmp/ray")
    assert local_path("file://localhost/tmp/ray") == Path("/tmp/ray")
    assert local_path("file:///tmp/a%20b") == Path("/tmp/a b")
    assert local_path("ray_results") == Path("ray_results")  # relative stays relative
    assert local_path("~/ray") == Path.home() / "ray"
    for remote in ("s3://bucket/ray", "sqlite:///mlflow.db", "http://head:5000"):
        assert local_path(remote) is None


def test_a_file_uri_on_another_host_is_refused_without_its_password():
    with pytest.raises(ValueError, match="another host, nas: file:// URIs must be file:///PATH") as err:
        local_path("file://admin:hunter2@nas/ray")
    assert "hunter2" not in str(err.value)


def test_credentials_never_reach_a_path():
    assert sqlite_path("postgresql+psycopg://stawm:hunter2@db:5432/mlflow") is None
    assert scheme("postgresql+psycopg://stawm:hunter2@db:5432/mlflow") == "postgresql+psycopg"
    assert local_path("file://stawm:hunter2@localhost/tmp/ray") == Path("/tmp/ray")


def test_the_harness_measures_the_database_file_without_its_query(tmp_path):
    """analysis/results/harness.py once kept ?timeout=20 in the path it measured (and found no such file)."""
    sys.path.insert(0, str(REPO / "analysis" / "results"))
    try:
        import harness
    finally:
        sys.path.pop(0)
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"\0" * 2**20)  # 1 MiB
    (tmp_path / "mlartifacts" / "run").mkdir(parents=True)
    (tmp_path / "mlartifacts" / "run" / "config.json").write_bytes(b"\0" * 2**19)  # 0.5 MiB
    assert harness.store_size(f"sqlite:///{database}?timeout=20") == (
        f"MLflow store {database}: 1.0 MiB (artifacts 0.5 MiB)")
