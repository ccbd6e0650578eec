"""Screenshots of MLflow's UI after one quick study, as its user sees it: the runs table with seeds grouped by
configuration, the chart of test error against epoch per group, the study's report on its parent run, and the page
of the best trial's logged model. A contributor re-runs it after changing what a study logs:

    python docs/screenshots.py            # needs chromium (apt-get install chromium); about two minutes

It runs `studies/glimpse_size.py --quick` into a fresh SQLite store, serves that store with `mlflow server`, and
has headless Chromium open each page and save it as docs/mlflow-*.png (the README shows them).

The pages are opened as `http://stawm-mlflow:PORT`, a name Chromium is told means 127.0.0.1: MLflow 3's UI opens
its assistant panel over a third of the page when the address is localhost or 127.0.0.1, which a user on a remote
tracking server does not see either. The server is told to accept that name (--allowed-hosts, --cors-allowed-origins).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stawm import schema  # noqa: E402  (the checkout's, found through the path above)
from stawm.study import tracking  # noqa: E402

TRAINING = "workflowType=machine_learning"  # MLflow 3.17's UI opens its GenAI view unless the URL says training
HOST = "stawm-mlflow"  # what the browser calls the server (the module's docstring says why not localhost)
STUDY = [sys.executable, "studies/glimpse_size.py", "--quick", "--name", "glimpse_size", "--epochs", "3",
         "--set", "max_steps=5"]


def run_study(folder: Path) -> str:
    """The quick study into folder/mlflow.db; returns its tracking URI."""
    uri = f"sqlite:///{folder}/mlflow.db"
    print("running", " ".join(STUDY[1:]), flush=True)
    with open(folder / "study.log", "w") as log:
        done = subprocess.run([*STUDY, "--tracking-uri", uri, "--storage", str(folder / "ray")], cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"the study failed ({done.returncode}): see {folder / 'study.log'}")
    return uri


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(uri: str, port: int, folder: Path) -> subprocess.Popen:
    """`mlflow server` on the store, answering to HOST; waits until it is healthy."""
    address = f"{HOST}:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
         str(port), "--workers", "1", "--allowed-hosts", address, "--cors-allowed-origins", f"http://{address}"],
        stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit(f"mlflow server did not answer in 120 s: see {folder / 'server.log'}")


def screenshot(chromium: str, port: int, page: str, out: Path, height: int = 900) -> None:
    """Open http://HOST:port/PAGE in headless Chromium and save what it shows once the page has loaded."""
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--host-resolver-rules=MAP {HOST} 127.0.0.1", f"--window-size=1600,{height}",
                    f"--screenshot={out}", "--virtual-time-budget=30000", f"http://{HOST}:{port}/{page}"],
                   check=True, capture_output=True, timeout=120)
    print("wrote", out.relative_to(REPO) if out.is_relative_to(REPO) else out, flush=True)


def pages(uri: str) -> dict[str, str]:
    """File name -> UI page, for the study's experiment, parent run and best logged model."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("glimpse_size").experiment_id
    parent = tracking.find_study_run(client, experiment, "glimpse_size").info.run_id
    shots = {"mlflow-runs-by-config.png": tracking.ui_page(experiment),
             "mlflow-charts-by-config.png": tracking.ui_page(experiment) + "&compareRunsMode=CHART",
             # the report's ablation plot open in the parent run's artifacts
             "mlflow-parent-report.png": f"#/experiments/{experiment}/runs/{parent}/artifacts/"
                                         f"{schema.REPORT_ARTIFACT_DIR}/ablation_glimpse_size.png?{TRAINING}"}
    best = client.search_logged_models([experiment], order_by=[{"field_name": f"metrics.{schema.TEST_ERROR}",
                                                                 "ascending": True}], max_results=1)
    if best:
        shots["mlflow-logged-model.png"] = f"#/experiments/{experiment}/models/{best[0].model_id}?{TRAINING}"
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder the PNGs go to (default: docs/)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "",
                        help="the Chromium binary (default: chromium on PATH)")
    args = parser.parse_args(argv)
    if not args.chromium:
        parser.error("no chromium on PATH: apt-get install chromium, or pass --chromium PATH")
    with tempfile.TemporaryDirectory(prefix="stawm-screenshots-") as tmp:
        folder = Path(tmp)
        uri = run_study(folder)
        port = free_port()
        server = serve(uri, port, folder)
        try:
            for name, page in pages(uri).items():
                screenshot(args.chromium, port, page, args.out / name)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
