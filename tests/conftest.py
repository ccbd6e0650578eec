"""Fixtures shared by the test modules. Add new ones under a section heading like those below."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free when asked; bind it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return _free_port()


# --- a real MLflow tracking server --------------------------------------------------------------

MLFLOW_SERVER_START_S = 90  # it took 9-12 s here on 2 busy cores; CI machines can be slower


class _SessionServer:
    """One `mlflow server` for the whole session, started by whoever needs it first: a test (the `mlflow_server`
    fixture) or work started early in the background (`start_early`). Stopped when the session ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._server: subprocess.Popen | None = None
        self._uri = ""
        self._root: Path | None = None

    def uri(self) -> str:
        with self._lock:
            if self._server is None:
                self._start()
            return self._uri

    def _start(self) -> None:
        """An `mlflow server` on 127.0.0.1 with an SQLite database. MLflow 3 needs no extra flags for this:
        artifacts are served (proxied) by default, and its Host-header check accepts localhost and 127.0.0.1.
        Job execution (huey consumers: seven more processes) is switched off, which only the server's own jobs use."""
        self._root = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
        port = _free_port()
        uri = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "mlflow", "server",
                   "--backend-store-uri", f"sqlite:///{self._root / 'server.db'}",
                   "--artifacts-destination", str(self._root / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log_path = self._root / "server.log"
        with open(log_path, "wb") as log:
            # A session of its own, so the uvicorn workers it forks can be stopped with it as one group.
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self._root, env=env,
                                      start_new_session=True)
        _wait_for_health(uri, server, log_path)
        self._server, self._uri = server, uri

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                _stop_group(self._server)
                shutil.rmtree(self._root, ignore_errors=True)
                self._server = None


SESSION_SERVER = _SessionServer()


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    """URI of the session's `mlflow server` on 127.0.0.1 with an SQLite database; stopped after the session."""
    return SESSION_SERVER.uri()


# --- slow set-ups started in the background as soon as the tests are collected ----------------------------
# The end-to-end checks of the cluster path spend most of their time waiting: pip downloading the study stack,
# a fake cluster's head and workers starting, a job's driver importing. A test module that defines
# `start_early() -> object` has it run in a background thread when collection ends, if any of its slow tests
# is selected (none with -m "not slow"); its fixture takes the result with `early_result(__name__, start_early)`,
# which re-raises what it raised. The work starts subprocesses only (no Ray or MLflow client in this process), so
# the tests running meanwhile are not touched, only slowed where both want the CPU. The session's MLflow server
# starts early too, when a selected test uses it.

_EARLY_POOL = ThreadPoolExecutor(max_workers=3, thread_name_prefix="early")
_EARLY: dict[str, Future] = {}


def pytest_collection_finish(session):
    items = session.items  # what runs: after `-m`, `-k` and the like have deselected theirs
    slow = [item for item in items if item.get_closest_marker("slow")]
    if any("mlflow_server" in item.fixturenames for item in items):
        _EARLY["mlflow_server"] = _EARLY_POOL.submit(SESSION_SERVER.uri)
    for module in {item.module for item in slow if hasattr(item.module, "start_early")}:
        _EARLY[module.__name__] = _EARLY_POOL.submit(module.start_early)


def early_result(name: str, start):
    """What `start()` returned, run early in the background or now (a run that did not select it early)."""
    future = _EARLY.pop(name, None)
    return future.result() if future is not None else start()


def pytest_sessionfinish(session, exitstatus):
    for future in _EARLY.values():  # started but never taken (its tests were skipped): stop what it left running
        if future.exception() is None:
            result = future.result()
            stop = result.get("stop") if isinstance(result, dict) else getattr(result, "stop", None)
            if callable(stop):
                stop()
    SESSION_SERVER.stop()


def _wait_for_health(uri: str, server: subprocess.Popen, log_path: Path) -> None:
    _wait_until_answers(f"{uri}/health", server, log_path, MLFLOW_SERVER_START_S, "mlflow server")


def _wait_until_answers(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float, what: str) -> None:
    """Return once GET `url` answers 200; fail the test (with the end of the log) if `process` exits first or
    `timeout_s` passes, then stopping its process group."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with status {process.returncode}; its log:\n"
                        f"{log_path.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    _stop_group(process)
    pytest.fail(f"{what} did not answer {url} within {timeout_s} s; its log:\n"
                f"{log_path.read_text(errors='replace')[-4000:]}")


def _stop_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group `process` leads, then SIGKILL whatever is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; a worker may linger a moment longer.
        deadline = time.monotonic() + wait_s
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group_alive(process.pid):
            break


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


# --- data ---------------------------------------------------------------------------------------

SHARED_MNIST_RAW = REPO.parent / "shared" / "data" / "MNIST" / "raw"


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root holding MNIST/raw/*.gz, copied from the shared data folder; skips without it.

    Pass it to the project as its data root (--data-root); project code never names this path.
    """
    archives = sorted(SHARED_MNIST_RAW.glob("*.gz")) if SHARED_MNIST_RAW.is_dir() else []
    if not archives:
        pytest.skip(f"no MNIST archives in {SHARED_MNIST_RAW}")
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in archives:
        shutil.copy2(archive, raw / archive.name)
    return root


@pytest.fixture(scope="session")
def quick_study(tmp_path_factory) -> dict:
    """A real `studies/glimpse_size.py --quick` run (2 epochs, 3 steps each), made once per session.

    The study tests check what it logged; the analysis tests run the notebooks and the report on it.
    """
    tmp = tmp_path_factory.mktemp("quick-study")
    uri = f"sqlite:///{tmp}/mlflow.db"
    command = [sys.executable, "studies/glimpse_size.py", "--quick", "--tracking-uri", uri, "--storage",
               str(tmp / "ray"), "--name", "t", "--epochs", "2", "--set", "max_steps=3"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, \
        f"quick study failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return {"tmp": tmp, "uri": uri, "name": "t", "stdout": done.stdout}


# --- every other study's quick mode, on one Ray cluster -------------------------------------------

STEP_CAP = ["--set", "max_steps=3"]  # --quick trains whole epochs of the digit sample; 3 steps are enough here
STUDIES = {  # label -> the script, its --name (MLflow experiment) and its flags, each as small as its tests allow
    "table1": ("table1.py", "table1", STEP_CAP),  # 2 seeds: each seed's self-supervised run on its own drawer
    "search": ("search.py", "search", STEP_CAP),  # 2 suggestions x 2 seeds, then the best over 2 fresh seeds
    "search --resume": ("search.py", "search", [*STEP_CAP, "--resume"]),  # again: nothing left, nothing doubled
    "glimpse_count": ("glimpse_count.py", "glimpse_count", ["--seeds", "1", *STEP_CAP]),
    "learnable_rates": ("learnable_rates.py", "learnable_rates", ["--seeds", "1", *STEP_CAP]),
    "memory_rates": ("memory_rates.py", "memory_rates", ["--seeds", "1", *STEP_CAP]),
    "fused": ("glimpse_size.py", "fused", ["--fuse-seeds", "--gpus-per-trial", "auto", "--epochs", "2", *STEP_CAP]),
}


# Three lanes, balanced on their measured wall times (seconds.json, 2026-12-03: table1 99 s, search 41 + 14,
# fused 39, glimpse_count 35, memory_rates 28, learnable_rates 26): most of a study's time is its driver
# importing and waiting on Ray, which another lane's trials fill.
STUDY_LANES = (["table1"], ["search", "search --resume", "learnable_rates"], ["fused", "glimpse_count", "memory_rates"])
assert sorted(sum(STUDY_LANES, [])) == sorted(STUDIES)


@dataclass
class StudyRuns:
    """What the `studies` fixture ran: one MLflow store and Ray storage, one finished process per study."""

    uri: str
    storage: Path
    runs: dict[str, subprocess.CompletedProcess]
    seconds: dict[str, float]  # each study's wall time, start-up included (the suite's budget is tight)

    def stdout(self, name: str) -> str:
        """The study's stdout, once it is known to have exited 0."""
        done = self.runs[name]
        assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done.stdout


@pytest.fixture(scope="session")
def studies(tmp_path_factory) -> StudyRuns:
    """Every study's --quick run but glimpse_size's plain one (`quick_study`), made once per session.

    Each is a subprocess, as a user submits studies to one running Ray cluster (RAY_ADDRESS) that log
    to one MLflow store: Ray starts once for all of them instead of once per study. The cluster is
    shut down before this returns (a plain `ray.init()` elsewhere would otherwise join it). Each test
    checks its own study's run, so one study failing fails only its tests.
    """
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("studies")
    uri, storage = f"sqlite:///{tmp}/mlflow.db", tmp / "ray"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "RAY_ADDRESS": cluster.address}
    runs, seconds = {}, {}

    def run_lane(labels: list[str]) -> None:  # one after another: a --resume after its first run
        for label in labels:
            script, name, flags = STUDIES[label]
            command = [sys.executable, f"studies/{script}", "--quick", "--tracking-uri", uri, "--storage", str(storage),
                       "--name", name, *flags]
            start = time.monotonic()
            runs[label] = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            seconds[label] = time.monotonic() - start

    from mlflow import MlflowClient

    MlflowClient(uri).search_experiments()  # the store's tables first: two drivers creating them at once collide
    try:  # lanes of studies at once: one study's driver imports (~9 s) while the others' trials run
        with ThreadPoolExecutor(len(STUDY_LANES)) as pool:
            list(pool.map(run_lane, STUDY_LANES))
    finally:
        cluster.shutdown()
    (tmp / "seconds.json").write_text(json.dumps(seconds, indent=1))  # kept beside the store, to budget the suite
    return StudyRuns(uri, storage, runs, seconds)
