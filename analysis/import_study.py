"""A shipped study back into an MLflow store: the inverse of stawm-export, so that it can be extended.

    stawm-import analysis/results/NAME --tracking-uri sqlite:///runs/mlflow.db
    python studies/NAME.py --seeds 5 --resume --tracking-uri sqlite:///runs/mlflow.db ...   # its flags
    stawm-export --study NAME --tracking-uri sqlite:///runs/mlflow.db --out analysis/results/NAME

Why: a study's store stays on the machine that ran it; the shipped folder is what travels. Importing it
rebuilds the study as the runner laid it out (`stawm.schema`): the experiment, its parent run with the first
launch's params and command line, and one finished trial run per row of runs.csv, with its params, tags,
per-epoch metrics and stability report. A study resumed there with more --seeds then trains only the seeds
it lacks, beside the imported ones, and a new export ships them all.

What cannot come back: run ids (MLflow makes new ones; each run's tag `stawm.imported_from` keeps the
shipped id), metric timestamps (every epoch gets the run's end time), the dataset input and the checkpoint
(neither is shipped). The import refuses a store that already holds an experiment of the study's name.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import tyro
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from stawm import schema
from stawm.config import field_types
from stawm.flags import Group, TrackingFlags, default_tracking_uri, flat, parse
from stawm.provenance import command_line, redact

from . import store
from .source import HISTORY, RUNS, STABILITY, STUDY

IMPORTED_FROM = "stawm.imported_from"  # a trial run's id in the shipped folder it was imported from
BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics per call


class ImportRefused(ValueError):
    """The folder is no exported study, or the store already holds the study."""


def read_folder(folder: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """study.json, runs.csv (every cell as its text), history and stability, as stawm-export wrote them."""
    missing = [name for name in (RUNS, HISTORY, STABILITY, STUDY) if not (folder / name).is_file()]
    if missing:
        raise ImportRefused(f"{folder} holds no exported study (missing {', '.join(missing)})")
    runs = pd.read_csv(folder / RUNS, dtype=str, keep_default_na=False)
    history = pd.read_csv(folder / HISTORY, dtype={"run_id": str, "metric": str})
    stability = pd.read_csv(folder / STABILITY, dtype={"run_id": str, "condition": str, "source": str})
    return json.loads((folder / STUDY).read_text()), runs, history, stability


def import_study(folder: Path, client, command: str) -> tuple[str, int]:
    """Rebuild the study of `folder` in the store of `client`; returns the new parent run id and the trials."""
    meta, runs, history, stability = read_folder(folder)
    name = meta["study"]
    if client.get_experiment_by_name(name) is not None:
        raise ImportRefused(f"the store already holds a study (experiment) named {name!r}: import into another "
                            "store, or delete that experiment first")
    experiment = client.create_experiment(name, tags={schema.EXPERIMENT_KIND: schema.EXPERIMENT_KIND_TRAINING})
    start, end = (_ms(runs[column]) for column in ("start_time", "end_time"))
    parent = _create_parent(client, experiment, meta, min(start), command)
    types = field_types()
    config_fields = [name for name in types if name in runs.columns]
    for (_, row), started, ended in zip(runs.iterrows(), start, end):
        logged = [f for f in config_fields if row[f] != "" or types[f] is str]  # "" elsewhere: never logged
        _import_run(client, experiment, parent, name, meta, row, logged, started, ended,
                    history[history["run_id"] == row["run_id"]], stability[stability["run_id"] == row["run_id"]])
    client.set_terminated(parent, "FINISHED", end_time=max(end))
    return parent, len(runs)


def _create_parent(client, experiment: str, meta: dict, start_ms: int, command: str) -> str:
    """The parent run as the study's first launch left it: its params, its command lines, then this import."""
    commits = meta.get("ran_at_commits") or []
    tags = {schema.ROLE: schema.ROLE_STUDY, schema.STUDY: meta["study"],
            schema.NOTE: f"{meta.get('ran_with', '').rstrip()}\n\nImported with\n\n    {command}\n",
            **({schema.GIT_COMMIT: commits[0]} if len(commits) == 1 else {})}
    parent = client.create_run(experiment, run_name=meta["study"], start_time=start_ms, tags=tags).info.run_id
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in meta["params"].items()])
    return parent


def _import_run(client, experiment: str, parent: str, study: str, meta: dict, row: pd.Series,
                config_fields: list[str], start_ms: int, end_ms: int, history: pd.DataFrame,
                stability: pd.DataFrame) -> None:
    """One trial run: tags, the flat config as params, every epoch's metrics, its stability report."""
    swept = [s for s in meta.get(schema.SWEPT) or [] if s in row]
    name = " ".join(f"{k}={row[k]}" for k in [*swept, "seed"])
    ok, diverged = row["stability_ok"] == "True", row["diverged"] == "True"
    tags = {schema.PARENT_RUN_ID: parent, schema.ROLE: schema.ROLE_TRIAL, schema.STUDY: study,
            schema.PRESET: row["preset"], schema.SEED: row["seed"], schema.TRIAL_ID: row["trial_id"],
            schema.GIT_COMMIT: row["git_commit"], schema.HOST: row["host"], schema.GPU: row["gpu"],
            schema.STABILITY_OK: schema.tag_bool(ok), schema.STABILITY_FLAGS: row["flags"],
            schema.STABILITY_STATIC_OK: schema.tag_bool(row["static_ok"] == "True"),
            schema.STABILITY_DIVERGED: schema.tag_bool(diverged), IMPORTED_FROM: row["run_id"]}
    run_id = client.create_run(experiment, run_name=name, start_time=start_ms,
                               tags={k: v for k, v in tags.items() if v != ""}).info.run_id
    client.log_batch(run_id, params=[Param(k, row[k]) for k in config_fields])
    metrics = [Metric(m, float(v), end_ms, int(s)) for m, s, v in history[["metric", "step", "value"]].itertuples(
        index=False)]
    for first in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[first:first + BATCH])
    client.log_dict(run_id, {k: row[k] for k in config_fields}, schema.CONFIG_ARTIFACT)
    client.log_dict(run_id, _stability_report(ok, row["flags"], row["static_ok"] == "True", diverged, stability),
                    schema.STABILITY_ARTIFACT)
    client.set_terminated(run_id, row["status"] or "FINISHED", end_time=end_ms)


def _stability_report(ok: bool, flags: str, static_ok: bool, diverged: bool, stability: pd.DataFrame) -> dict:
    """The parts of a run's stability report that an export keeps: the verdict and each condition's first failure."""
    conditions = {r.condition: {"source": r.source, "ok": bool(r.ok),
                                "first_failed_epoch": None if math.isnan(r.first_failed_epoch)
                                else int(r.first_failed_epoch)}
                  for r in stability.itertuples(index=False)}
    return {"ok": ok, "failed": [f for f in flags.split(",") if f], "static_ok": static_ok, "diverged": diverged,
            "conditions": conditions}


def _ms(times: pd.Series) -> list[int]:
    """runs.csv's UTC times as MLflow's epoch milliseconds."""
    return [int(t.value // 1_000_000) for t in pd.to_datetime(times, utc=True, format="ISO8601")]


@flat("store")  # args.tracking_uri: see stawm.flags.flat
@dataclass
class ImportArgs:
    """stawm-import's flags: the shipped folder, and the MLflow store it is rebuilt in."""

    folder: tyro.conf.Positional[Path]  # a folder stawm-export wrote (analysis/results/NAME)
    store: Group[TrackingFlags] = field(default_factory=TrackingFlags)


def main(argv=None) -> int:
    """`stawm-import`; the exit status (2: bad input, told in one line on stderr)."""
    args = parse(ImportArgs, argv, prog="stawm-import", description=__doc__.split("\n\n")[0])
    args.tracking_uri = args.tracking_uri or default_tracking_uri()
    try:
        parent, trials = import_study(args.folder, MlflowClient(args.tracking_uri), command_line())
    except (ImportRefused, store.StudyNotFound) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"imported {trials} trials of {args.folder} into {redact(args.tracking_uri)} (parent run {parent})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
