"""A rule replayed on shipped results before it is trusted to act: on every run's per-epoch history
in an export folder (stawm-export), what would it have stopped, at which epoch, how many epochs would that have
saved, and where would it have been wrong?

    stawm-replay analysis/results/memory_rates analysis/results/glimpse_size

prints one Markdown table, a row per study (default: every folder under analysis/results holding a study.json);
--csv writes it, --runs-csv one row per run. --pruning replays a search's pruning instead (prune_replay.py).

A stopping rule (`StoppingRule`) reads one run's epoch record at a time: the run's configuration, overlaid by the
metrics it logged at that epoch (so `theta` is the learned rate where rates learn, the configured one where the
history has none), with `epoch`. The run stops after the first epoch where the rule says so. A stop is FALSE when
the run, as it was shipped (trained on to its last epoch), did not end with the outcome the rule claims, decided
by analysis/outcomes.py's own rule for that outcome. A study whose history lacks a metric the rule reads is
reported as not replayable, with why; so is a run missing it at an epoch the rule had to judge.

The rule here: `stuck`, stawm.conditions.provably_stuck (W = 0 through an epoch, theta = 0, ReLU6: the memory
can never be written again), which claims the run learns nothing (`no_learning`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from stawm import schema
from stawm.conditions import provably_stuck

from . import outcomes
from .source import ExportedStudy

RESULTS = Path("analysis/results")  # the shipped studies, from the repository's root
DRAWING_TASKS = ("draw", "sketchpad")  # the tasks whose model draws (STAWM.draws; selfsup's drawer is frozen, unused)


class NotReplayable(ValueError):
    """A study (or a run) lacks what a replay needs; the message says what."""


# --- per-epoch records ---------------------------------------------------------------------------------------

def per_epoch(study: ExportedStudy, metrics: tuple[str, ...]) -> pd.DataFrame:
    """One row per (run_id, epoch) at which the run logged its test error or any of `metrics`, one column per
    metric (NaN where it logged none). The epochs are the steps: 1 is the end of the first epoch."""
    wanted = list(dict.fromkeys((schema.TEST_ERROR, *metrics)))
    history = study.history(wanted)
    # a run resumed from a checkpoint may have logged an epoch twice: one value per epoch, the file's last
    wide = history.pivot_table(index=["run_id", "step"], columns="metric", values="value", aggfunc="last")
    wide = wide.reindex(columns=wanted)
    wide.columns.name, wide.index.names = None, ["run_id", "epoch"]
    return wide


def missing_metrics(study: ExportedStudy, metrics: tuple[str, ...]) -> list[str]:
    """The `metrics` that no run of the study logged at any epoch."""
    logged = set(study.history(list(metrics))["metric"])
    return [m for m in metrics if m not in logged]


# --- stopping rules --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoppingRule:
    """A rule that stops one run after an epoch, and the outcome it claims the run would have reached."""

    name: str
    needs: tuple[str, ...]  # the history metrics it cannot judge an epoch without
    # config fields a run's history may update each epoch (learned rates); the configured value where it has none
    updates: tuple[str, ...]
    stops: Callable[[Mapping], bool]  # one run's epoch record -> stop the run after this epoch
    claims: str  # the outcome a stop asserts, by outcomes.py's name
    happened: Callable[[pd.DataFrame], pd.Series]  # runs (final values, runs shape) -> the claimed outcome, bool


def memory_stuck(record: Mapping) -> bool:
    """The epoch record's memory can never be written again (stawm.conditions.provably_stuck)."""
    return provably_stuck(record["activation"], float(record["theta"]), float(record["max_abs_w"]),
                          draws=record["task"] in DRAWING_TASKS)


STUCK = StoppingRule("stuck", needs=("max_abs_w",), updates=("theta",), stops=memory_stuck, claims="no_learning",
                     happened=outcomes.no_learning)


def first_stop(config: Mapping, epochs: pd.DataFrame, rule: StoppingRule) -> tuple[float, str]:
    """(the epoch after which `rule` stops the run, NaN if never; "" or why it cannot be judged). `epochs`: the
    run's rows of `per_epoch`, indexed by epoch. A run missing a required metric at an epoch before the rule
    fires cannot be judged: that epoch might have stopped it."""
    for epoch, logged in epochs.sort_index().iterrows():
        absent = [m for m in rule.needs if pd.isna(logged.get(m))]
        if absent:
            return math.nan, f"no {absent[0]} at epoch {epoch}"
        if rule.stops({**config, **logged.dropna().to_dict(), "epoch": epoch}):
            return float(epoch), ""
    return math.nan, ""


RUN_COLUMNS = ["run_id", "epochs", "stop_epoch", "saved", "why", "claim_held", "false_stop"]  # replay_stops's


def replay_stops(study: ExportedStudy, rule: StoppingRule = STUCK) -> pd.DataFrame:
    """One row per run: run_id, epochs (its last logged), stop_epoch (NaN: never stopped), saved (epochs it would
    not have run), why (not "" when the run cannot be judged), the claimed outcome as it was shipped (`claim_held`)
    and false_stop. NotReplayable when no run logged a metric the rule needs."""
    absent = missing_metrics(study, rule.needs)
    if absent:
        raise NotReplayable(f"its history has no {', '.join(absent)}")
    epochs = per_epoch(study, rule.needs + rule.updates)
    held = pd.Series(rule.happened(study.runs).to_numpy(), index=study.runs["run_id"].to_numpy())
    rows = []
    for config in study.runs.to_dict("records"):
        run_id = config["run_id"]
        mine = epochs.loc[run_id] if run_id in epochs.index.get_level_values(0) else epochs.iloc[:0]
        stop, why = first_stop(config, mine, rule) if len(mine) else (math.nan, "no epoch logged")
        last = int(mine.index.max()) if len(mine) else 0
        stopped = not math.isnan(stop)
        rows.append(dict(run_id=run_id, epochs=last, stop_epoch=stop, saved=last - int(stop) if stopped else 0,
                         why=why, claim_held=bool(held[run_id]), false_stop=stopped and not bool(held[run_id])))
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def stop_summary(study: str, runs: pd.DataFrame) -> dict:
    """One study's row of the table from `replay_stops`: epochs count every run's, saved ones only the judged."""
    stopped = runs[runs["stop_epoch"].notna()]
    spent = int(runs["epochs"].sum())
    at = stopped["stop_epoch"].astype(int).value_counts().sort_index()
    return {"study": study, "runs": len(runs), "not_judged": int((runs["why"] != "").sum()), "stopped": len(stopped),
            "stop_epochs": "; ".join(f"epoch {e}: {n}" for e, n in at.items()) or "—", "epochs_run": spent,
            "epochs_saved": int(stopped["saved"].sum()),
            "saved_pct": 100 * stopped["saved"].sum() / spent if spent else math.nan,
            "false_stops": int(stopped["false_stop"].sum()), "why_not": ""}


def not_replayable_row(study: str, runs: int, why: str) -> dict:
    """A study's row when the rule cannot be replayed on it at all."""
    return {"study": study, "runs": runs, "not_judged": runs, "stopped": math.nan, "stop_epochs": "",
            "epochs_run": math.nan, "epochs_saved": math.nan, "saved_pct": math.nan, "false_stops": math.nan,
            "why_not": why}


def replay_studies(folders: list[Path], rule: StoppingRule = STUCK) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the table: one row per study; every run's row of `replay_stops`, with its study)."""
    table, per_run = [], []
    for folder in folders:
        study = ExportedStudy(folder)
        name = study.info.study
        try:
            runs = replay_stops(study, rule)
            table.append(stop_summary(name, runs))
        except NotReplayable as why:
            table.append(not_replayable_row(name, len(study.runs), str(why)))
            runs = pd.DataFrame({"run_id": study.runs["run_id"], "why": f"not replayable: {why}"})
        per_run.append(runs.assign(study=name))
    per_run = pd.concat(per_run, ignore_index=True) if per_run else pd.DataFrame()
    return pd.DataFrame(table), per_run.reindex(columns=["study", *RUN_COLUMNS])


def stops_markdown(table: pd.DataFrame, rule: StoppingRule = STUCK) -> str:
    """The table from `replay_studies` in Markdown, with its caption."""
    rows = []
    for row in table.to_dict("records"):
        if row["why_not"]:
            rows.append([row["study"], f"{row['runs']:,}", f"not replayable: {row['why_not']}", "—", "—", "—", "—"])
            continue
        judged = f" ({row['not_judged']} not judged)" if row["not_judged"] else ""
        rows.append([row["study"], f"{row['runs']:,}{judged}", whole(row["stopped"]), row["stop_epochs"],
                     whole(row["epochs_run"]), f"{whole(row['epochs_saved'])} ({row['saved_pct']:.1f}%)",
                     whole(row["false_stops"])])
    caption = (f"Table: the rule `{rule.name}` replayed on each run's logged epochs; a run stops after the first "
               f"epoch it fires. Epochs run: every run's, as shipped; saved: the epochs after a stop. A false stop "
               f"is a stopped run that, trained on to its last epoch, did not end {rule.claims} "
               f"(analysis/outcomes.py's rule). A run missing {', '.join(rule.needs)} at an epoch the rule had "
               f"to judge is not judged.")
    header = ["study", "runs", "stopped", "at", "epochs run", "epochs saved", "false stops"]
    return caption + "\n\n" + markdown(header, rows, numeric=(1, 2, 4, 5, 6))


# --- output --------------------------------------------------------------------------------------------------

def markdown(header: list[str], rows: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    """A Markdown table of text cells; the `numeric` columns right-aligned."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    rule = ["---:" if j in numeric else "---" for j in range(len(header))]
    return "\n".join([line(header), line(rule), *map(line, rows)]) + "\n"


def whole(count: float) -> str:
    """A count as text with thousands separators (the table's counts are floats: NaN where not replayable)."""
    return f"{int(count):,}"
