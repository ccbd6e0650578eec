"""Riding out an outage of the MLflow tracking server: trials keep training, their epochs wait in an outbox.

A trial (or the study driver) that cannot reach the tracking server does not fail. Each epoch's metrics go into
the trial's `Outbox` first, which logs them at once when the server answers and otherwise keeps them, in order,
until it does; the trial keeps training meanwhile and saves what is still unlogged in its checkpoint, so a
retried or resumed trial logs it later. Before it sends a run's epochs again after a failed call, it asks the
run which epoch it holds last (`tracking.last_logged_epoch`): a `log_batch` that reached the server but whose
answer did not is not sent twice, so every epoch lands exactly once. Calls whose answer the trial needs (open
its runs, close them) wait for the server instead (`Server.wait_call`).

Each outage is said in one line when it starts and one when the server answers again, per trial, not as
MLflow's tracebacks. Past the outage budget (--tracking-outage-budget, $STAWM_TRACKING_OUTAGE_BUDGET) the trial
fails with one line naming the server, how long it has been down and what is still unlogged.

Only a server that does not answer is ridden out: a connection refused or reset, a timeout, a 5xx without an
MLflow error body, or a server too busy to find a database connection. An error the server answers (a bad param,
a missing run) raises as before.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from ..provenance import redact
from . import tracking

BUDGET_ENV = "STAWM_TRACKING_OUTAGE_BUDGET"
DEFAULT_BUDGET_S = 1800.0  # half an hour: a tracking server restarted by hand, a head node rebooted
RETRY_EVERY_S = 5.0  # while the server is down, how often a trial tries it again (not every epoch)

# MLflow's HTTP client retries a failed request 7 times with backoff, about 4 minutes, silently (each trial
# stalled ~64 s in a 30 s outage, with no line anywhere). Bounded to ~3 s, an outage is noticed at once, and this
# module retries at its own pace, saying so. A value set in the environment is kept.
CLIENT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}

# What requests raises when the request got no answer: connection refused or reset, a timeout, a response cut off,
# urllib3's retries used up on 408/429/5xx. MLflow's REST client (`rest_utils.http_request`) wraps each in an
# MlflowException whose __cause__ (a timeout) or __context__ (the rest) is the requests exception itself.
_NO_ANSWER_ERRORS = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                     requests.exceptions.RetryError, requests.exceptions.ChunkedEncodingError)
# A 5xx whose body is no MLflow error (a proxy answering for a server that is down): `verify_rest_response` raises a
# plain MlflowException that keeps the status only in its text (its error_code is INTERNAL_ERROR for a 500 or 502,
# as for any other MlflowException), so its text is read.
_NOT_MLFLOW_5XX = re.compile(r"API request to \S+ failed with error code 5\d\d")
# An overloaded server answers, but with nothing done: SQLAlchemy's pool of database connections was empty for 30 s
# (seen at 96 writers on SQLite, stawm.study.tracking_load), which MLflow 3.17 reports as BAD_REQUEST.
_OVERLOADED = re.compile(r"QueuePool limit of size \d+ overflow \d+ reached")


class OutageBudgetExceeded(RuntimeError):
    """The tracking server has not answered for longer than the outage budget; the message is one line."""


def bound_client_retries() -> None:
    """Cap MLflow's own HTTP retries in this process to a few seconds (CLIENT_RETRIES), unless already set."""
    for name, value in CLIENT_RETRIES.items():
        os.environ.setdefault(name, value)


def budget_from_env() -> float:
    """$STAWM_TRACKING_OUTAGE_BUDGET in seconds, else DEFAULT_BUDGET_S; ValueError naming it if it is no number > 0."""
    text = os.environ.get(BUDGET_ENV, "").strip()
    if not text:
        return DEFAULT_BUDGET_S
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"${BUDGET_ENV} must be a number of seconds > 0, got {text!r}")
    return value


def unanswered(err: BaseException) -> bool:
    """Whether `err` says the tracking server did not answer (ride it out), rather than answered with an error."""
    if isinstance(err, RestException):  # the server's own answer
        return _OVERLOADED.search(str(err.message)) is not None
    if isinstance(err, MlflowException):
        wrapped = err.__cause__ or err.__context__
        return isinstance(wrapped, _NO_ANSWER_ERRORS) or _NOT_MLFLOW_5XX.search(str(err.message)) is not None
    return isinstance(err, _NO_ANSWER_ERRORS)


def epochs(count: int) -> str:
    return "no epoch" if count == 0 else f"{count} epoch" if count == 1 else f"{count} epochs"


def clock(seconds_since_epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(seconds_since_epoch))


@dataclass
class Server:
    """The tracking server as one trial or the study driver sees it: answering or not since when, and the budget.

    `who` names the caller in its lines ("trial trainable_1a2b3_00000"). Outages are counted for the study's
    summary (`counts`)."""

    uri: str
    budget_s: float
    who: str
    retry_s: float = RETRY_EVERY_S  # while it is down, how often to try it again
    down_since: float | None = None  # time.time() of the first call it did not answer, while it is down
    last_try: float = 0.0  # time.monotonic() of the latest call while down
    outages: int = 0
    down_s: float = 0.0  # seconds down, over the outages that ended

    def try_call(self, function, *args, **kwargs):
        """(True, what `function(*args, **kwargs)` returns), or (False, None) if the server did not answer it."""
        self.last_try = time.monotonic()
        try:
            return True, function(*args, **kwargs)
        except Exception as err:
            if not unanswered(err):
                raise
            return False, None

    def went_on(self, down_since: float | None) -> None:
        """Take up an outage an earlier attempt of the trial saw start (its checkpoint says since when): a
        retry does not restart the budget's clock."""
        if down_since is not None:
            self.down_since, self.outages = down_since, self.outages + 1

    def failed(self) -> bool:
        """Note a call it did not answer; True if that starts an outage (the moment to say so)."""
        if self.down_since is not None:
            return False
        self.down_since, self.outages = time.time(), self.outages + 1
        return True

    def answered(self) -> float | None:
        """Note that it answers; the seconds it was down if that ends an outage, else None."""
        if self.down_since is None:
            return None
        seconds, self.down_since = time.time() - self.down_since, None
        self.down_s += seconds
        return seconds

    def due(self) -> bool:
        """Whether to call it now: always while it answers; while it is down, every `retry_s` and only
        once its /health answers (a refused connection costs milliseconds; a failed MLflow call, its retries)."""
        if self.down_since is None:
            return True
        if time.monotonic() - self.last_try < self.retry_s:
            return False
        self.last_try = time.monotonic()
        return self.healthy()

    def healthy(self) -> bool:
        """Whether a tracking server's /health answers 200 within 2 s; True for a database URI (no server)."""
        if not self.uri.startswith(("http://", "https://")):
            return True
        try:
            return requests.get(f"{self.uri.rstrip('/')}/health", timeout=2).status_code == 200
        except requests.exceptions.RequestException:
            return False

    def down_line(self, doing: str) -> str:
        return (f"tracking server {redact(self.uri)} not answering since {clock(self.down_since)}; "
                f"{self.who} {doing} (outage budget {self.budget_s:.0f} s)")

    def back_line(self, seconds: float, done: str) -> str:
        return f"tracking server {redact(self.uri)} back after {seconds:.0f} s; {self.who}: {done}"

    def check_budget(self, unlogged: str) -> None:
        """Raise OutageBudgetExceeded (one line: the server, since when, what is still unlogged) once the
        server has been down longer than the budget."""
        if self.down_since is None or time.time() - self.down_since <= self.budget_s:
            return
        raise OutageBudgetExceeded(
            f"tracking server {redact(self.uri)} not answering since {clock(self.down_since)} "
            f"({time.time() - self.down_since:.0f} s, past the outage budget of {self.budget_s:.0f} s, "
            f"--tracking-outage-budget); {self.who} stops: {unlogged}")

    def wait_call(self, function, *args, doing: str, unlogged: str = "nothing unlogged"):
        """`function(*args)` once the server answers it, looking every `retry_s` whether it is back: one line
        when it stops answering, one when it answers again; OutageBudgetExceeded past the budget."""
        while True:
            ok, result = self.try_call(function, *args)
            if ok:
                seconds = self.answered()
                if seconds is not None:
                    print(self.back_line(seconds, "going on"), flush=True)
                return result
            if self.failed():
                print(self.down_line(doing), flush=True)
            while True:  # a /health probe is cheaper than an MLflow call that fails after its own retries
                self.check_budget(unlogged)
                time.sleep(max(0.0, min(self.retry_s, self.down_since + self.budget_s - time.time())) + 0.01)
                if self.healthy():
                    break

    def counts(self) -> dict[str, float]:
        """Outages so far and the seconds they lasted (an outage still going counted to now), for Tune's results."""
        ongoing = time.time() - self.down_since if self.down_since is not None else 0.0
        return {"tracking_outages": self.outages, "tracking_down_s": round(self.down_s + ongoing, 1)}


@dataclass
class Outbox:
    """A trial's epochs on their way to its MLflow runs: logged in order, each exactly once, whenever the
    server answers. Entries are plain dicts ({"epoch", "metrics", "report"}), so a checkpoint can keep them."""

    client: MlflowClient
    server: Server
    queued: dict[str, list[dict]] = field(default_factory=dict)  # run id -> its unlogged epochs, oldest first
    logged: dict[str, int] = field(default_factory=dict)  # run id -> the last epoch it is known to hold
    unsure: set[str] = field(default_factory=set)  # runs a call failed for: ask them what they hold first
    checkpoints: dict[str, str] = field(default_factory=dict)  # run id -> the checkpoint URI to tag it with

    def track(self, run_id: str, logged: int, unlogged: list[dict] = ()) -> None:
        """Take a run whose last logged epoch is `logged`, with the epochs a checkpoint kept unlogged."""
        self.logged[run_id], self.queued[run_id] = logged, []
        for entry in unlogged:
            self.add(run_id, **entry)

    def add(self, run_id: str, epoch: int, metrics: dict, report: dict) -> None:
        """Queue an epoch, unless the run holds it already (a retried trial redoes the epoch it died in)."""
        queue = self.queued[run_id]
        if epoch > max([self.logged[run_id], *(e["epoch"] for e in queue)]):
            queue.append({"epoch": epoch, "metrics": metrics, "report": report})

    def checkpoint(self, run_id: str, uri: str) -> None:
        """Tag the run with its newest checkpoint once its epochs are logged (the latest URI wins)."""
        self.checkpoints[run_id] = uri

    def unlogged(self, run_id: str) -> list[dict]:
        return list(self.queued[run_id])

    def count(self) -> int:
        return sum(len(queue) for queue in self.queued.values())

    def describe(self) -> str:
        """What is still unlogged, in words: "epochs 4-9 unlogged, kept in its checkpoint (--resume logs them)"."""
        epochs = sorted({e["epoch"] for queue in self.queued.values() for e in queue})
        if not epochs:
            return "nothing unlogged"
        span = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
        return f"{span} unlogged, kept in its checkpoint (--resume logs them)"

    def flush(self, doing: str = "keeps training") -> bool:
        """Log what is queued, oldest first, if the server is due a call; True once nothing is left.

        The first call the server does not answer stops the flush: the rest waits for the next one. Says in one
        line when the server stops answering and when it answers again."""
        if not self.server.due():
            return False
        queued_before = self.count()
        done = all(self._flush_run(run_id) for run_id in list(self.queued))  # stops at the first failure
        if not done:
            if self.server.failed():
                print(self.server.down_line(f"{doing}, {epochs(self.count())} queued"), flush=True)
            return False
        seconds = self.server.answered()
        if seconds is not None:
            print(self.server.back_line(seconds, f"{epochs(queued_before)} logged"), flush=True)
        return True

    def drain(self, doing: str = "waits to log its last epochs") -> None:
        """Flush until nothing is left, waiting for the server within the outage budget."""
        while not self.flush(doing):
            self.server.check_budget(self.describe())
            time.sleep(max(0.0, self.server.retry_s - (time.monotonic() - self.server.last_try)))

    def _flush_run(self, run_id: str) -> bool:
        queue, call = self.queued[run_id], self.server.try_call
        if run_id in self.unsure:  # a failed log_batch may have landed all the same
            ok, logged = call(tracking.last_logged_epoch, self.client, run_id)
            if not ok:
                return False
            self.logged[run_id] = max(self.logged[run_id], logged)
            queue[:] = [e for e in queue if e["epoch"] > logged]
            self.unsure.discard(run_id)
        while queue:
            entry = queue[0]
            ok, _ = call(tracking.log_epoch, self.client, run_id, entry["epoch"], entry["metrics"], entry["report"])
            if not ok:
                self.unsure.add(run_id)
                return False
            self.logged[run_id] = queue.pop(0)["epoch"]
        if run_id in self.checkpoints:
            ok, _ = call(tracking.set_checkpoint, self.client, run_id, self.checkpoints[run_id])
            if not ok:
                return False
            del self.checkpoints[run_id]
        return True
