"""Starting and stopping the subprocesses the tests run: free ports, their environment, waiting until a server
answers, and stopping a process group or what is left of a Ray cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free when asked; bind it soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_without(*names: str) -> dict[str, str]:
    """This process's environment less `names`. A study, a Ray node or a driver started by a test is given
    everything else, but not the RAY_ADDRESS or MLFLOW_TRACKING_URI of whoever runs the suite: with them it would
    join their cluster or log to their store, not the test's."""
    return {k: v for k, v in os.environ.items() if k not in names}


def wait_until_answers(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float, what: str) -> None:
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
    stop_group(process)
    pytest.fail(f"{what} did not answer {url} within {timeout_s} s; its log:\n"
                f"{log_path.read_text(errors='replace')[-4000:]}")


def stop_group(process: subprocess.Popen, grace_s: float = 20) -> None:
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


def stop_processes_naming(text: str) -> None:
    """SIGKILL what is left of a Ray cluster: the processes whose command line names `text` (its temp dir)."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if text in " ".join(p.info["cmdline"] or [])]
    for process in mine:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=10)
