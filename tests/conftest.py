"""The fixtures shared by the test modules, and the pytest hooks that run the slow set-ups in the background.

What they use lives beside this file, one module per idea:
- background.py: what starts in background threads at collection, in which order, and why;
- processes.py: free ports, a subprocess's environment, waiting for a server, stopping a process group;
- tracking_server.py: a real `mlflow server`, the session's one, and a `Gate` to cut its clients off;
- ray_cluster.py: the session's Ray cluster, which the studies are submitted to;
- quick_studies.py: the studies' quick runs that the end-to-end tests check.
A new fixture goes under a section heading like those below, with one line saying why it exists.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# before their import: asserts in these helpers report as a test's own do, with the values compared
pytest.register_assert_rewrite("background", "processes", "quick_studies", "ray_cluster", "tracking_server")

import background  # noqa: E402
import processes  # noqa: E402
from quick_studies import StudyRuns, run_quick_study, run_studies  # noqa: E402
from ray_cluster import SESSION_RAY  # noqa: E402
from tracking_server import SESSION_SERVER, Gate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The session fixtures whose value background.py starts making as soon as the tests are collected: name -> what
# makes it (the fixture takes it with `background.early_result`, or the server from SESSION_SERVER once it is up).
BACKGROUND_FIXTURES = {"mlflow_server": SESSION_SERVER.uri, "glimpse_size_study": run_quick_study,
                       "shared_ray_studies": run_studies}


# --- hooks: the slow set-ups in the background (background.py) ---------------------------------------------

def pytest_collection_modifyitems(config, items):
    """The tests that wait on background work run last (a stable sort: in their collected order), so that the
    foreground's own tests fill the time that work needs."""
    items.sort(key=lambda item: background.waits_on_background(item, BACKGROUND_FIXTURES))


def pytest_collection_finish(session):
    """The background work starts as soon as it is known what runs: after -m, -k and the like have deselected
    theirs, so that a run that needs none of it starts none. --collect-only runs nothing, so it starts nothing."""
    if not session.config.option.collectonly:
        background.start(session.items, BACKGROUND_FIXTURES)


def pytest_terminal_summary(terminalreporter):
    """What the background work took, to budget the suite by: its tests' own durations show only the wait."""
    if line := background.summary():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    """Nothing started for the session outlives it: background work never taken (its tests were skipped), the
    session's server and Ray cluster, and the temp dirs of the background work (kept after a failure)."""
    background.stop_untaken()
    SESSION_SERVER.stop()
    SESSION_RAY.stop()
    background.remove_temp_dirs(exitstatus)


# --- ports ---------------------------------------------------------------------------------------------------

@pytest.fixture
def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: for the tests of what a client does when nothing answers."""
    return processes.free_port()


# --- a real MLflow tracking server ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def mlflow_server() -> str:
    """Starts the session's `mlflow server` (SQLite, on 127.0.0.1) and gives its URI; stopped after the session.
    One for all its tests, since a server takes ~10 s to start here (it is started early, in the background)."""
    return SESSION_SERVER.uri()


@pytest.fixture
def gate(mlflow_server):
    """Starts a `Gate` in front of the session's MLflow server, for the test to shut: an outage of the server as its
    clients see it, without the ~10 s of restarting one. Opened again after the test."""
    relay = Gate(mlflow_server)
    yield relay
    if relay.is_open:
        relay.shut()


# --- data ------------------------------------------------------------------------------------------------------

SHARED_MNIST_RAW = REPO.parent / "shared" / "data" / "MNIST" / "raw"


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root holding MNIST/raw/*.gz, copied from the shared data folder; skips without it.
    A copy, so that the tests unpacking it never write to the shared folder, and no test downloads MNIST.

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


# --- the studies' quick runs, made once per session in the background (quick_studies.py) ----------------------

@pytest.fixture(scope="session")
def glimpse_size_study() -> dict:
    """Runs `studies/glimpse_size.py --quick` with Ray embedded, the path a user takes without a cluster; gives its
    store's URI, name and stdout. Once for the study, results and analysis tests that read it, started early."""
    return background.early_result("glimpse_size_study", run_quick_study)


@pytest.fixture(scope="session")
def shared_ray_studies() -> StudyRuns:
    """Starts the session's Ray cluster and runs every other study's --quick on it, in three lanes, into one MLflow
    store. Once, on one cluster, started early: a Ray start and a run of its own per test would not fit the budget."""
    return background.early_result("shared_ray_studies", run_studies)
