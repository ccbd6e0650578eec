"""Reading a study from its MLflow store: its runs, its parent run, and per-epoch metric histories.

The one data shape
------------------
Every function of the analysis takes or returns **runs**: a pandas DataFrame with one row per trial
(a child run of a study's parent run in MLflow), made by `load_runs`. Its columns:

- `run_id`, `status` (FINISHED, FAILED, RUNNING, ...), `seed` (int), `parent_run_id`, `trial_id`,
  `git_commit`, `host`, `gpu`, `start_time`, `end_time` (UTC timestamps; end is NaT while running);
- every field of `stawm.config.Config` except `seed`, cast back from MLflow's strings to its type
  with `schema.parse_value` and `field_types()` (int, float, bool, str; tuple fields as tuples of
  ints; None when the run did not log the field);
- the last logged value of every metric, named as logged (`schema.TEST_ERROR`, `schema.TRAIN_LOSS`,
  `schema.BEST_TEST_ERROR`, ...), except metrics that share a config field's name: the learned
  rates (`schema.RATE_METRICS`) at the end of training are `final_delta`, `final_eta`,
  `final_theta` (the columns `delta`, `eta`, `theta` are the configured starting rates); MLflow's system metrics
  (`system/...`, --system-metrics) are left out: they measure the machine, not the run;
- the Appendix A verdict: `stability_ok` (bool), `flags` (comma-separated failed conditions, ""
  if none), `flagged` (bool, = not stability_ok), `static_ok` (bool: passed before training),
  `diverged` (bool: the loss went non-finite). A run that has not written these tags yet counts
  as passed and not diverged.

Metric histories are a second, long shape (`metric_history`): one row per (run, metric, step)
with columns `run_id`, `metric`, `step` (the epoch, 1-based), `value`.

Error metrics are fractions as logged (0.0041); tables and plots show them in percent.
Every MLflow name is read from `stawm.schema` when a function runs, never spelled here.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from stawm import schema, store_uri
from stawm.config import field_types
from stawm.provenance import redact

from .files import write_whole

META = ["run_id", "status", "seed", "parent_run_id", "trial_id", "git_commit", "host", "gpu",
        "start_time", "end_time"]
STABILITY = ["stability_ok", "flags", "flagged", "static_ok", "diverged"]


class StudyNotFound(LookupError):
    """No MLflow experiment of that name at the tracking URI, or one without trial runs."""


@dataclass(frozen=True)
class StudyInfo:
    """A study's parent run, as `study_info` reads it."""

    study: str
    experiment_id: str | None = None
    parent_run_id: str | None = None  # None: no parent run
    seeds: int | None = None  # seeds per configuration; None when the parent did not log it
    swept: list[str] | None = None  # the fields the study varies (not the seed); None when not logged
    params: dict = field(default_factory=dict)  # every param of the parent run
    parents: int = 0  # parent runs under the study's name (more than one: launched again, not resumed)


# --- MLflow access ------------------------------------------------------------------------------


def _client(tracking_uri: str):
    """An MlflowClient for the URI; refuses a sqlite path that does not exist (MLflow would create it)."""
    from mlflow import MlflowClient  # imported here: `--help` and the pure functions stay quick

    path = store_uri.sqlite_path(tracking_uri)
    if path is not None and not path.exists():
        raise StudyNotFound(f"no MLflow store at {redact(tracking_uri)} (no such file {path})")
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment(client, study: str, tracking_uri: str):
    exp = client.get_experiment_by_name(study)
    if exp is None or exp.lifecycle_stage != "active":
        raise StudyNotFound(f"no study (MLflow experiment) named {study!r} at {redact(tracking_uri)}")
    return exp


def _search(client, experiment_id: str, role: str, order_by=None) -> list:
    """Every run of the experiment with the given role tag, page by page."""
    filter_string = schema.tag_filter({schema.ROLE: role})
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# --- runs ---------------------------------------------------------------------------------------


def _run_row(run, types: dict[str, type]) -> dict:
    info, tags, params = run.info, run.data.tags, run.data.params
    row = {
        "run_id": info.run_id,
        "status": info.status,
        "parent_run_id": tags.get(schema.PARENT_RUN_ID),
        "trial_id": tags.get(schema.TRIAL_ID),
        "git_commit": tags.get(schema.GIT_COMMIT),
        "host": tags.get(schema.HOST),
        "gpu": tags.get(schema.GPU),
        "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
        "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
    }
    try:
        for name, kind in types.items():
            row[name] = schema.parse_value(name, params.get(name), kind)
        if row["seed"] is None and schema.SEED in tags:  # a run that logged no params yet
            row["seed"] = schema.parse_value("seed", tags[schema.SEED], int)
    except schema.ParamError as err:
        raise schema.ParamError(f"run {info.run_id}: param {err}") from None
    for key, value in run.data.metrics.items():
        if not key.startswith(schema.SYSTEM_METRICS_PREFIX):  # the machine's load, not a result of the run
            row[f"final_{key}" if key in types else key] = value
    ok = schema.read_tag_bool(tags, schema.STABILITY_OK, True)
    row.update(stability_ok=ok, flags=tags.get(schema.STABILITY_FLAGS, ""), flagged=not ok,
               static_ok=schema.read_tag_bool(tags, schema.STABILITY_STATIC_OK, True),
               diverged=schema.read_tag_bool(tags, schema.STABILITY_DIVERGED, False))
    return row


def load_runs(study: str, tracking_uri: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """The study's trials (role-tagged trial runs in the experiment named `study`), one row each.

    `parent_run_id` keeps only the children of that parent (a study launched twice under one
    name has two parents). Raises StudyNotFound for an unknown study or one without trials.
    """
    client = _client(tracking_uri)
    exp = _experiment(client, study, tracking_uri)
    found = _search(client, exp.experiment_id, schema.ROLE_TRIAL)
    if parent_run_id is not None:
        found = [r for r in found if r.data.tags.get(schema.PARENT_RUN_ID) == parent_run_id]
    if not found:
        raise StudyNotFound(f"study {study!r} has no trial runs (tag {schema.ROLE}={schema.ROLE_TRIAL}) "
                            f"at {redact(tracking_uri)}")
    types = field_types()
    runs = pd.DataFrame([_run_row(r, types) for r in found])
    config = [name for name in types if name != "seed"]
    always = [schema.TEST_ERROR, schema.BEST_TEST_ERROR]  # present, NaN if never logged
    for name in always:
        if name not in runs:
            runs[name] = np.nan
    metrics = sorted(set(runs.columns) - set(META) - set(config) - set(STABILITY),
                     key=lambda m: (m not in always, m))
    runs = runs[META + config + metrics + STABILITY]
    return runs.sort_values(["start_time", "run_id"], ignore_index=True)


def study_info(study: str, tracking_uri: str) -> StudyInfo:
    """The study's parent run. With several parents (the study was launched again under its
    name), the latest is described and `parents` counts them."""
    client = _client(tracking_uri)
    exp = _experiment(client, study, tracking_uri)
    parents = _search(client, exp.experiment_id, schema.ROLE_STUDY, order_by=["attributes.start_time DESC"])
    if not parents:
        return StudyInfo(study, exp.experiment_id)
    if len(parents) > 1:
        warnings.warn(f"study {study!r} has {len(parents)} parent runs (launched again, not resumed); "
                      f"describing the latest", stacklevel=2)
    params = dict(parents[0].data.params)
    held = parents[0].data.tags.get(schema.SEEDS_NOW) or params.get(schema.SEEDS)  # the tag once seeds were added
    seeds = schema.parse_value(schema.SEEDS, held, int) if held else None
    swept = None
    if schema.SWEPT in params:
        swept = [s.strip() for s in params[schema.SWEPT].split(",") if s.strip() and s.strip() != "seed"]
    return StudyInfo(study, exp.experiment_id, parents[0].info.run_id, seeds, swept, params, len(parents))


def load_study(study: str, tracking_uri: str) -> tuple[pd.DataFrame, StudyInfo]:
    """`load_runs` and `study_info` together. A study launched again under its name (not resumed)
    has several parent runs: then only the latest launch's trials are loaded."""
    info = study_info(study, tracking_uri)
    latest = info.parent_run_id if info.parents > 1 else None
    return load_runs(study, tracking_uri, parent_run_id=latest), info


def varying_fields(runs: pd.DataFrame) -> list[str]:
    """Config fields (not seed) taking more than one value across the runs, in Config order. A field some runs
    did not record (added to the harness after they ran: None) does not vary on that account."""
    return [name for name in field_types()
            if name != "seed" and name in runs and runs[name].nunique(dropna=True) > 1]


def swept_fields(runs: pd.DataFrame, info: StudyInfo | None = None) -> list[str]:
    """The study's swept fields: the parent's swept param if logged, else the varying fields."""
    if info is not None and info.swept is not None:
        missing = [s for s in info.swept if s not in runs]
        if missing:
            warnings.warn(f"swept fields {missing} are not config fields of the runs; ignored", stacklevel=2)
        return [s for s in info.swept if s in runs]
    return varying_fields(runs)


# --- metric histories ---------------------------------------------------------------------------

HISTORY_COLUMNS = {"run_id": "str", "metric": "str", "step": "int64", "value": "float64"}


def _history_frame(run_id: str, metric: str, points) -> pd.DataFrame:
    frame = pd.DataFrame({
        "run_id": pd.Series([run_id] * len(points), dtype="str"),
        "metric": pd.Series([metric] * len(points), dtype="str"),
        "step": pd.Series([p.step for p in points], dtype="int64"),
        "value": pd.Series([p.value for p in points], dtype="float64"),
    })
    # several values at one step (a resumed trial re-logging an epoch): keep the latest
    order = np.argsort([p.timestamp for p in points], kind="stable")
    frame = frame.iloc[order].drop_duplicates("step", keep="last")
    return frame.sort_values("step", ignore_index=True)


def metric_history(runs: pd.DataFrame, metric: str, tracking_uri: str, cache_dir: str | Path,
                   progress: bool = True) -> pd.DataFrame:
    """Per-epoch values of `metric` for the runs: columns run_id, metric, step, value.

    The histories of FINISHED runs are cached as parquet in `cache_dir/<metric>/<run_id>.parquet`
    (run ids are unique across stores) and never fetched again; other runs are re-read each time.
    """
    from tqdm import tqdm

    folder = Path(cache_dir) / re.sub(r"[^A-Za-z0-9_.-]", "_", metric)
    frames, to_fetch = {}, []
    for run_id, status in zip(runs["run_id"], runs["status"]):
        path = folder / f"{run_id}.parquet"
        if status == "FINISHED" and path.exists():
            frames[run_id] = pd.read_parquet(path)
        else:
            to_fetch.append((run_id, status, path))
    if to_fetch:
        client = _client(tracking_uri)
        bar = tqdm(to_fetch, desc=f"history of {metric}", unit="run",
                   disable=not progress or len(to_fetch) < 10, leave=False)
        for run_id, status, path in bar:
            frame = _history_frame(run_id, metric, client.get_metric_history(run_id, metric))
            if status == "FINISHED":  # a finished run's history no longer changes
                folder.mkdir(parents=True, exist_ok=True)
                write_whole(path, lambda tmp: frame.to_parquet(tmp, index=False))
            frames[run_id] = frame
    parts = [frames[r] for r in runs["run_id"] if len(frames[r])]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in HISTORY_COLUMNS.items()})
    return pd.concat(parts, ignore_index=True)[list(HISTORY_COLUMNS)]


def metric_histories(runs: pd.DataFrame, metrics: Sequence[str], tracking_uri: str,
                     cache_dir: str | Path, progress: bool = True) -> pd.DataFrame:
    """`metric_history` for several metrics, stacked (the `metric` column tells them apart)."""
    return pd.concat([metric_history(runs, m, tracking_uri, cache_dir, progress) for m in metrics],
                     ignore_index=True)
