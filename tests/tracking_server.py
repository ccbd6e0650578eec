"""A real `mlflow server` for the tests, one shared by the whole session, and a `Gate` that cuts its clients off."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

from processes import free_port, stop_group, wait_until_answers

MLFLOW_SERVER_START_S = 90  # it took 9-12 s here on 2 busy cores; CI machines can be slower


def start_mlflow_server(root: Path, port: int, backend: str = "", workers: int = 1) -> subprocess.Popen:
    """An `mlflow server` on 127.0.0.1:`port`, answering when this returns, as the tracking-load benchmark starts
    one (`tracking_load.server_command`: MLflow 3 needs no extra flags here, artifacts are served and its Host-header
    check accepts 127.0.0.1; no job consumers); its database (SQLite in `root` unless `backend` names one),
    artifacts and log (server.log, appended across restarts) in `root`. Stop it with `stop_group`."""
    from stawm.study.tracking_load import SERVER_ENV, server_command

    log_path = root / "server.log"
    with open(log_path, "ab") as log:  # a session of its own: the uvicorn workers it forks stop with it
        server = subprocess.Popen(server_command(root, port, backend, workers), stdout=log, stderr=subprocess.STDOUT,
                                  cwd=root, env={**os.environ, **SERVER_ENV}, start_new_session=True)
    wait_until_answers(f"http://127.0.0.1:{port}/health", server, log_path, MLFLOW_SERVER_START_S, "mlflow server")
    return server


class _SessionServer:
    """One `mlflow server` for the whole session, started by whoever needs it first: a test (the `mlflow_server`
    fixture) or work started early in the background (see background.py). Stopped when the session ends."""

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
        port = free_port()
        self._server, self._uri = start_mlflow_server(self._root, port), f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                stop_group(self._server)
                shutil.rmtree(self._root, ignore_errors=True)
                self._server = None


SESSION_SERVER = _SessionServer()


class Gate:
    """A TCP relay on 127.0.0.1 in front of a server, which a test shuts (new connections refused, open ones cut)
    and opens again on the same port: an outage of the tracking server as its clients see it, without the 10 s
    of restarting one."""

    def __init__(self, upstream_uri: str):
        self.upstream = ("127.0.0.1", int(upstream_uri.rsplit(":", 1)[1]))
        self.port = free_port()
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
