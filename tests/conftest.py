"""Fixtures shared by the test modules. Add new ones under a section heading like those below."""

from __future__ import annotations

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
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
        self._root = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
        port = _free_port()
        self._server, self._uri = start_mlflow_server(self._root, port), f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                _stop_group(self._server)
                shutil.rmtree(self._root, ignore_errors=True)
                self._server = None


SESSION_SERVER = _SessionServer()


def start_mlflow_server(root: Path, port: int, backend: str = "", workers: int = 1) -> subprocess.Popen:
    """An `mlflow server` on 127.0.0.1:`port`, answering when this returns, as the tracking-load benchmark starts
    one (`tracking_load.server_command`: MLflow 3 needs no extra flags here, artifacts are served and its Host-header
    check accepts 127.0.0.1; no job consumers); its database (SQLite in `root` unless `backend` names one),
    artifacts and log (server.log, appended across restarts) in `root`. Stop it with `_stop_group`."""
    from stawm.bench.tracking_load import SERVER_ENV, server_command

    log_path = root / "server.log"
    with open(log_path, "ab") as log:  # a session of its own: the uvicorn workers it forks stop with it
        server = subprocess.Popen(server_command(root, port, backend, workers), stdout=log, stderr=subprocess.STDOUT,
                                  cwd=root, env={**os.environ, **SERVER_ENV}, start_new_session=True)
    _wait_for_health(f"http://127.0.0.1:{port}", server, log_path)
    return server


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    """URI of the session's `mlflow server` on 127.0.0.1 with an SQLite database; stopped after the session."""
    return SESSION_SERVER.uri()


class Gate:
    """A TCP relay on 127.0.0.1 in front of a server, which a test shuts (new connections refused, open ones cut)
    and opens again on the same port: an outage of the tracking server as its clients see it, without the 10 s
    of restarting one."""

    def __init__(self, upstream_uri: str):
        self.upstream = ("127.0.0.1", int(upstream_uri.rsplit(":", 1)[1]))
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self.open()

    def open(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)  # the accept loop looks every 0.1 s whether the gate was shut
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    @property
    def is_open(self) -> bool:
        return self._listener is not None

    def shut(self) -> None:
        self._listener, listener = None, self._listener
        listener.close()
        for connection in self._open:
            _close_socket(connection)
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            upstream = socket.create_connection(self.upstream)
            self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_relay, args=(source, sink), daemon=True).start()


def _relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    for connection in (source, sink):
        _close_socket(connection)


def _close_socket(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()


@pytest.fixture
def gate(mlflow_server):
    """A `Gate` in front of the session's MLflow server; opened again after the test."""
    relay = Gate(mlflow_server)
    yield relay
    if relay.is_open:
        relay.shut()


# --- slow set-ups started in the background as soon as the tests are collected ----------------------------
# The end-to-end checks spend most of their time waiting: a study's driver importing and waiting on Ray, pip
# downloading the study stack, a fake cluster's head and workers starting. So they start in background threads
# when collection ends, if a selected test needs them (none with -m "not slow"), and the tests that take their
# results run last (`pytest_collection_modifyitems`), while the rest of the suite runs in the foreground:
# - the session fixtures named in EARLY_FIXTURES (the quick studies, the session's MLflow server);
# - a test module's `start_early() -> object`, if any of its slow tests is selected.
# Each is taken with `early_result(name, start)`, which re-raises what it raised. The work starts subprocesses
# (no Ray client in this process), so the tests running meanwhile are not touched, only slowed where both want
# the CPU.

# At most three pieces at once beside the quick study and the server: more, and the machine's load (16-23 seen)
# made Ray nodes and notebook kernels miss their start-up deadlines, and every piece slower.
_EARLY_POOL = ThreadPoolExecutor(max_workers=3, thread_name_prefix="early")
_FIRST_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="early-first")  # the quick study, the server
_EARLY: dict[str, Future] = {}
_TEMP_DIRS: list[Path] = []  # made by early work (no tmp_path_factory in a background thread); removed at the end


def _temp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    _TEMP_DIRS.append(path)
    return path


def _early_modules(items) -> set:
    return {item.module for item in items if item.get_closest_marker("slow") and hasattr(item.module, "start_early")}


def _waits_on_early_work(item) -> bool:
    long = set(EARLY_FIXTURES) - {"mlflow_server"}  # the server answers within seconds
    return bool(set(item.fixturenames) & long) or item.module in _early_modules([item])


def pytest_collection_modifyitems(config, items):
    # a stable sort: the tests that wait on background work last, in their collected order, so that the
    # foreground's own tests fill the time the background work needs
    items.sort(key=_waits_on_early_work)


def pytest_collection_finish(session):
    items = session.items  # what runs: after `-m`, `-k` and the like have deselected theirs
    work = {name: start for name, start in EARLY_FIXTURES.items() if any(name in i.fixturenames for i in items)}
    work.update({module.__name__: module.start_early for module in _early_modules(items)})
    if "quick_study" not in work:
        QUICK_RAY_UP.set()
    for name, start in sorted(work.items(), key=lambda kv: EARLY_ORDER.index(kv[0]) if kv[0] in EARLY_ORDER else 99):
        if name in ("quick_study", "mlflow_server"):  # first; the rest once the quick study's Ray is up
            _EARLY[name] = _FIRST_POOL.submit(_timed, name, start, None)
        else:
            _EARLY[name] = _EARLY_POOL.submit(_timed, name, start, QUICK_RAY_UP)


# the longest first (the summary line's wall times, 2026-12-03), so that none starts last and holds the suite up
EARLY_ORDER = ["studies", "test_cluster_setup", "test_tracking_outage", "test_cluster", "test_tracking_load"]


# The quick study starts Ray in its own process, whose node must register within Ray's fixed 30 s (see
# RAY_NODE_STARTING), missed on these 2 cores when the rest of the background work starts at the same moment (seen
# twice). That work waits for it, up to QUICK_RAY_WAIT_S.
QUICK_RAY_UP = threading.Event()
QUICK_RAY_WAIT_S = 120
_EARLY_SECONDS: dict[str, float] = {}


def _timed(name: str, start, after: threading.Event | None):
    if after is not None:
        after.wait(QUICK_RAY_WAIT_S)
    clock = time.monotonic()
    try:
        return start()
    finally:
        _EARLY_SECONDS[name] = time.monotonic() - clock


def pytest_terminal_summary(terminalreporter):
    # what the background work took, to budget the suite by (its tests' own durations show only the wait)
    if _EARLY_SECONDS:
        terminalreporter.write_line("background work (wall s): " + ", ".join(
            f"{name} {seconds:.0f}" for name, seconds in sorted(_EARLY_SECONDS.items(), key=lambda kv: -kv[1])))


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
    SESSION_RAY.stop()
    for path in _TEMP_DIRS if exitstatus == 0 else []:  # kept after a failure, to look into
        shutil.rmtree(path, ignore_errors=True)


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


def stop_processes_naming(text: str) -> None:
    """SIGKILL what is left of a Ray cluster: the processes whose command line names `text` (its temp dir)."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if text in " ".join(p.info["cmdline"] or [])]
    for process in mine:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=10)


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


# --- one Ray cluster for the end-to-end studies -------------------------------------------------------------

NO_AUTH = {"RAY_AUTH_MODE": "disabled"}  # `ray start` asks its drivers for a token otherwise (Ray 2.60)
RAY_START_S = 120


@dataclass
class RayHead:
    """A Ray cluster of one node on this machine, started with `ray start --head --block` in a session of its own."""

    address: str
    temp_dir: Path
    head: subprocess.Popen

    def stop(self) -> None:
        _stop_group(self.head, grace_s=5)
        stop_processes_naming(str(self.temp_dir))


# Ray gives a starting node a fixed 30 s to register with its GCS (ray/_private/node.py: "The current node timed
# out during startup"). On these 2 cores, with the background work starting at once, `ray start` missed it (load
# average 16-23, seen three times): the background's Ray nodes start one at a time, each holding this lock until
# it is up, and the studies' head gets a second try.
RAY_NODE_STARTING = threading.Lock()


def start_ray_head(num_cpus: int, tries: int = 2) -> RayHead:
    """`ray start --head` with its own port and temp dir: only drivers given its address (RAY_ADDRESS) join it.
    (`ray.cluster_utils.Cluster` and a plain `ray start` write /tmp/ray/ray_current_cluster, which any plain
    `ray.init()` on the machine then joins: a test's own local Ray would find the studies' cluster.)"""
    for attempt in range(1, tries + 1):
        temp_dir = _temp_dir("rh")
        address = f"127.0.0.1:{_free_port()}"
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                   f"--port={address.rsplit(':', 1)[1]}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                   f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false",
                   f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}"]
        env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}, **NO_AUTH}
        with RAY_NODE_STARTING, open(temp_dir / "head.log", "wb") as log:
            head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            ray_head = RayHead(address, temp_dir, head)
            deadline = time.monotonic() + RAY_START_S
            while not (temp_dir / "ray_current_cluster").exists():  # written once the head's GCS and raylet are up
                if head.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            else:
                return ray_head
        ray_head.stop()
        if attempt == tries:
            raise RuntimeError(f"ray start --head did not come up ({tries} tries); the last one's log:\n"
                               f"{(temp_dir / 'head.log').read_text()[-3000:]}")


class _SessionRay:
    """The Ray cluster that the session's studies are submitted to, as a user submits studies to one running
    cluster: Ray starts once for all of them. Started by its first user, stopped when its last one is done
    (`with SESSION_RAY.held() as env:`), so that no idle cluster takes CPU from the tests that come after."""

    def __init__(self, num_cpus: int):
        self.num_cpus = num_cpus
        self._lock = threading.Lock()
        self._head: RayHead | None = None
        self._users = 0

    @contextmanager
    def held(self):
        """The environment of a driver of this cluster (RAY_ADDRESS; no MLFLOW_TRACKING_URI from outside)."""
        with self._lock:
            if self._head is None:
                self._head = start_ray_head(self.num_cpus)
            self._users += 1
            address = self._head.address
        try:
            yield {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, **NO_AUTH,
                   "RAY_ADDRESS": address}
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._stop()

    def _stop(self) -> None:
        if self._head is not None:
            self._head.stop()
            self._head = None

    def stop(self) -> None:
        with self._lock:
            self._stop()


SESSION_RAY = _SessionRay(num_cpus=5)  # a trial each for the 3 lanes of studies and the 2 outage studies


# --- glimpse_size's quick study, on a local Ray of its own --------------------------------------------------

def run_quick_study() -> dict:
    """A real `studies/glimpse_size.py --quick` run (2 epochs, 3 steps each), as its user runs it: Ray embedded
    in the study's process. RAY_TMPDIR gives that Ray a temp dir of its own, so that it does not join a cluster
    another test has running (a plain `ray.init()` joins the one named in /tmp/ray/ray_current_cluster)."""
    tmp = _temp_dir("quick-study-")
    uri = f"sqlite:///{tmp}/mlflow.db"
    command = [sys.executable, "studies/glimpse_size.py", "--quick", "--tracking-uri", uri, "--storage",
               str(tmp / "ray"), "--name", "t", "--epochs", "2", "--set", "max_steps=3"]
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
           "RAY_TMPDIR": str(_temp_dir("rq"))}
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
        study = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + QUICK_RAY_WAIT_S
        with RAY_NODE_STARTING:
            while ("Started a local Ray instance" not in (tmp / "stderr").read_text(errors="replace")
                   and study.poll() is None and time.monotonic() < deadline):
                time.sleep(0.5)
        QUICK_RAY_UP.set()
        study.wait(timeout=600)
    finally:
        QUICK_RAY_UP.set()  # whatever happened: the rest of the background work waits no longer
        if study.poll() is None:
            study.kill()
    stdout, stderr = (tmp / "stdout").read_text(), (tmp / "stderr").read_text(errors="replace")
    assert study.returncode == 0, f"quick study failed ({study.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return {"tmp": tmp, "uri": uri, "name": "t", "stdout": stdout}


@pytest.fixture(scope="session")
def quick_study() -> dict:
    """`run_quick_study`'s result, made once per session (early, in the background). The study tests check what
    it logged; the analysis tests run the notebooks and the report on it."""
    return early_result("quick_study", run_quick_study)


# --- every other study's quick mode, on the session's Ray cluster -------------------------------------------

# --quick trains whole epochs of the digit sample; 3 steps are enough here. One trial at a time per study: its
# trials run one after the other in one worker process (Tune reuses it), where two at once would start a second
# process importing torch, MLflow and the data (~8 s of CPU, which the suite is short of); the studies run at once.
STEP_CAP = ["--set", "max_steps=3", "--max-concurrent", "1"]
STUDIES = {  # label -> the script, its --name (MLflow experiment) and its flags, each as small as its tests allow
    "table1": ("table1.py", "table1", STEP_CAP),  # 2 seeds: each seed's self-supervised run on its own drawer
    "search": ("search.py", "search", STEP_CAP),  # 2 suggestions x 2 seeds, then the best over 2 fresh seeds
    "search --resume": ("search.py", "search", [*STEP_CAP, "--resume"]),  # again: nothing left, nothing doubled
    "glimpse_count": ("glimpse_count.py", "glimpse_count", ["--seeds", "1", *STEP_CAP]),
    "learnable_rates": ("learnable_rates.py", "learnable_rates", ["--seeds", "1", *STEP_CAP]),
    "memory_rates": ("memory_rates.py", "memory_rates", ["--seeds", "1", *STEP_CAP]),
    "fused": ("glimpse_size.py", "fused", ["--fuse-seeds", "--gpus-per-trial", "auto", "--epochs", "2", *STEP_CAP]),
}


# Three lanes, balanced on their measured wall times (the suite's summary line, 2026-12-03: table1 99 s, search 41 + 14,
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

    def stdout(self, name: str) -> str:
        """The study's stdout, once it is known to have exited 0."""
        done = self.runs[name]
        assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        return done.stdout


def run_studies() -> StudyRuns:
    """Every study's --quick run but glimpse_size's plain one (`run_quick_study`), each a subprocess submitted
    to the session's Ray cluster (RAY_ADDRESS), all logging to one MLflow store. Each test checks its own
    study's run, so one study failing fails only its tests."""
    from mlflow import MlflowClient

    tmp = _temp_dir("studies-")
    uri, storage = f"sqlite:///{tmp}/mlflow.db", tmp / "ray"
    runs = {}

    def run_lane(labels: list[str], env: dict) -> None:  # one after another: a --resume after its first run
        for label in labels:
            script, name, flags = STUDIES[label]
            command = [sys.executable, f"studies/{script}", "--quick", "--tracking-uri", uri, "--storage", str(storage),
                       "--name", name, *flags]
            start = time.monotonic()
            # 600 s: a net, not a budget (on a loaded machine a study waits for CPU)
            runs[label] = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            _EARLY_SECONDS[f"studies: {label}"] = time.monotonic() - start  # in the summary, to balance the lanes

    MlflowClient(uri).search_experiments()  # the store's tables first: two drivers creating them at once collide
    with SESSION_RAY.held() as env, ThreadPoolExecutor(len(STUDY_LANES)) as pool:
        # lanes of studies at once: one study's driver imports (~9 s) while the others' trials run
        list(pool.map(run_lane, STUDY_LANES, [env] * len(STUDY_LANES)))
    return StudyRuns(uri, storage, runs)


@pytest.fixture(scope="session")
def studies() -> StudyRuns:
    """`run_studies`' result, made once per session (early, in the background)."""
    return early_result("studies", run_studies)


EARLY_FIXTURES = {"mlflow_server": SESSION_SERVER.uri, "quick_study": run_quick_study, "studies": run_studies}
