"""The slow set-ups, started in background threads as soon as the tests are collected, while the rest of the
suite runs in the foreground: what keeps the whole suite in its budget (about 11 minutes on 2 cores).

Why: the end-to-end checks spend most of their time waiting (a study's driver importing and waiting on Ray, pip
downloading the study stack, a fake cluster's nodes starting, MLflow's database migrations), which the foreground's
own tests fill. Each piece works through subprocesses (no Ray client in this process), so the tests running
meanwhile are not touched, only slowed where both want the CPU.

What: a piece starts only if a selected test needs it (with -m "not slow", only the server; with --collect-only,
nothing):
- the session fixtures named in conftest's BACKGROUND_FIXTURES: the session's MLflow server (`mlflow_server`),
  glimpse_size's quick study on a Ray of its own (`glimpse_size_study`, quick_studies.py), and every other
  study's quick run on the session's Ray cluster (`shared_ray_studies`, quick_studies.py and ray_cluster.py);
- a test module's `start_early() -> object`, if one of its slow tests is selected: test_cluster_setup (a head
  node set up by cluster.yaml's commands), test_tracking_outage (two studies whose server goes down),
  test_cluster (a fake autoscaling cluster and two jobs), test_tracking_load (PostgreSQL, a server, a benchmark).
A test takes a piece's result with `early_result(name, start)` (name: the fixture's, or the module's `__name__`),
which re-raises what it raised, or runs `start()` there and then if it was not started early. The tests that take
a long piece's result run last, in their collected order (`waits_on_background`, conftest's
pytest_collection_modifyitems); the server's tests do not, since it answers within seconds.

In which order, and why so:
1. at once, in a pool of their own (FIRST): the quick study and the server;
2. once the quick study's Ray is up (QUICK_RAY_UP, at most QUICK_RAY_WAIT_S), in a pool of three, the longest
   first (ORDER), so that none starts last and holds the suite up: the shared-Ray studies, test_cluster_setup,
   test_tracking_outage, test_cluster, test_tracking_load. The quick study's node must register within Ray's
   fixed 30 s (below), which it missed (seen twice) when the rest started at the same moment.
- At most three at once beside the quick study and the server: with more, the machine's load (16-23 seen) made
  Ray nodes and notebook kernels (nbclient's start-up deadline, in test_analysis's foreground tests) miss their
  start-up deadlines, and every piece was slower.
- Ray nodes start one at a time (RAY_NODE_STARTING, held by each until its node is up; the session's Ray head
  also gets a second try): Ray gives a starting node a fixed 30 s to register with its GCS
  (ray/_private/node.py: "The current node timed out during startup"), missed on these 2 cores with the
  background work starting at once (load average 16-23, seen three times).

At the session's end, what was started but never taken (its tests were skipped) is waited for and stopped, and the
temp dirs made here are removed (kept after a failure, to look into). The summary line "background work (wall s)"
says what each piece took (its tests' durations show only the wait): the numbers ORDER and the study lanes
(quick_studies.STUDY_LANES) are balanced by.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

QUICK_STUDY = "glimpse_size_study"
FIRST = (QUICK_STUDY, "mlflow_server")  # started at once; the rest waits for the quick study's Ray
# the longest first (the summary line's wall times, 2026-12-03), so that none starts last and holds the suite up
ORDER = ["shared_ray_studies", "test_cluster_setup", "test_tracking_outage", "test_cluster", "test_tracking_load"]

_FIRST_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="early-first")  # the quick study, the server
_POOL = ThreadPoolExecutor(max_workers=3, thread_name_prefix="early")  # at most three: see the docstring
_STARTED: dict[str, Future] = {}
_TEMP_DIRS: list[Path] = []

QUICK_RAY_UP = threading.Event()  # set by the quick study once its Ray is up, or has failed
QUICK_RAY_WAIT_S = 120
RAY_NODE_STARTING = threading.Lock()  # held by whoever starts a Ray node, until it is up: see the docstring
WALL_S: dict[str, float] = {}  # what each piece took, for the summary line


def make_temp_dir(prefix: str) -> Path:
    """A temp dir for background work (no tmp_path_factory in a background thread), removed at the session's end.
    In /tmp: short, because Ray's socket paths must fit 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    _TEMP_DIRS.append(path)
    return path


def _modules_starting_early(items) -> set:
    return {item.module for item in items if item.get_closest_marker("slow") and hasattr(item.module, "start_early")}


def waits_on_background(item, fixtures: dict) -> bool:
    """Whether the test `item` takes the result of a piece that runs for long: one of `fixtures` (conftest's
    BACKGROUND_FIXTURES) but the server, which answers within seconds, or its module's `start_early`."""
    long = set(fixtures) - {"mlflow_server"}
    return bool(set(item.fixturenames) & long) or item.module in _modules_starting_early([item])


def start(items, fixtures: dict) -> None:
    """Start, in the order above, the pieces the tests `items` need: the `fixtures` (name -> what makes its value)
    they use, and the `start_early` of each module one of whose slow tests they hold."""
    work = {name: make for name, make in fixtures.items() if any(name in i.fixturenames for i in items)}
    work.update({module.__name__: module.start_early for module in _modules_starting_early(items)})
    if QUICK_STUDY not in work:
        QUICK_RAY_UP.set()
    for name, make in sorted(work.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99):
        if name in FIRST:
            _STARTED[name] = _FIRST_POOL.submit(_timed, name, make, None)
        else:
            _STARTED[name] = _POOL.submit(_timed, name, make, QUICK_RAY_UP)


def _timed(name: str, make, after: threading.Event | None):
    if after is not None:
        after.wait(QUICK_RAY_WAIT_S)
    clock = time.monotonic()
    try:
        return make()
    finally:
        WALL_S[name] = time.monotonic() - clock


def early_result(name: str, start):
    """What `start()` returned, run early in the background or now (a run that did not select it early)."""
    future = _STARTED.pop(name, None)
    return future.result() if future is not None else start()


def summary() -> str:
    """The summary line: what each piece took, the longest first; empty if nothing ran in the background."""
    if not WALL_S:
        return ""
    return "background work (wall s): " + ", ".join(
        f"{name} {seconds:.0f}" for name, seconds in sorted(WALL_S.items(), key=lambda kv: -kv[1]))


def stop_untaken() -> None:
    """Wait for the pieces started but never taken (their tests were skipped), and stop what they left running."""
    for future in _STARTED.values():
        if future.exception() is None:
            result = future.result()
            stop = result.get("stop") if isinstance(result, dict) else getattr(result, "stop", None)
            if callable(stop):
                stop()


def remove_temp_dirs(exitstatus: int) -> None:
    """Remove the temp dirs made by `make_temp_dir`, but after a failure: kept to look into."""
    for path in _TEMP_DIRS if exitstatus == 0 else []:
        shutil.rmtree(path, ignore_errors=True)
