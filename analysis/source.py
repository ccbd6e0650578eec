"""Where a study's results come from: its MLflow store, or a folder of shipped results (written by export.py).

Both give the same four things, in the shapes store.py states: `runs` (one row per trial), `info`
(the parent run), `history(metrics)` (per-epoch values, long), and `stability()` (the epoch each
Appendix A condition first failed, per run, long). The report and the notebooks take either, so a
fresh clone rebuilds every table and figure from `analysis/results/<study>/` without MLflow data.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Sequence

import pandas as pd

from stawm import schema
from stawm.config import field_types

from . import store

RUNS, HISTORY, STABILITY, STUDY = "runs.csv", "history.csv.gz", "stability.csv", "study.json"  # export.py's files
BOOLEAN_COLUMNS = ("stability_ok", "flagged", "static_ok", "diverged")
STABILITY_COLUMNS = {"run_id": "str", "condition": "str", "source": "str", "ok": "bool",
                     "first_failed_epoch": "float64"}


class MlflowStudy:
    """A study read from an MLflow tracking URI (histories cached under `cache_dir`)."""

    def __init__(self, study: str, tracking_uri: str, cache_dir: str | Path = ".cache/mlflow-history",
                 progress: bool = True):
        self.study, self.tracking_uri, self.cache_dir, self.progress = study, tracking_uri, Path(cache_dir), progress
        self.runs, self.info = store.load_study(study, tracking_uri)

    def history(self, metrics: Sequence[str]) -> pd.DataFrame:
        return store.metric_histories(self.runs, list(metrics), self.tracking_uri, self.cache_dir, self.progress)

    def stability(self) -> pd.DataFrame:
        """Each run's stability report (its artifact), one row per (run, condition)."""
        from tqdm import tqdm

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar here, not one per file
        client = store._client(self.tracking_uri)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for run_id in tqdm(self.runs["run_id"], desc="stability reports", unit="run", leave=False,
                               disable=not self.progress or len(self.runs) < 10):
                try:
                    path = client.download_artifacts(run_id, schema.STABILITY_ARTIFACT, f"{tmp}/{run_id}")
                except Exception:  # a run killed before its first epoch has no report yet
                    continue
                rows += stability_rows(run_id, json.loads(Path(path).read_text()))
        return stability_frame(rows)

    @cached_property
    def parent_tags(self) -> dict:
        """The parent run's tags (its command line, commit); {} without a parent."""
        if self.info.parent_run_id is None:
            return {}
        return dict(store._client(self.tracking_uri).get_run(self.info.parent_run_id).data.tags)


class ExportedStudy:
    """A study read from an export folder: `runs`, `info`, `history(metrics)`, `stability()`."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        missing = [name for name in (RUNS, HISTORY, STABILITY, STUDY) if not (self.folder / name).is_file()]
        if missing:
            raise store.StudyNotFound(f"{self.folder} holds no exported study (missing {', '.join(missing)}); "
                                      f"make one with stawm-export")
        meta = json.loads((self.folder / STUDY).read_text())
        self.meta = meta
        self.info = store.StudyInfo(meta["study"], None, None, meta["seeds"], meta[schema.SWEPT], meta["params"],
                                    meta["parents"])
        self.runs = typed_runs(pd.read_csv(self.folder / RUNS, dtype=str, keep_default_na=False))
        self._history = pd.read_csv(self.folder / HISTORY, dtype={"run_id": str, "metric": str, "step": "int64",
                                                                  "value": "float64"})

    def history(self, metrics: Sequence[str]) -> pd.DataFrame:
        frame = self._history[self._history["metric"].isin(list(metrics))]
        return frame.reset_index(drop=True)[list(store.HISTORY_COLUMNS)]

    def stability(self) -> pd.DataFrame:
        frame = pd.read_csv(self.folder / STABILITY, dtype={"run_id": str, "condition": str, "source": str})
        return stability_frame(frame.to_dict("records"))

    @property
    def parent_tags(self) -> dict:
        return {schema.NOTE: self.meta.get("ran_with", "")}


def typed_runs(raw: pd.DataFrame) -> pd.DataFrame:
    """runs.csv (every cell text) back to the runs shape's types: config fields by Config's types,
    the verdict as bools, times as UTC timestamps, metrics as floats ("" is NaN, or None for a field)."""
    types, runs = field_types(), raw.copy()
    for column in runs.columns:
        text = raw[column]
        if column in types:
            kind = types[column]  # a text field is "" when empty; any other empty cell was not logged
            runs[column] = [schema.parse_value(column, v, kind) if v != "" or kind is str else None for v in text]
        elif column in BOOLEAN_COLUMNS:
            runs[column] = [schema.parse_value(column, v, bool) for v in text]
        elif column in ("start_time", "end_time"):
            runs[column] = pd.to_datetime(text.replace("", None), utc=True, format="ISO8601")
        elif column in store.META or column == "flags":
            runs[column] = text.replace("", None) if column != "flags" else text
        else:
            runs[column] = [float(v) if v != "" else math.nan for v in text]
    return runs


def stability_rows(run_id: str, report: dict) -> list[dict]:
    return [{"run_id": run_id, "condition": name, "source": c["source"], "ok": bool(c["ok"]),
             "first_failed_epoch": c["first_failed_epoch"]} for name, c in report["conditions"].items()]


def stability_frame(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in STABILITY_COLUMNS.items()})
    frame = pd.DataFrame(rows)[list(STABILITY_COLUMNS)]
    frame["first_failed_epoch"] = frame["first_failed_epoch"].astype("float64")  # None (never failed) -> NaN
    return frame


def open_study(study: str | None = None, tracking_uri: str | None = None, *, results: str | Path | None = None,
               cache_dir: str | Path = ".cache/mlflow-history", progress: bool = True):
    """The study from shipped results when `results` (a folder) is given, else from MLflow."""
    if results:
        return ExportedStudy(results)
    if not study or not tracking_uri:
        raise ValueError("give a study and a tracking URI, or a folder of shipped results")
    return MlflowStudy(study, tracking_uri, cache_dir, progress)
