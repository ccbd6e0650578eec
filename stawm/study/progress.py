"""The study's console while its trials run: one progress line, and one line per event that matters.

A study prints its plan (`runner.plan`), then what `Progress`, a Ray Tune callback (`runner.run_config`), prints:
- one progress line: trials done, running, pending and failed, the time since the study started and the time left;
- a line when a trial ends (its result), fails and is retried, fails for good, or reports that the tracking server
  stopped answering (its report's `tracking_outages`, `outbox.Server.counts`);
then the closing summary (`runner.finish_study`). Tune's status tables and Ray's line per checkpoint appear only with
--verbose (`runner.run_config`, `runner._connect_ray`, `quiet_worker`); Ray's log files keep them either way.

On a terminal the progress line is redrawn in place. Where stdout is no terminal (`ray job logs`, a file, a pipe), and
with --verbose (Tune's tables come between), it is a plain line instead: once the trials start, every PLAIN_EVERY_S,
and once the last trial has ended. Not one per trial end: a trial's end has its own line already; the timed line is
the heartbeat between them, since a trial of hundreds of epochs runs for hours without ending (once a minute keeps a
12-hour study's log to 720 of them).

The time left (`time_left`) is the plan's wall time W set against the pace so far. The plan's clock when k of the n
trials this launch runs have ended is E(k) = S + (W - S) k / n, where S is the plan's Tuner starts (its wall time
less its waves of trials); the study runs at elapsed / E(k) of the plan's pace, so what is left is
(W - E(k)) elapsed / E(k). Before any trial ends it is what the plan has left, W - elapsed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from .. import schema

PLAIN_EVERY_S = 60.0  # without a terminal: a progress line this often (and once the trials start, and at the end)
LIVE_EVERY_S = 1.0  # on a terminal: the line is redrawn at least this often, so that its clock runs
CHECKPOINT_LOGGER = "ray.train._internal.storage"  # logs "Checkpoint successfully created at: ..." at INFO


def quiet_worker() -> None:
    """Ray's line per checkpoint off in a worker process: its runtime_env's `worker_process_setup_hook`, unless
    --verbose (`runner._connect_ray`). The line is INFO of Ray's storage logger in the trial's worker, forwarded to
    the driver's console with everything the worker prints; only that logger is quieted, so the trial's own lines
    (a tracking outage, a GPU it cannot see) still reach the console."""
    logging.getLogger(CHECKPOINT_LOGGER).setLevel(logging.WARNING)


# --- which study the Tuners of this process run -----------------------------------------------------------------


@dataclass
class Followed:
    """The study whose trials the `Progress` of this process's next Tuners counts, and what its earlier Tuners (in
    this process: table1 runs two) left behind."""

    study: Any  # a runner.Study (runner imports this module): name, plan, started, context
    ended: int = 0  # trials that ended during this launch, in all its Tuners so far: the time left counts them
    trials_before: int = 0  # trials of its earlier Tuners, and of those how many finished or failed
    done_before: int = 0
    failed_before: int = 0


# A module's global, as the study files call run_config(args) without their study (their Tuner stays as Tune's examples
# write it): a process runs one study at a time, and start_study names it here (`follow`).
_followed: Followed | None = None


def follow(study) -> None:
    """From now on, `Progress` counts the trials of `study` (runner.start_study's, the last one started in this
    process): a study file builds its RunConfig right after start_study, and a restored Tuner's Progress, unpickled
    from the study's first launch, is bound here too."""
    global _followed
    _followed = Followed(study)


# --- the callback ----------------------------------------------------------------------------------------------


class Progress(tune.Callback):
    """The progress line and the event lines of a Tuner's trials (this module's docstring). `live`: redraw the line in
    place (default: when stdout is a terminal; a study passes False with --verbose, where Tune's tables come
    between); `study`: a runner.Study to count for (default: the one `follow` names when the Tuner starts)."""

    def __init__(self, *, live: bool | None = None, study=None, every_s: float = PLAIN_EVERY_S):
        self.live, self.every_s = live, every_s
        self._bind(study)

    def _bind(self, study) -> None:
        self.followed = Followed(study) if study is not None else None
        self.outages: dict[str, int] = {}  # trial id -> the tracking outages it last reported
        self.shown = -math.inf  # time.monotonic() of the last progress line
        self.drawn = False  # a live line is on the screen, without its newline
        self.closed = False  # the last line is out: every trial the study runs has ended
        self.stopping = False  # the study was interrupted, and this Tuner is told to stop

    def __getstate__(self) -> dict:  # Tune pickles its RunConfig (tuner.pkl): the settings, not the study
        return {"live": self.live, "every_s": self.every_s}

    def __setstate__(self, state: dict) -> None:
        self.live, self.every_s = state["live"], state["every_s"]
        self._bind(None)

    # Tune's hooks

    def setup(self, **info):
        if self.followed is None:
            self.followed = _followed or Followed(None)
        if self.live is None:
            self.live = sys.stdout.isatty()

    def on_step_end(self, iteration: int, trials: list, **info):
        study = self.followed.study
        # Ctrl-C: `runner._catch_interrupts`
        if study is not None and getattr(study, "interrupted", 0) and not self.stopping:
            self.stopping = True
            study.stopped |= {t.trial_id for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR)}
            study.mark_killed()  # first: the trials Tune stops see it
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own stop, as on Ctrl-C: its state saved, then its trials
        counts = self.counts(trials)
        if self.closed:
            return
        if counts["total"] and counts["left"] == 0:  # every trial ended: the last line now, before Tune's own
            self._close(trials)
        elif time.monotonic() - self.shown >= (LIVE_EVERY_S if self.live else self.every_s):
            self._show(trials)

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        if self.live:
            self._show(trials)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        outages, seen = int(result.get("tracking_outages", 0)), self.outages.get(trial.trial_id, 0)
        self.outages[trial.trial_id] = outages  # fewer than seen: a retried attempt counts afresh
        if outages > seen:
            self._event(trials, f"outage {self._label(trial)}  the tracking server stopped answering "
                                f"({_count(outages, 'outage')} so far, {result.get('tracking_down_s', 0):.0f} s down);"
                                " the trial trains on, its epochs queued")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        self._ended()
        self._event(trials, f"ended  {self._label(trial)}  {result_words(trial.last_result)}",
                    trial, Trial.TERMINATED)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info):
        attempts = "" if trial.max_failures < 0 else f" of {trial.max_failures + 1}"
        where = "its last checkpoint" if trial.checkpoint is not None else "the start (no checkpoint yet)"
        self._event(trials, f"retry  {self._label(trial)}  attempt {trial.num_failures}{attempts} failed: "
                            f"{last_error_line(trial)}; retried from {where}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self._ended()
        self._event(trials, f"ERROR  {self._label(trial)}  failed {_count(trial.num_failures, 'time')}, not retried"
                            f" again: {last_error_line(trial)}", trial, Trial.ERROR)

    def on_experiment_end(self, trials: list, **info):
        if self.stopping:  # interrupted: Tune has marked its stopped trials TERMINATED, so no last count
            if self.drawn:
                print(flush=True)
                self.drawn = False
            self.closed = True
        elif not self.closed:  # trials left: a stage of a study that runs several (table1), or a study stopped
            self._close(trials)
        followed, counts = self.followed, tally(trials)
        followed.trials_before += len(trials)
        followed.done_before += counts["done"]
        followed.failed_before += counts["failed"]

    # the lines

    def _ended(self) -> None:
        self.followed.ended += 1

    def _event(self, trials: list, line: str, trial=None, status: str | None = None) -> None:
        """An event's line; on a terminal the progress line, cleared for it, is drawn again under it."""
        if self.drawn:
            sys.stdout.write("\r\x1b[K")
            self.drawn = False
        print(line, flush=True)
        if self.live and not self.closed:
            self._show(trials, trial, status)

    def _close(self, trials: list) -> None:
        self._show(trials)
        if self.drawn:
            print(flush=True)
            self.drawn = False
        self.closed = True

    def _show(self, trials: list, trial=None, status: str | None = None) -> None:
        line = self.line(trials, trial, status)
        if self.live:  # in place, cut to the terminal's width: a wrapped line is not redrawn by "\r"
            width = shutil.get_terminal_size().columns - 1
            sys.stdout.write("\r\x1b[K" + line[:width])
            sys.stdout.flush()
            self.drawn = True
        else:
            print(line, flush=True)
        self.shown = time.monotonic()

    def line(self, trials: list, trial=None, status: str | None = None) -> str:
        """The progress line for Tune's `trials` (`trial` counted as `status`: Tune calls the hooks of a trial's end
        before it sets the trial's status): 't: 2/4 done, 2 running, 0 pending, 0 failed | 0:21 elapsed, ~0:06
        left' (trials; the time since the study started, and the time left)."""
        study, n = self.followed.study, self.counts(trials, trial, status)
        name = study.name if study is not None else "study"
        text = (f"{name}: {n['done']}/{n['total']} done, {n['running']} running, {n['pending']} pending, "
                f"{n['failed']} failed")
        if study is None:
            return text
        elapsed, plan = time.monotonic() - study.started, study.plan
        text += f" | {clock(elapsed)} elapsed"
        if plan is None or n["left"] == 0:
            return text
        left = time_left(plan, self.followed.ended, elapsed)
        if left == 0:  # before any trial ended
            return f"{text}, past the plan's ~{clock(plan.wall_s)}"
        return f"{text}, ~{clock(left)} left"

    def counts(self, trials: list, trial=None, status: str | None = None) -> dict[str, int]:
        """The study's trials, its earlier Tuners' too: done, running, pending, failed, in all (`total`: the plan's,
        or as many as Tune has made if more) and `left` to end."""
        followed, made = self.followed, tally(trials, trial, status)
        plan = followed.study.plan if followed.study is not None else None
        total = max(plan.trials if plan is not None else 0, followed.trials_before + len(trials))
        done, failed = followed.done_before + made["done"], followed.failed_before + made["failed"]
        return {"done": done, "running": made["running"], "pending": total - done - failed - made["running"],
                "failed": failed, "total": total, "left": total - done - failed}

    def _label(self, trial) -> str:
        """'311c6_00000  glimpse_size=8 seed=1': Tune's trial id and the trial's run name, as the summary shows them."""
        study = self.followed.study
        if study is None:
            return trial.trial_id
        from . import tracking  # here, not on import: the worker hook (`quiet_worker`) need not load MLflow and torch
        from .trial import member_seeds

        context, config = study.context, trial.config
        values = {**context.base_config, **config, **config.get("variant", {}),
                  "seed": ",".join(map(str, member_seeds(config, context)))}
        return f"{trial.trial_id}  {tracking.run_name(values, list(context.swept))}"


# --- what the lines say -----------------------------------------------------------------------------------------


def tally(trials: list, trial=None, status: str | None = None) -> dict[str, int]:
    """Tune's trials by what the progress line says of them: done (TERMINATED), running, failed (ERROR); `trial`
    counted as `status`. Pending and paused trials are the rest."""
    statuses = [status if t is trial and status else t.status for t in trials]
    return {"done": statuses.count(Trial.TERMINATED), "running": statuses.count(Trial.RUNNING),
            "failed": statuses.count(Trial.ERROR)}


def time_left(plan, ended: int, elapsed: float) -> float:
    """Seconds left of a study `elapsed` seconds in, once `ended` of the trials its `plan` runs have ended: the plan's
    wall time set against the pace so far (this module's docstring); 0 once past the plan before any trial ended."""
    trials, wall = plan.left, plan.wall_s
    if ended >= trials:
        return 0.0
    starts = wall - sum(plan.waves) * plan.trial_s  # its Tuners' starts: a stage's start does not scale with trials
    expected = starts + (wall - starts) * ended / trials  # E(k): the plan's clock when `ended` trials have ended
    if ended == 0 or expected <= 0:
        return max(0.0, wall - elapsed)
    return (wall - expected) * elapsed / expected


def result_words(metrics: dict) -> str:
    """A trial's last result as the summary says it: its errors (or 'diverged') and whether it met the conditions."""
    scores = ("diverged" if metrics.get("diverged") else
              "  ".join(f"{k}={metrics[k]:.4f}" for k in (schema.TEST_ERROR, schema.VAL_ERROR, schema.TEST_RECON_LOSS)
                        if k in metrics))
    verdict = ("conditions met" if metrics.get("stability_ok", True)
               else f"FLAGGED: {metrics.get('stability_flags', '')}")
    return f"{scores or 'no result'}  {verdict}"


def last_error_line(trial) -> str:
    """The last line of the trial's newest error, from the error file Tune writes beside its results."""
    try:
        with open(trial.error_file) as text:
            lines = [line.strip() for line in text if line.strip()]
    except (OSError, TypeError, AttributeError):  # no file, no path, no storage: never a study stopped over a line
        return "(no error text)"
    return lines[-1] if lines else "(no error text)"


def clock(seconds: float) -> str:
    """A duration as a clock: 0:07, 12:05, 1:02:03."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"
