"""The study's console (stawm.study.progress): the progress line's counts and time left, worked out by hand, on real
Tune `Trial` objects; its plain lines (no terminal) and its line redrawn in place (a terminal); the event lines of a
trial's end, retry, failure and tracking outage, from a tiny real Tuner; and the console of the session's quick study.

The plan of the hand-worked numbers (`hand_plan`): 4 trials, 2 at once, 2 epochs of 0.92 s, a 10 s start. A trial takes
2 x 0.92 / (1 - 0.08) + 2 = 4 s (plan.OUTSIDE_STEPS, plan.RAY_S_PER_TRIAL), so the plan's wall time is 10 + 2 waves x
4 = 18 s, of which S = 10 s is the start: the plan's clock when k of the 4 trials have ended is E(k) = 10 + 8 k / 4.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import tempfile
import time

import pytest
import ray
from ray import cloudpickle, tune
from ray.tune.experiment import Trial

from stawm.study import progress, runner
from stawm.study.context import TrialContext
from stawm.study.plan import Plan


def hand_plan(**changes) -> Plan:
    plan = Plan(study="t", configurations=2, seeds=2, fused=False, stages=(4,), done=0, epochs=2, epoch_s=0.92,
                epoch_source="by hand", start_s=10.0, start_source="by hand", concurrency=2, concurrency_why="by hand",
                share=1.0, device="CPU core")
    return dataclasses.replace(plan, **changes)


def hand_study(plan: Plan | None, elapsed: float = 0.0, swept: tuple = ("glimpse_size",)) -> runner.Study:
    """A started study as start_study makes it, `elapsed` seconds ago."""
    context = TrialContext(study="t", experiment_id="1", parent_run_id="p", tracking_uri="sqlite:///unused.db",
                           base_config={"glimpse_size": 8, "seed": 0}, swept=swept)
    return runner.Study(context, plan, started=time.monotonic() - elapsed)


def trials(*statuses: str, start: int = 0) -> list[Trial]:
    """Real Tune trials (stubs: no trainable registered), glimpse size 6 then 8, seed 0 then 1, in Tune's order."""
    made = []
    for i, status in enumerate(statuses, start):
        trial = Trial("trainable", config={"glimpse_size": (6, 8)[i % 2], "seed": i // 2}, trial_id=f"ab12c_{i:05d}",
                      stub=True)
        trial.set_status(status)
        made.append(trial)
    return made


RESULT = {"test_error": 0.9040, "stability_ok": True, "tracking_outages": 0, "tracking_down_s": 0.0}


# --- the time left, by hand -------------------------------------------------------------------------------------

def test_the_hand_plan_is_what_the_docstring_works_out():
    plan = hand_plan()
    assert plan.trial_s == pytest.approx(4.0) and plan.wall_s == pytest.approx(18.0) and plan.waves == (2,)


@pytest.mark.parametrize("ended, elapsed, left", [
    (0, 5.0, 13.0),  # no trial ended yet: what the plan has left, 18 - 5
    (0, 20.0, 0.0),  # past the plan before any trial ended
    (1, 12.0, 6.0),  # E(1) = 12: on the plan's pace, (18 - 12) x 12 / 12
    (2, 21.0, 6.0),  # E(2) = 14: 1.5 x the plan's pace, (18 - 14) x 21 / 14
    (3, 14.0, 1.75),  # E(3) = 16: faster than the plan, (18 - 16) x 14 / 16
    (4, 30.0, 0.0),  # every trial ended
])
def test_time_left_is_the_plan_set_against_the_pace_so_far(ended, elapsed, left):
    assert progress.time_left(hand_plan(), ended, elapsed) == pytest.approx(left)


def test_time_left_of_a_resumed_study_and_of_one_in_two_stages():
    # resumed with 2 of its 4 trials done: 2 to run, 1 wave, wall 10 + 4 = 14; E(1) = 10 + 4 x 1 / 2 = 12
    assert progress.time_left(hand_plan(done=2), 1, 16.0) == pytest.approx((14 - 12) * 16 / 12)
    # two stages of 2 trials (table1), each its own start: wall 2 x (10 + 4) = 28, of which S = 20 is the starts;
    # E(2) = 20 + 8 x 2 / 4 = 24
    assert progress.time_left(hand_plan(stages=(2, 2)), 2, 21.0) == pytest.approx((28 - 24) * 21 / 24)


# --- the progress line ---------------------------------------------------------------------------------------------

def test_the_progress_line_counts_tunes_trials_and_those_not_made_yet():
    # the searcher has made 3 of the plan's 4 trials: the 4th is pending too
    made = trials(Trial.TERMINATED, Trial.RUNNING, Trial.PENDING)
    line = progress.Progress(live=False, study=hand_study(hand_plan(), elapsed=5.0)).line(made)
    assert line == "t: 1/4 done, 1 running, 2 pending, 0 failed | 0:05 elapsed, ~0:13 left"
    # the hook of a trial's end comes before Tune sets its status: the line counts it as it ends
    line = progress.Progress(live=False, study=hand_study(hand_plan(), elapsed=5.0)).line(made, made[1], Trial.ERROR)
    assert line.startswith("t: 1/4 done, 0 running, 2 pending, 1 failed | ")


def test_the_time_left_follows_the_trials_that_ended(capsys):
    made = trials(Trial.RUNNING, Trial.RUNNING, Trial.PENDING, Trial.PENDING)
    watch = progress.Progress(live=False, study=hand_study(hand_plan(), elapsed=21.0))
    for trial in made[:2]:
        trial.update_last_result(RESULT)
        watch.on_trial_complete(0, made, trial)
        trial.set_status(Trial.TERMINATED)
    assert watch.line(made) == "t: 2/4 done, 0 running, 2 pending, 0 failed | 0:21 elapsed, ~0:06 left"
    past = progress.Progress(live=False, study=hand_study(hand_plan(), elapsed=20.0))
    assert past.line(made[2:]).endswith("| 0:20 elapsed, past the plan's ~0:18")
    finished = progress.Progress(live=False, study=hand_study(hand_plan(), elapsed=30.0))
    assert finished.line(trials(*[Trial.TERMINATED] * 4)) == (
        "t: 4/4 done, 0 running, 0 pending, 0 failed | 0:30 elapsed")  # all ended: nothing left to say
    assert progress.Progress(live=False, study=hand_study(None, 75.0)).line(made[:2]) == (
        "t: 2/2 done, 0 running, 0 pending, 0 failed | 1:15 elapsed")  # no plan: no time left


def test_without_a_terminal_the_line_is_plain_at_the_start_every_so_often_and_at_the_end(capsys):
    made = trials(Trial.RUNNING, Trial.RUNNING, Trial.PENDING, Trial.PENDING)
    watch = progress.Progress(live=False, study=hand_study(hand_plan(), elapsed=6.0))
    watch.setup()
    watch.on_step_end(1, made)  # the first step: a line
    watch.on_trial_start(1, made, made[0])
    watch.on_step_end(2, made)  # within PLAIN_EVERY_S: none
    made[0].update_last_result(RESULT)
    watch.on_trial_complete(3, made, made[0])  # its own line, no progress line after it
    made[0].set_status(Trial.TERMINATED)
    watch.shown -= progress.PLAIN_EVERY_S  # a minute on
    watch.on_step_end(4, made)
    for trial in made[1:]:
        trial.set_status(Trial.TERMINATED)
    watch.on_step_end(5, made)  # every trial ended: the last line at once (before Tune's own lines at its end)
    watch.on_experiment_end(made)  # and not again
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out
    assert out.splitlines() == [
        "t: 0/4 done, 2 running, 2 pending, 0 failed | 0:06 elapsed, ~0:12 left",
        "ended  ab12c_00000  glimpse_size=6 seed=0  test_error=0.9040  conditions met",
        "t: 1/4 done, 1 running, 2 pending, 0 failed | 0:06 elapsed, ~0:03 left",  # E(1) = 12: (18 - 12) x 6 / 12
        "t: 4/4 done, 0 running, 0 pending, 0 failed | 0:06 elapsed"]


def test_on_a_terminal_the_line_is_redrawn_in_place_and_an_event_goes_above_it(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the line is cut to the terminal's width
    made = trials(Trial.RUNNING, Trial.PENDING)
    watch = progress.Progress(live=True, study=hand_study(None, 5.0))
    watch.setup()
    watch.on_step_end(1, made)
    made[0].update_last_result({**RESULT, "stability_ok": False, "stability_flags": "eta>1"})
    watch.on_trial_complete(2, made, made[0])
    made[0].set_status(Trial.TERMINATED)
    watch.on_experiment_end(made)
    clear = "\r\x1b[K"
    assert capsys.readouterr().out == (
        f"{clear}t: 0/2 done, 1 running, 1 pending, 0 failed | 0:05 elapsed"
        f"{clear}ended  ab12c_00000  glimpse_size=6 seed=0  test_error=0.9040  FLAGGED: eta>1\n"
        f"{clear}t: 1/2 done, 0 running, 1 pending, 0 failed | 0:05 elapsed"
        f"{clear}t: 1/2 done, 0 running, 1 pending, 0 failed | 0:05 elapsed\n")


def test_a_tracking_outage_a_trial_reports_is_one_line_per_outage(capsys):
    made = trials(Trial.RUNNING)
    watch = progress.Progress(live=False, study=hand_study(None))
    watch.on_trial_result(1, made, made[0], {**RESULT, "tracking_outages": 1, "tracking_down_s": 35.2})
    watch.on_trial_result(2, made, made[0], {**RESULT, "tracking_outages": 1, "tracking_down_s": 41.0})  # the same
    watch.on_trial_result(3, made, made[0], {**RESULT, "tracking_outages": 2, "tracking_down_s": 50.0})
    assert capsys.readouterr().out.splitlines() == [
        "outage ab12c_00000  glimpse_size=6 seed=0  the tracking server stopped answering (1 outage so far, 35 s "
        "down); the trial trains on, its epochs queued",
        "outage ab12c_00000  glimpse_size=6 seed=0  the tracking server stopped answering (2 outages so far, 50 s "
        "down); the trial trains on, its epochs queued"]


def test_a_study_of_two_tuners_counts_on_across_them(capsys, monkeypatch):
    # table1: stage 1's Tuner, then stage 2's, each with run_config's Progress, both under the study start_study follows
    monkeypatch.setattr(progress, "_followed", None)
    progress.follow(hand_study(hand_plan(stages=(2, 2)), elapsed=21.0))
    first, second = progress.Progress(live=False), progress.Progress(live=False)
    stage1 = trials(Trial.RUNNING, Trial.RUNNING)
    first.setup()
    for trial in stage1:
        trial.update_last_result(RESULT)
        first.on_trial_complete(0, stage1, trial)
        trial.set_status(Trial.TERMINATED)
    first.on_experiment_end(stage1)
    second.setup()
    stage2 = trials(Trial.PENDING, Trial.PENDING, start=2)
    assert second.line(stage2) == "t: 2/4 done, 0 running, 2 pending, 0 failed | 0:21 elapsed, ~0:04 left"  # 3.5


def test_tune_pickles_the_callback_without_its_study(monkeypatch):
    # Tune saves its RunConfig (tuner.pkl); a --resume unpickles it and the callback counts for the study followed now
    monkeypatch.setattr(progress, "_followed", None)
    saved = progress.Progress(live=False, study=hand_study(hand_plan()))
    restored = cloudpickle.loads(cloudpickle.dumps(saved))
    assert restored.followed is None and restored.live is False
    now = hand_study(hand_plan(done=2))
    progress.follow(now)
    restored.setup()
    assert restored.followed.study is now


# --- a tiny real Tuner: a trial's end, retry, failure and outage -------------------------------------------------

def flaky(config: dict) -> None:
    """'retried' fails once after its first epoch and ends on its retry; 'failed' fails every time; 'outage' reports
    a tracking outage and ends."""
    if config["kind"] == "failed":
        raise RuntimeError("the disk is full")
    if config["kind"] == "retried" and tune.get_checkpoint() is None:
        folder = tempfile.mkdtemp()
        tune.report(RESULT, checkpoint=tune.Checkpoint.from_directory(folder))
        raise RuntimeError("the node was lost")
    tune.report({**RESULT, "tracking_outages": int(config["kind"] == "outage"), "tracking_down_s": 3.0})


@pytest.mark.slow
def test_a_tiny_tuner_prints_each_event_once(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "0")  # as runner._connect_ray sets it: Tune's console silent at verbose=0
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    ray.init(address="local", num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="rp"))
    try:
        study = hand_study(hand_plan(stages=(3,)), swept=("kind",))
        space = {"kind": tune.grid_search(["retried", "failed", "outage"])}
        run_config = tune.RunConfig(storage_path=str(tmp_path), failure_config=tune.FailureConfig(max_failures=1),
                                    callbacks=[progress.Progress(live=False, study=study)], verbose=0)
        tune.Tuner(flaky, param_space=space, run_config=run_config).fit()
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    lines = capsys.readouterr().out.splitlines()
    events = sorted((line.split()[0], re.search(r"kind=\w+", line).group()) for line in lines
                    if line.split()[:1] in (["ended"], ["retry"], ["ERROR"], ["outage"]))
    assert events == [("ERROR", "kind=failed"), ("ended", "kind=outage"), ("ended", "kind=retried"),
                      ("outage", "kind=outage"), ("retry", "kind=failed"), ("retry", "kind=retried")], lines
    (failed,) = [line for line in lines if line.startswith("ERROR")]
    assert failed.endswith("failed 2 times, not retried again: RuntimeError: the disk is full")
    (retried,) = [line for line in lines if line.startswith("retry") and "kind=retried" in line]
    assert retried.endswith("attempt 1 of 2 failed: RuntimeError: the node was lost; retried from its last checkpoint")
    (again,) = [line for line in lines if line.startswith("retry") and "kind=failed" in line]
    assert again.endswith("attempt 1 of 2 failed: RuntimeError: the disk is full; retried from the start "
                          "(no checkpoint yet)")
    assert lines[-1].startswith("t: 2/3 done, 0 running, 0 pending, 1 failed | ")
    assert not any("│" in line or "Trial status" in line for line in lines)  # Tune's own console stayed quiet


# --- the quick study's console -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_quick_study_console_is_short_and_says_what_happened(glimpse_size_study):
    # the shared session run: studies/glimpse_size.py --quick --epochs 2 --set max_steps=3 (see conftest), stdout
    # and stderr to files (no terminal): plain progress lines
    out = glimpse_size_study["stdout"]
    err = (glimpse_size_study["tmp"] / "stderr").read_text(errors="replace")
    lines = out.splitlines()
    assert not [line for line in lines if line.startswith(("│", "├", "╭", "╰", "Trial "))]  # no Tune tables
    assert "Checkpoint successfully created" not in out + err and "tensorboard" not in (out + err).lower()
    assert "Started a local Ray instance" in err  # Ray's own start line stays (quick_studies waits for it)
    summary = lines.index("t: 4 trials")
    progress_lines = [i for i, line in enumerate(lines) if line.startswith("t: ") and "/4 done, " in line]
    assert lines[progress_lines[0]].startswith("t: 0/4 done, 0 running, 4 pending, 0 failed | ")
    assert lines[progress_lines[-1]].startswith("t: 4/4 done, 0 running, 0 pending, 0 failed | ")
    ended = [line for line in lines[:summary] if line.startswith("ended  ")]
    assert len(ended) == 4 and all(" conditions met" in line and "test_error=0." in line for line in ended)
    assert progress_lines[-1] < summary and len(lines) < 40, out
