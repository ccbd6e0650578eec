"""A trial's MLflow runs behind one small interface: `RunRecorder`.

The trainable calls it at five moments: when the trial starts (`open`, then `resume` from a checkpoint),
after each epoch (`epoch`, which returns what Tune is told), once the epoch's checkpoint is stored
(`checkpoint`), once it has trained its last epoch (`finish`: each member's weights as LoggedModels,
`stawm.study.models`), and when the trial ends (leaving its `with` block: finished, stopped by Tune, or failed).
Each member of a trial (one per seed it trains) keeps its own run. Behind the interface: the outbox that rides out
a tracking server that does not answer (`stawm.study.outbox`), with its outage budget, and the verdict tags.

A member that stops on its own (its record's stop_reason: diverged, or its memory provably stuck) ends its run
FINISHED after that epoch, its models logged, tagged why and when (schema.STOP_REASON, STOP_EPOCH, STOP_MAX_ABS_W;
a stuck one's FINAL_ERROR says its final test error is the last one measured), and the other members go on. An exception
ends the open runs FAILED (Tune retries the trial); Tune stopping the trial (a scheduler's decision, raised as
SystemExit inside `tune.report`) ends them FINISHED, marked as stopped early (not the members that had stopped
on their own); Tune stopping it because the study was interrupted (the same SystemExit, once the study's parent run
is KILLED: `runner.Study.mark_killed`) ends them KILLED, for --resume to continue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import RunTag

from .. import schema
from ..config import Config
from ..model.stability import StabilityMonitor
from ..train.data import DataBundle
from . import models, outbox, tracking
from .context import TrialContext

UNLOGGED = "unlogged"  # in a member's saved state: the epochs its run did not hold yet (the outbox's)


@dataclass
class Member:
    """One member of a trial: its Config, its MLflow run, and what the trial keeps of it between epochs."""

    cfg: Config
    run_id: str
    resumed: bool  # the run existed: a retried or restored trial goes on in it
    state: dict  # its stability report, best test error, whether and why it stopped (saved in each checkpoint)
    open: bool = True  # its run is RUNNING
    models_logged: bool = False  # its LoggedModels are logged, or given up on (stawm.study.models)


class RunRecorder:
    """The MLflow runs of one trial's members, kept current through tracking-server outages."""

    def __init__(self, context: TrialContext, cfgs: list[Config], trial_id: str, trial_name: str,
                 placement: dict[str, str], down_since: float | None = None):
        """Open (or, for a retried trial, find again) one run per member. `down_since`: an outage an earlier
        attempt saw start (its checkpoint says since when): the budget is the trial's, not the attempt's."""
        outbox.bound_client_retries()
        self.server = outbox.Server(context.tracking_uri, context.outage_budget_s, f"trial {trial_name}")
        self.server.went_on(down_since)
        self.box = outbox.Outbox(MlflowClient(context.tracking_uri), self.server)
        self.parent_run_id = context.parent_run_id
        fused = len(cfgs) > 1
        self.members = [Member(cfg, *self.server.wait_call(
            tracking.open_trial_run, self.box.client, context, cfg, trial_id, trial_name, placement,
            k if fused else None, doing="waits to open its runs"),
            state={"stability": StabilityMonitor(cfg).report()})  # before any epoch: the static check
            for k, cfg in enumerate(cfgs)]
        self.last_epoch = 0
        self.folder: Path | None = None  # the trial's local checkpoint folder: its members' weights

    def resume(self, saved: dict | None, checkpoint_uri: str | None, folder: Path | None = None) -> None:
        """Take up the members' saved states and the epochs their runs do not hold yet; close the runs of
        members that stopped before the restart. folder: where the loop's checkpoint is (restored), for the
        members' models; None logs none."""
        self.folder = folder
        if saved is not None:
            self.last_epoch = saved["epoch"]
            for member, state in zip(self.members, saved["members"]):
                member.state = state
        for member in self.members:
            logged = (self.server.wait_call(tracking.last_logged_epoch, self.box.client, member.run_id,
                                            doing="waits to resume") if member.resumed else 0)
            self.box.track(member.run_id, logged, member.state.pop(UNLOGGED, []))
            if checkpoint_uri is not None:
                self.box.checkpoint(member.run_id, checkpoint_uri)
        self._close_stopped()

    @property
    def training(self) -> bool:
        """Whether any member still trains (all may have stopped before a restart)."""
        return any(member.open for member in self.members)

    def log_dataset(self, data: DataBundle) -> None:
        for member in self.members:
            self.server.wait_call(tracking.ensure_dataset, self.box.client, member.run_id, data,
                                  doing="waits to log its dataset")

    def epoch(self, records: list[dict | None]) -> dict:
        """One epoch of every member (None: stopped earlier) into its run; returns what Tune is told."""
        self.last_epoch = next(record["epoch"] for record in records if record is not None)
        results = [self._member_epoch(member, record) for member, record in zip(self.members, records)]
        self.box.flush()
        return {**tune_report(results, [member.cfg.seed for member in self.members]), **self.server.counts()}

    def saved_state(self) -> tuple[list[dict], float | None]:
        """What a checkpoint keeps: each member's state with its unlogged epochs, and since when the server is down."""
        return ([{**member.state, UNLOGGED: self.box.unlogged(member.run_id)} for member in self.members],
                self.server.down_since)

    def checkpoint(self, uri: str) -> None:
        """The epoch's checkpoint is stored: tag the open runs with it, close the runs of members that stopped,
        and fail the trial if the server has not answered past the budget (the checkpoint holds the rest)."""
        for member in self.members:
            if member.open:
                self.box.checkpoint(member.run_id, uri)
        self.box.flush()
        self._close_stopped()
        self.server.check_budget(self.box.describe())

    def finish(self) -> None:
        """The trial has trained its last epoch: log each open member's models, once its epochs are logged (both
        waiting for the server within the outage budget), while the checkpoint folder is still there."""
        self.box.drain()
        for member in self.members:
            if member.open:
                self._log_models(member, wait=True)

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is None:
            self.box.drain()
            for member in self.members:
                if member.open:
                    self.server.wait_call(self._close, member, "FINISHED", doing="waits to close its runs")
        elif issubclass(kind, SystemExit):  # Tune stopped the trial inside tune.report: not a failure
            # an interrupted study (Ctrl-C) marks its parent KILLED before Tune stops its trials: --resume goes on
            killed = self.server.down_since is None and self.server.try_call(
                tracking.study_killed, self.box.client, self.parent_run_id)[1]
            for member in self.members:  # a member that had stopped on its own was not stopped by Tune
                if killed:
                    self._close_now(member, "KILLED")
                else:
                    self._close_now(member, "FINISHED", stopped_early=self.last_epoch < member.cfg.epochs
                                    and not member.state.get("stopped"))
        else:
            for member in self.members:
                self._close_now(member, "FAILED")
        return False  # the exception, if any, goes on to Tune

    def _member_epoch(self, member: Member, record: dict | None) -> dict:
        """A member's epoch into the outbox (once) and its state; returns what Tune would see of it alone."""
        if record is None:  # stopped in an earlier epoch
            return stopped_metrics(member.state, member.cfg)
        metrics, member.state = member_epoch(record, member.state)
        self.box.add(member.run_id, self.last_epoch, metrics, record["stability"])
        return tune_metrics(metrics, record, member.cfg)

    def _close(self, member: Member, status: str, **kwargs) -> None:
        """End the member's run if it is still open, its verdict in the tags."""
        if member.open:
            if tags := stop_tags(member.state):  # before the close: a retried close logs them again, harmlessly
                self.box.client.log_batch(member.run_id, tags=tags)
            tracking.close_run(self.box.client, member.run_id, member.state["stability"], status, **kwargs)
            member.open = False

    def _close_now(self, member: Member, status: str, **kwargs) -> None:
        """Close the member's run on the way out: its queued epochs first, one try each and no wait. A server
        that does not answer leaves the run RUNNING, its epochs in the last checkpoint: a retry or --resume
        logs them, and the driver closes what stays open (`runner.finish_study`)."""
        if member.open and self.server.down_since is None and self.box.flush():
            self.server.try_call(self._close, member, status, **kwargs)

    def _close_stopped(self) -> None:
        """Close the runs of members that stopped (diverged or stuck) once their epochs and models are logged:
        FINISHED, their verdict and why they stopped in the tags. While the server does not answer they stay open,
        and close at a later epoch or the end."""
        for member in self.members:
            if (member.open and member.state.get("stopped") and self.box.flush()
                    and self._log_models(member, wait=False)):
                self.server.try_call(self._close, member, "FINISHED")

    def _log_models(self, member: Member, wait: bool) -> bool:
        """Log the member's models once (`models.log_member_models`), waiting for the server or trying once; True
        when done or given up on, False when the server did not answer (tried again later). Any other failure is
        one line, and the run closes without them: a model never fails a trial that trained."""
        if member.models_logged or self.folder is None:
            return True
        stop = member.state.get("stop", {})
        args = (self.box.client, member.run_id, member.cfg, self.folder, self.members.index(member),
                stop.get("epoch", self.last_epoch), member.state["stability"]["diverged"])
        try:
            if wait:
                self.server.wait_call(models.log_member_models, *args, doing="waits to log its models")
            elif not self.server.try_call(models.log_member_models, *args)[0]:
                return False
        except Exception as err:  # an error the server answered, a store refusing the artifacts, the budget spent
            print(f"{self.server.who}: the models of seed {member.cfg.seed} not logged ({type(err).__name__}: "
                  f"{' '.join(str(err).split())[:200]}); its run closes without them", flush=True)
        member.models_logged = True
        return True


# --- what Tune sees --------------------------------------------------------------------------------


def member_epoch(record: dict, member: dict) -> tuple[dict, dict]:
    """A member's epoch metrics (numeric fields + BEST_TEST_ERROR) and its state after the epoch: with a stop, why
    and when it stopped, and for a stuck one the errors it keeps reporting (`stopped_metrics`)."""
    metrics = {k: float(v) for k, v in record.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
    best = [v for v in (metrics.get(schema.TEST_ERROR, math.nan), member.get(schema.BEST_TEST_ERROR, math.nan))
            if math.isfinite(v)]
    if best:
        metrics[schema.BEST_TEST_ERROR] = min(best)
    reason = stop_reason(record)
    member = {"stability": record["stability"], "stopped": reason is not None,
              **{k: metrics[k] for k in (schema.BEST_TEST_ERROR,) if k in metrics}}
    if reason is not None:
        member["stop"] = {"reason": reason, "epoch": record["epoch"], "max_abs_w": record["max_abs_w"]}
    if reason == "stuck":
        member["last_measured"] = {k: metrics[k] for k in (*schema.ERROR_METRICS, schema.BEST_TEST_ERROR)
                                   if k in metrics}
    return metrics, member


def stop_reason(record: dict) -> str | None:
    """Why the member stopped after this record's epoch (the loop's stop_reason), or None."""
    return record.get("stop_reason") or ("diverged" if record["diverged"] else None)


def stop_tags(state: dict) -> list[RunTag]:
    """The tags of a member that stopped on its own, from its state: why, after which epoch, W's largest entry
    then, and for a stuck one that its final test error is the last measured; none for a member that goes on
    (or a state saved before stops had reasons)."""
    stop = state.get("stop")
    if stop is None:
        return []
    tags = [RunTag(schema.STOP_REASON, stop["reason"]), RunTag(schema.STOP_EPOCH, str(stop["epoch"])),
            RunTag(schema.STOP_MAX_ABS_W, str(stop["max_abs_w"]))]
    if stop["reason"] == "stuck":
        tags.append(RunTag(schema.FINAL_ERROR, schema.FINAL_ERROR_LAST_MEASURED))
    return tags


def stopped_metrics(state: dict, cfg: Config) -> dict:
    """What Tune sees of a member in the epochs after it stopped: a diverged one, an error of 1 (`tune_metrics`);
    a stuck one, its last measured errors (later epochs could only train its read-out on a constant input:
    stawm.conditions.provably_stuck), counted in the trial's mean as any other member's."""
    stop = state.get("stop", {"reason": "diverged"})  # a state saved before stops had reasons: it diverged
    stuck = stop["reason"] == "stuck"
    record = {"stability": state["stability"], "diverged": not stuck, "stop_reason": stop["reason"]}
    return tune_metrics(state.get("last_measured", {}) if stuck else {}, record, cfg)


def tune_metrics(metrics: dict, record: dict, cfg: Config) -> dict:
    """What Tune sees of one member: the numbers, the verdict, and an error of 1 for a diverged epoch.

    A diverged epoch has no evaluation. Searchers and schedulers need the metric, and must not prefer
    a region that diverges: counted as wrong on every image. MLflow keeps the honest record (no value).
    """
    report = record["stability"]
    result = {**metrics, "stability_ok": report["ok"], "stability_flags": ",".join(report["failed"]),
              "static_ok": report["static_ok"], "diverged": report["diverged"],
              "stuck": record.get("stop_reason") == "stuck"}
    if record["diverged"] and cfg.task != "draw":
        for key in schema.ERROR_METRICS if cfg.validation_size > 0 else schema.ERROR_METRICS[:1]:
            result.setdefault(key, 1.0)
    return result


def tune_report(results: list[dict], seeds: list[int]) -> dict:
    """What Tune sees of a trial, from what each member alone would report (`tune_metrics`).

    Each number every member has, averaged over the members, and with several members each error metric
    per seed beside it (`test_error_seed3`). A member that diverged counts as wrong on every image (error 1) in
    every later epoch, as its own trial would: averaged over the live members only, a configuration would look
    better as its seeds diverge. A member that stopped stuck keeps its last measured errors in the mean, as its
    own trial's last report would (`stopped_metrics`). The verdict holds for all: stable only if every member
    is, diverged once every member has.
    """
    numbers = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and all(k in r for r in results)]
    report = {k: sum(r[k] for r in results) / len(results) for k in numbers}
    for key in (k for k in schema.ERROR_METRICS if k in report and len(results) > 1):
        report.update({f"{key}_seed{seed}": r[key] for seed, r in zip(seeds, results)})
    flags = sorted({flag for r in results for flag in r["stability_flags"].split(",") if flag})
    return {**report, "stability_ok": all(r["stability_ok"] for r in results), "stability_flags": ",".join(flags),
            "static_ok": all(r["static_ok"] for r in results), "diverged": all(r["diverged"] for r in results),
            "members_diverged": sum(r["diverged"] for r in results), "members_stuck": sum(r["stuck"] for r in results)}
