"""One Ray cluster on this machine that the session's studies are submitted to, as a user submits studies to one
running cluster: Ray starts once for all of them."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from background import RAY_NODE_STARTING, make_temp_dir
from processes import env_without, free_port, stop_group, stop_processes_naming

NO_AUTH = {"RAY_AUTH_MODE": "disabled"}  # `ray start` asks its drivers for a token otherwise (Ray 2.60)
RAY_START_S = 120


@dataclass
class RayHead:
    """A Ray cluster of one node on this machine, started with `ray start --head --block` in a session of its own."""

    address: str
    temp_dir: Path
    head: subprocess.Popen

    def stop(self) -> None:
        stop_group(self.head, grace_s=5)
        stop_processes_naming(str(self.temp_dir))


def start_ray_head(num_cpus: int, tries: int = 2) -> RayHead:
    """`ray start --head` with its own port and temp dir: only drivers given its address (RAY_ADDRESS) join it.
    (`ray.cluster_utils.Cluster` and a plain `ray start` write /tmp/ray/ray_current_cluster, which any plain
    `ray.init()` on the machine then joins: a test's own local Ray would find the studies' cluster.)
    It starts holding RAY_NODE_STARTING, and gets a second try: Ray's fixed 30 s for a node to register was missed
    here under load (see background.py)."""
    for attempt in range(1, tries + 1):
        temp_dir = make_temp_dir("rh")
        address = f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                   f"--port={address.rsplit(':', 1)[1]}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                   f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=false",
                   f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
        env = {**env_without("RAY_ADDRESS", "MLFLOW_TRACKING_URI"), **NO_AUTH}
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
    """The session's cluster, started by its first user and stopped when its last one is done
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
            yield {**env_without("RAY_ADDRESS", "MLFLOW_TRACKING_URI"), **NO_AUTH, "RAY_ADDRESS": address}
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
