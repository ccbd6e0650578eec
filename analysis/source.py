"""Where a study's results come from: its MLflow store, or a folder of shipped results (export.py).

Both give the same four things, in the shapes store.py states: `runs` (one row per trial), `info`
(the parent run), `history(metrics)` (per-epoch values, long), and `stability()` (the epoch each
Appendix A condition first failed, per run, long). The report and the notebooks take either, so a
fresh clone rebuilds every table and figure from `analysis/results/<study>/` without MLflow data.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Sequence

import pandas as pd

from stawm import schema

from . import store

STABILITY_COLUMNS = {"run_id": "str", "condition": "str", "kind": "str", "ok": "bool", "first_failed_epoch": "float64"}


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


def stability_rows(run_id: str, report: dict) -> list[dict]:
    return [{"run_id": run_id, "condition": name, "kind": c["kind"], "ok": bool(c["ok"]),
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
        from .export import ExportedStudy

        return ExportedStudy(results)
    if not study or not tracking_uri:
        raise ValueError("give a study and a tracking URI, or a folder of shipped results")
    return MlflowStudy(study, tracking_uri, cache_dir, progress)
