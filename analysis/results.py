"""Results of STAWM studies: runs from MLflow, statistics over seeds, tables and plots.

The one data shape
------------------
Every function here takes or returns **runs**: a pandas DataFrame with one row per trial (a child
run of a study's parent run in MLflow), made by `load_runs`. Its columns:

- `run_id`, `status` (FINISHED, FAILED, RUNNING, ...), `seed` (int), `parent_run_id`, `trial_id`,
  `git_commit`, `host`, `gpu`, `start_time`, `end_time` (UTC timestamps; end is NaT while running);
- every field of `stawm.config.Config` except `seed`, cast back from MLflow's strings to its type
  with `field_types()` (int, float, bool, str; tuple fields as tuples of ints; None when the run did
  not log the field);
- the last logged value of every metric, named as logged (`test_error`, `train_loss`,
  `best_test_error`, ...), except the rate metrics that share a config field's name: the learned
  `delta`, `eta`, `theta` at the end of training are `final_delta`, `final_eta`, `final_theta`
  (the columns `delta`, `eta`, `theta` are the configured starting rates);
- the Appendix A verdict: `stability_ok` (bool), `flags` (comma-separated failed conditions, ""
  if none), `flagged` (bool, = not stability_ok), `static_ok` (bool: passed before training),
  `diverged` (bool: the loss went non-finite). A run that has not written these tags yet counts
  as passed and not diverged.

Metric histories are a second, long shape (`metric_history`): one row per (run, metric, step)
with columns `run_id`, `metric`, `step` (the epoch, 1-based), `value`.

Error metrics are fractions as logged (0.0041); tables and plots show them in percent.
"""

from __future__ import annotations

import ast
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stawm.config import field_types

if TYPE_CHECKING:  # matplotlib, seaborn, scipy and mlflow are imported where used: quick imports
    from matplotlib.figure import Figure

# --- errors and the paper's numbers -------------------------------------------------------------


class StudyNotFound(LookupError):
    """No MLflow experiment of that name at the tracking URI, or one without trial runs."""


@dataclass(frozen=True)
class Published:
    """One row of the paper's Table 1: MNIST test error in percent (std in percentage points)."""

    model: str
    table: str  # "1a" (supervised) or "1b" (self-supervised)
    error_pct: float
    std_pct: float | None = None  # None: the paper gives no spread
    task: str | None = None  # the Config.task a reproduced row must have to match
    glimpse_size: int | None = None  # S_g
    glimpses: int | None = None  # N
    note: str = ""


# Reproducible STAWM rows, keyed by (task, glimpse_size, glimpses) as a reproduced row is.
PUBLISHED: dict[tuple[str, int, int], Published] = {
    ("classify", 8, 8): Published("STAWM", "1a", 0.41, 0.03, "classify", 8, 8),
    ("classify", 28, 10): Published("STAWM", "1a", 0.35, 0.02, "classify", 28, 10,
                                    note="S_g=28, N=10: best of 5 runs 0.31%"),
    ("selfsup", 6, 12): Published("STAWM (self-supervised)", "1b", 0.77, None, "selfsup", 6, 12),
}
MATCH_FIELDS = ("task", "glimpse_size", "glimpses")  # the key of PUBLISHED

# Other models' results, quoted by the paper and by our tables as published rows.
BASELINES: dict[str, tuple[Published, ...]] = {
    "1a": (
        Published("RAM", "1a", 1.55, glimpse_size=8, glimpses=5),
        Published("RAM", "1a", 1.29, glimpse_size=8, glimpses=6),
        Published("RAM", "1a", 1.47, glimpse_size=8, glimpses=7),
    ),
    "1b": (
        Published("DBM", "1b", 0.79),
        Published("Adversarial", "1b", 0.78),
        Published("Virtual Adversarial", "1b", 0.64),
        Published("Ladder", "1b", 0.57),
    ),
}

RATES = ("delta", "eta", "theta")
RATE_FIELDS = (*RATES, "learnable_rates")  # a study sweeping any of these is a memory-rate study
ABLATION_FIELDS = ("glimpse_size", "glimpses", *RATE_FIELDS)  # what the ablations notebook plots

# --- loading runs -------------------------------------------------------------------------------

_TRIAL = "tags.`stawm.role` = 'trial'"
_STUDY = "tags.`stawm.role` = 'study'"
_META = ["run_id", "status", "seed", "parent_run_id", "trial_id", "git_commit", "host", "gpu",
         "start_time", "end_time"]
_STABILITY = ["stability_ok", "flags", "flagged", "static_ok", "diverged"]


def _redact(uri: str) -> str:
    """The URI without a password, for messages."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def _client(tracking_uri: str):
    """An MlflowClient for the URI; refuses a sqlite path that does not exist (MLflow would create it)."""
    from mlflow import MlflowClient

    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):].split("?")[0]
        if path not in ("", ":memory:") and not Path(path).exists():
            raise StudyNotFound(f"no MLflow store at {_redact(tracking_uri)} (no such file {path})")
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment(client, study: str, tracking_uri: str):
    exp = client.get_experiment_by_name(study)
    if exp is None or exp.lifecycle_stage != "active":
        raise StudyNotFound(f"no study (MLflow experiment) named {study!r} at {_redact(tracking_uri)}")
    return exp


def _search(client, experiment_id: str, filter_string: str, order_by=None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def cast_param(name: str, value: str | None, kind: type):
    """An MLflow param string back to the config field's type (tuples of ints as tuples)."""
    if value is None:
        return None
    try:
        if kind is tuple:
            parsed = ast.literal_eval(value) if value.strip() else ()
            return tuple(int(v) for v in (parsed if isinstance(parsed, (list, tuple)) else [parsed]))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError(value)
            return int(number)
        return kind(value)
    except (ValueError, SyntaxError, TypeError):
        raise ValueError(f"param {name}={value!r} is not a valid {kind.__name__}") from None


def _tag_bool(tags: dict, key: str, default: bool) -> bool:
    value = tags.get(key)
    return default if value is None else value.strip().lower() == "true"


def _run_row(run, types: dict[str, type]) -> dict:
    info, tags, params = run.info, run.data.tags, run.data.params
    row = {
        "run_id": info.run_id,
        "status": info.status,
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "trial_id": tags.get("stawm.trial_id"),
        "git_commit": tags.get("stawm.git_commit"),
        "host": tags.get("stawm.host"),
        "gpu": tags.get("stawm.gpu"),
        "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True),
        "end_time": pd.to_datetime(info.end_time, unit="ms", utc=True) if info.end_time else pd.NaT,
    }
    try:
        for name, kind in types.items():
            row[name] = cast_param(name, params.get(name), kind)
        if row["seed"] is None and "stawm.seed" in tags:
            row["seed"] = cast_param("seed", tags["stawm.seed"], int)
    except ValueError as err:
        raise ValueError(f"run {info.run_id}: {err}") from None
    for key, value in run.data.metrics.items():
        row[f"final_{key}" if key in types else key] = value
    ok = _tag_bool(tags, "stability.ok", True)
    row.update(stability_ok=ok, flags=tags.get("stability.flags", ""), flagged=not ok,
               static_ok=_tag_bool(tags, "stability.static_ok", True),
               diverged=_tag_bool(tags, "stability.diverged", False))
    return row


def load_runs(study: str, tracking_uri: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """The study's trials (runs tagged stawm.role=trial in the experiment named `study`), one row each.

    `parent_run_id` keeps only the children of that parent (a study launched twice under one
    name has two parents). Raises StudyNotFound for an unknown study or one without trials.
    """
    client = _client(tracking_uri)
    exp = _experiment(client, study, tracking_uri)
    found = _search(client, exp.experiment_id, _TRIAL)
    if parent_run_id is not None:
        found = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
    if not found:
        raise StudyNotFound(f"study {study!r} has no trial runs (tag stawm.role=trial) at {_redact(tracking_uri)}")
    types = field_types()
    runs = pd.DataFrame([_run_row(r, types) for r in found])
    config = [name for name in types if name != "seed"]
    metrics = sorted(set(runs.columns) - set(_META) - set(config) - set(_STABILITY))
    for name in ("test_error", "best_test_error"):  # always present, NaN if never logged
        if name not in runs:
            runs[name] = np.nan
            metrics.append(name)
    metrics.sort(key=lambda m: (m not in ("test_error", "best_test_error"), m))
    runs = runs[_META + config + metrics + _STABILITY]
    return runs.sort_values(["start_time", "run_id"], ignore_index=True)


def study_info(study: str, tracking_uri: str) -> dict:
    """The study's parent run: {study, experiment_id, parent_run_id, seeds, swept, params, parents}.

    `seeds` (int) and `swept` (list of field names) are None when the parent did not log them;
    `parent_run_id` is None when there is no parent run. With several parents (the study was
    launched again), the latest is described and `parents` counts them.
    """
    client = _client(tracking_uri)
    exp = _experiment(client, study, tracking_uri)
    parents = _search(client, exp.experiment_id, _STUDY, order_by=["attributes.start_time DESC"])
    info = dict(study=study, experiment_id=exp.experiment_id, parent_run_id=None, seeds=None,
                swept=None, params={}, parents=len(parents))
    if not parents:
        return info
    if len(parents) > 1:
        warnings.warn(f"study {study!r} has {len(parents)} parent runs (launched again, not resumed); "
                      f"describing the latest", stacklevel=2)
    params = dict(parents[0].data.params)
    info.update(parent_run_id=parents[0].info.run_id, params=params)
    if params.get("seeds"):
        info["seeds"] = cast_param("seeds", params["seeds"], int)
    if "swept" in params:
        info["swept"] = [s.strip() for s in params["swept"].split(",") if s.strip() and s.strip() != "seed"]
    return info


def load_study(study: str, tracking_uri: str) -> tuple[pd.DataFrame, dict]:
    """`load_runs` and `study_info` together. A study launched again under its name (not resumed)
    has several parent runs: then only the latest launch's trials are loaded."""
    info = study_info(study, tracking_uri)
    latest = info["parent_run_id"] if info["parents"] > 1 else None
    return load_runs(study, tracking_uri, parent_run_id=latest), info


def varying_fields(runs: pd.DataFrame) -> list[str]:
    """Config fields (not seed) taking more than one value across the runs, in Config order."""
    return [name for name in field_types()
            if name != "seed" and name in runs and runs[name].nunique(dropna=False) > 1]


def swept_fields(runs: pd.DataFrame, info: dict | None = None) -> list[str]:
    """The study's swept fields: the parent's `swept` param if logged, else the varying fields."""
    if info is not None and info.get("swept") is not None:
        missing = [s for s in info["swept"] if s not in runs]
        if missing:
            warnings.warn(f"swept fields {missing} are not config fields of the runs; ignored", stacklevel=2)
        return [s for s in info["swept"] if s in runs]
    return varying_fields(runs)


# --- metric histories ---------------------------------------------------------------------------

_HISTORY_COLUMNS = ["run_id", "metric", "step", "value"]


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
            if status == "FINISHED":
                folder.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                frame.to_parquet(tmp, index=False)
                os.replace(tmp, path)  # atomic: a reader never sees half a file
            frames[run_id] = frame
    parts = [frames[r] for r in runs["run_id"] if len(frames[r])]
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                             zip(_HISTORY_COLUMNS, ["str", "str", "int64", "float64"])})
    return pd.concat(parts, ignore_index=True)[_HISTORY_COLUMNS]


def metric_histories(runs: pd.DataFrame, metrics: Sequence[str], tracking_uri: str,
                     cache_dir: str | Path, progress: bool = True) -> pd.DataFrame:
    """`metric_history` for several metrics, stacked (the `metric` column tells them apart)."""
    return pd.concat([metric_history(runs, m, tracking_uri, cache_dir, progress) for m in metrics],
                     ignore_index=True)


# --- uncertainty --------------------------------------------------------------------------------


def _finite(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of the finite values; std is NaN for n < 2."""
    v = _finite(values)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def sem(values) -> float:
    """Standard error of the mean, std (ddof=1) / sqrt(n); NaN for n < 2."""
    v = _finite(values)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def bootstrap_ci(values, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: (low, high); NaN for n < 2.

    10,000 resamples keep the Monte Carlo error of a 95% bound well below the spread of 5 seeds;
    `seed` makes the interval reproducible.
    """
    v = _finite(values)
    if len(v) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) between two samples; NaN if n < 2."""
    a, b = _finite(a), _finite(b)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    import scipy.stats

    return float(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)


# --- aggregation --------------------------------------------------------------------------------

STAT_COLUMNS = ["n", "mean", "std", "sem", "min", "max", "flagged", "unfinished", "complete",
                "seeds", "values"]


def _included(runs: pd.DataFrame, include_flagged: bool, include_unfinished: bool) -> pd.Series:
    keep = pd.Series(True, index=runs.index)
    if not include_flagged:
        keep &= ~runs["flagged"].astype(bool)
    if not include_unfinished:
        keep &= runs["status"] == "FINISHED"
    return keep


def aggregate(runs: pd.DataFrame, by: Sequence[str] | None = None, metric: str = "test_error",
              seeds_expected: int | None = None, include_flagged: bool = False,
              include_unfinished: bool = False, ci: float | None = None) -> pd.DataFrame:
    """One row per configuration (the runs grouped by the `by` fields, i.e. without the seed).

    `by=None` groups by every varying config field. Columns: the `by` fields, then `n` (runs in
    the statistics with a finite metric), `mean`, `std` (ddof=1, NaN for n=1), `sem`, `min`,
    `max`, `flagged` (flagged runs in the group, counted even when left out), `unfinished` (runs
    not FINISHED, left out unless `include_unfinished`), `complete` (n >= seeds_expected; when
    `seeds_expected` is None, n equals the largest n of any group), `seeds` and `values` (the
    seeds and metric values used, by seed), and with `ci` (e.g. 0.95) `ci_low`, `ci_high` of a
    bootstrap of the mean. Flagged runs are left out of the statistics unless `include_flagged`.
    Settings are kept in `.attrs` (metric, by, seeds_expected, include_flagged) for the tables.
    """
    by = varying_fields(runs) if by is None else list(by)
    if metric not in runs:
        raise KeyError(f"no run logged the metric {metric!r}")
    keep = _included(runs, include_flagged, include_unfinished)
    groups = runs.groupby(by, dropna=False, sort=True) if by else [((), runs)]
    others = [f for f in field_types() if f in runs and f not in by and f != "seed"]
    rows, mixed = [], set()
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        mixed |= {f for f in others if group[f].nunique(dropna=False) > 1}
        used = group[keep.loc[group.index] & np.isfinite(group[metric].astype(float))].sort_values("seed")
        values = used[metric].to_numpy(dtype=float)
        mean, std = mean_std(values)
        row = dict(zip(by, key))
        row.update(n=len(values), mean=mean, std=std, sem=sem(values),
                   min=float(values.min()) if len(values) else math.nan,
                   max=float(values.max()) if len(values) else math.nan,
                   flagged=int(group["flagged"].sum()), unfinished=int((group["status"] != "FINISHED").sum()),
                   seeds=tuple(int(s) for s in used["seed"]), values=tuple(float(v) for v in values))
        if ci is not None:
            row["ci_low"], row["ci_high"] = bootstrap_ci(values, confidence=ci)
        rows.append(row)
    if mixed:
        warnings.warn(f"runs grouped together differ in {sorted(mixed)}: add them to `by` "
                      f"to keep those configurations apart", stacklevel=2)
    agg = pd.DataFrame(rows)
    target = seeds_expected if seeds_expected is not None else agg["n"].max()
    agg.insert(agg.columns.get_loc("unfinished") + 1, "complete", agg["n"] >= target)
    agg.attrs.update(metric=metric, by=by, seeds_expected=seeds_expected, include_flagged=include_flagged)
    return agg


# --- tables -------------------------------------------------------------------------------------


class Table(NamedTuple):
    markdown: str
    latex: str


def _is_error(metric: str) -> bool:
    return metric.endswith("error") or metric.endswith("accuracy")


def _cell_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _pct(mean: float, std: float | None, percent: bool) -> str:
    if mean is None or math.isnan(mean):
        return "—"
    scale, unit = (100, "%") if percent else (1, "")
    digits = 2 if percent else 4
    text = f"{mean * scale:.{digits}f}{unit}"
    if std is not None and not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def _published_cell(p: Published) -> str:
    return f"{p.error_pct:.2f}%" + (f" ± {p.std_pct:.2f}" if p.std_pct is not None else "")


def _p_cell(p: float) -> str:
    if math.isnan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _baseline_row(agg: pd.DataFrame, baseline) -> int:
    if isinstance(baseline, int):
        return baseline
    match = np.ones(len(agg), dtype=bool)
    for field, value in baseline.items():
        match &= np.array([v == value for v in agg[field]])
    if match.sum() != 1:
        raise ValueError(f"baseline {baseline} matches {int(match.sum())} rows of the table, not one")
    return int(np.flatnonzero(match)[0])


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                   "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                   "±": r"$\pm$", "Δ": r"$\Delta$", "−": r"$-$", "—": "---", "<": r"$<$", ">": r"$>$"}


def _latex(text: str) -> str:
    return "".join(_LATEX_SPECIALS.get(c, c) for c in text)


def format_table(agg: pd.DataFrame, columns: Sequence[str] | None = None, *,
                 published: dict | None = None, quoted: Sequence[Published] = (),
                 bold_best: bool = True, baseline: dict | int | None = None,
                 label: str | None = None, caption: str | None = None) -> Table:
    """Markdown and LaTeX of an `aggregate` table in the paper's style.

    Each reproduced row shows its configuration (`columns`, default all `by` fields), the metric
    as "0.41% ± 0.03" (mean in percent ± std in percentage points), `n` ("3/5 (incomplete)" when
    short of the expected seeds) and the flagged runs. With `published` (e.g. PUBLISHED, keyed by
    task, glimpse_size, glimpses, which `agg` must then hold), the matching published value and
    the difference (pp) stand beside each row. `quoted` rows (e.g. BASELINES["1a"]) are other
    models' published results, listed first with a `model` column. The lowest mean is bold.
    `baseline` (a {field: value} dict matching one row, or a row position) adds the p-value of
    Welch's t-test of each row's seeds against the baseline's. The caption says what ± means.
    """
    metric = agg.attrs.get("metric", "test_error")
    by = agg.attrs.get("by", [c for c in agg.columns if c not in STAT_COLUMNS + ["ci_low", "ci_high"]])
    columns = list(by if columns is None else columns)
    expected = agg.attrs.get("seeds_expected")
    percent = _is_error(metric)
    if published is not None and not set(MATCH_FIELDS) <= set(agg.columns):
        raise ValueError(f"to compare with published rows, group by {list(MATCH_FIELDS)}")
    show_model = bool(quoted) or label is not None
    show_published = published is not None or bool(quoted)
    published = published or {}
    label = label or "STAWM (reproduced)"
    base = _baseline_row(agg, baseline) if baseline is not None and len(agg) else None

    header = (["model"] if show_model else []) + columns + [
        f"{metric.replace('_', ' ')}" + (" (%)" if percent else ""), "n", "flagged"]
    if show_published:
        header += ["published", "Δ (pp)"]
    if baseline is not None:
        header += ["p (Welch)"]
    n_label = len(columns) + show_model

    rows: list[tuple[list[str], set[int]]] = []  # cells, indices of bold cells
    for p in quoted:
        cells = ([p.model] if show_model else []) + [
            _cell_value(getattr(p, c, None)) if c in ("task", "glimpse_size", "glimpses") else "—"
            for c in columns] + ["—", "—", "—"]
        if show_published:
            cells += [_published_cell(p), "—"]
        if baseline is not None:
            cells += ["—"]
        rows.append((cells, set()))

    means = agg["mean"].to_numpy(dtype=float)
    best = np.nanmin(means) if bold_best and np.isfinite(means).any() else None
    notes = [p.note for p in quoted if p.note]
    for i, r in enumerate(agg.to_dict("records")):
        cells = ([label] if show_model else []) + [_cell_value(r[c]) for c in columns]
        cells.append(_pct(r["mean"], r["std"], percent))
        complete = bool(r["complete"])
        left_out = f", {r['unfinished']} unfinished" if r.get("unfinished") else ""  # failed or running
        cells.append(str(r["n"]) if complete else
                     f"{r['n']}{'' if expected is None else f'/{expected}'} (incomplete{left_out})")
        cells.append(str(r["flagged"]))
        if show_published:
            p = published.get(tuple(r[k] for k in MATCH_FIELDS)) if published else None
            if p is None:
                cells += ["—", "—"]
            else:
                diff = r["mean"] * 100 - p.error_pct
                cells += [_published_cell(p), "—" if math.isnan(diff) else f"{diff:+.2f}"]
                notes += [p.note] if p.note else []
        if base is not None:
            cells.append("baseline" if i == base else
                         _p_cell(welch_p(r["values"], agg.iloc[base]["values"])))
        bold = {n_label} if best is not None and r["mean"] == best else set()
        rows.append((cells, bold))

    ns = sorted(set(agg["n"]))
    over = (f"{expected} seeds" if expected is not None else
            f"{ns[0]} seeds" if len(ns) == 1 else "n seeds (column n)")
    flagged = ("flagged runs (Appendix A) included" if agg.attrs.get("include_flagged")
               else "flagged runs (Appendix A) left out")
    text = caption or (
        f"{metric}" + (" in %" if percent else "") + f": mean ± std (ddof=1) over {over}; {flagged}"
        + (f"; rows short of {expected} seeds are marked incomplete" if expected is not None else "")
        + ("; unfinished runs (failed or still running) are left out"
           if "unfinished" in agg and agg["unfinished"].any() else "")
        + ("; published: the paper's Table 1, Δ = reproduced − published in percentage points"
           if show_published else "")
        + ("; rows without a reproduced value are quoted from the paper" if quoted else "")
        + (f"; p: Welch's t-test against {_describe(agg, columns, base)}" if base is not None else "")
        + "".join(f"; {n}" for n in dict.fromkeys(notes)) + ".")

    def line(cells, bold, wrap):
        return [wrap(c) if j in bold else c for j, c in enumerate(cells)]

    align = ["l" if j < n_label else "r" for j in range(len(header))]
    md = [f"Table: {text}", "", "| " + " | ".join(header) + " |",
          "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    md += ["| " + " | ".join(line([x.replace("|", "\\|") for x in c], b, lambda s: f"**{s}**")) + " |"
           for c, b in rows]
    tex = ["% requires \\usepackage{booktabs}", "\\begin{table}[t]", "\\centering",
           f"\\caption{{{_latex(text)}}}", f"\\begin{{tabular}}{{{''.join(align)}}}", "\\toprule",
           " & ".join(_latex(h) for h in header) + " \\\\", "\\midrule"]
    tex += [" & ".join(line([_latex(x) for x in c], b, lambda s: f"\\textbf{{{s}}}")) + " \\\\"
            for c, b in rows]
    tex += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return Table("\n".join(md) + "\n", "\n".join(tex) + "\n")


def _describe(agg: pd.DataFrame, columns: Sequence[str], row: int) -> str:
    r = agg.iloc[row]
    return ", ".join(f"{c}={_cell_value(r[c])}" for c in columns) or f"row {row}"


def table1(runs: pd.DataFrame, seeds_expected: int | None = None, include_flagged: bool = False,
           baseline: dict | None = None) -> dict[str, Table]:
    """Table 1(a) (classification) and 1(b) (self-supervised) from the runs, beside the paper.

    Rows are grouped by task, glimpse_size and glimpses. Other models' results (RAM; DBM,
    Adversarial, Virtual Adversarial, Ladder) and the paper's STAWM rows that the runs do not
    reproduce are quoted as published rows.
    """
    agg = aggregate(runs, list(MATCH_FIELDS), seeds_expected=seeds_expected, include_flagged=include_flagged)
    tables = {}
    for name, task in (("1a", "classify"), ("1b", "selfsup")):
        part = agg[agg["task"] == task].reset_index(drop=True)
        part.attrs = dict(agg.attrs)
        have = {tuple(r) for r in part[list(MATCH_FIELDS)].itertuples(index=False)}
        missing = [p for k, p in PUBLISHED.items() if p.table == name and k not in have]
        tables[name] = format_table(part, ["glimpse_size", "glimpses"], published=PUBLISHED,
                                    quoted=(*BASELINES[name], *missing),
                                    baseline=baseline if len(part) else None)
    return tables


def flag_divergence(runs: pd.DataFrame) -> pd.DataFrame:
    """Which Appendix A conditions co-occur with divergence: one row per failed condition.

    Columns: flag, runs (runs that failed it), diverged (of those), diverged_fraction; a last
    row "(none)" counts runs without any failed condition.
    """
    flag_sets = runs["flags"].fillna("").map(lambda s: {f.strip() for f in s.split(",") if f.strip()})
    rows = []
    for flag in sorted(set().union(*flag_sets)) + ["(none)"]:
        has = flag_sets.map(lambda s: not s if flag == "(none)" else flag in s)
        n, d = int(has.sum()), int((has & runs["diverged"]).sum())
        rows.append(dict(flag=flag, runs=n, diverged=d, diverged_fraction=d / n if n else math.nan))
    return pd.DataFrame(rows)


# --- plots --------------------------------------------------------------------------------------

OUTCOMES = ("passed", "flagged during training", "flagged before training", "diverged")


def outcome(runs: pd.DataFrame) -> pd.Series:
    """Each run's Appendix A outcome, one of OUTCOMES (divergence first, then the static verdict)."""
    return pd.Series(np.select(
        [runs["diverged"].astype(bool), ~runs["static_ok"].astype(bool), runs["flagged"].astype(bool)],
        ["diverged", "flagged before training", "flagged during training"], "passed"), index=runs.index)


def outcome_table(runs: pd.DataFrame, by: Sequence[str] = RATE_FIELDS) -> pd.DataFrame:
    """Number of runs of each outcome (columns OUTCOMES) per configuration of the `by` fields."""
    counts = runs.assign(outcome=pd.Categorical(outcome(runs), OUTCOMES)).groupby(
        list(by), dropna=False, observed=True)["outcome"].value_counts().unstack(fill_value=0)
    counts = counts.reindex(columns=list(OUTCOMES), fill_value=0).reset_index()
    counts.columns.name = None
    return counts


def _palette(n: int) -> list:
    import seaborn as sns

    return sns.color_palette("colorblind", n)


def _outcome_colors() -> dict:
    c = _palette(8)
    return {"passed": c[2], "flagged during training": c[1], "flagged before training": c[4], "diverged": c[3]}


def _figure(ncols: int = 1, width: float = 4.8, height: float = 3.6, sharey: bool = False):
    import seaborn as sns
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))  # laid out once by _done: no engine rerun per save
    with sns.axes_style("whitegrid"):
        axes = fig.subplots(1, ncols, sharey=sharey, squeeze=False)[0]
    return fig, axes


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _done(fig: Figure) -> Figure:
    fig.tight_layout()
    return fig


def _metric_label(metric: str) -> tuple[str, float]:
    return (f"{metric.replace('_', ' ')} (%)", 100.0) if _is_error(metric) else (metric.replace("_", " "), 1.0)


def _dodged(fig: Figure, ax, x, y, points: float, **style) -> None:
    """Scatter shifted sideways by a number of typographic points (so overlapping seeds show).

    Autoscaling skips artists off ax.transData, so the data limits are extended by hand.
    """
    from matplotlib.transforms import ScaledTranslation

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ax.scatter(x, y, transform=ax.transData + ScaledTranslation(points / 72, 0, fig.dpi_scale_trans), **style)
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.any():
        ax.update_datalim(np.column_stack([x[finite], y[finite]]))
        ax.autoscale_view()


def _numeric(runs: pd.DataFrame, field: str) -> bool:
    kind = field_types().get(field)
    if kind is not None:
        return kind in (int, float)
    return pd.api.types.is_numeric_dtype(runs[field]) and not pd.api.types.is_bool_dtype(runs[field])


def _log_scale(values) -> bool:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return len(v) > 1 and (v > 0).all() and v.max() / v.min() >= 20


def plot_ablation(runs: pd.DataFrame, x: str, metric: str = "test_error", seeds_expected: int | None = None,
                  include_flagged: bool = False, hue: str | None = None) -> Figure:
    """`metric` against config field `x`: mean ± std (ddof=1) over seeds, with every seed's point.

    Numeric fields sit on a numeric axis (log when the values span 20x or more), others as
    categories. `hue` (another swept field) draws one series per value, side by side, so that
    different configurations are not pooled. Flagged runs left out of the statistics are still
    drawn, as crosses; a configuration short of `seeds_expected` seeds is labelled n=k/N.
    """
    from matplotlib.transforms import ScaledTranslation

    by = [x] + ([hue] if hue else [])
    agg = aggregate(runs, by, metric, seeds_expected, include_flagged)
    label, scale = _metric_label(metric)
    numeric = _numeric(runs, x)
    keys = sorted({_cell_value(k): k for k in agg[x]}.items(), key=lambda kv: agg[x].tolist().index(kv[1]))
    where = {text: (k if numeric else i) for i, (text, k) in enumerate(keys)}
    series = sorted(set(agg[hue].map(_cell_value)), key=lambda t: agg[hue].map(_cell_value).tolist().index(t)) \
        if hue else [None]
    colors = _palette(max(len(series), 2) + 2)
    fig, (ax,) = _figure()
    used = _included(runs, include_flagged, False)
    points = runs[np.isfinite(runs[metric].astype(float))]
    target = seeds_expected or agg["n"].max()
    labelled = set()
    for j, value in enumerate(series):
        shift = 12 * (j - (len(series) - 1) / 2)  # points; series side by side
        mine = points[points[hue].map(_cell_value) == value] if hue else points
        for kind, subset, style in (
                ("seeds", mine[used.loc[mine.index]], dict(marker="o", color=colors[j], alpha=0.45)),
                ("flagged (left out)", mine[~used.loc[mine.index] & mine["flagged"]],
                 dict(marker="x", color=colors[-1]))):
            rank = subset.groupby(subset[x].map(_cell_value), dropna=False).cumcount()
            for r in sorted(set(rank)):
                sel = subset[rank == r]
                _dodged(fig, ax, [where[_cell_value(v)] for v in sel[x]], sel[metric] * scale, shift + 2 * (r - 2),
                        s=14, zorder=3, gid=kind, **style,
                        label=kind if kind not in labelled and (hue is None or kind != "seeds") else None)
                labelled.add(kind)
        part = agg[agg[hue].map(_cell_value) == value] if hue else agg
        pos = np.array([where[_cell_value(k)] for k in part[x]], dtype=float)
        ax.errorbar(pos, part["mean"] * scale, yerr=part["std"].fillna(0) * scale, fmt="s" + ("-" if numeric else ""),
                    color="black" if hue is None else colors[j], capsize=4, markersize=5, zorder=4,
                    transform=ax.transData + ScaledTranslation(shift / 72, 0, fig.dpi_scale_trans),
                    label="mean ± std (ddof=1)" if hue is None else f"{hue}={value}")
        for p, r in zip(pos, part.to_dict("records")):
            if not r["complete"]:  # beside the mean, or at the foot of the axes when n=0 leaves none
                there = (p, r["mean"] * scale) if r["n"] else (p, 0)
                ax.annotate(f"n={r['n']}/{target}", there, xycoords="data" if r["n"] else ("data", "axes fraction"),
                            textcoords="offset points", xytext=(shift + 7, 0 if r["n"] else 4),
                            va="center" if r["n"] else "bottom", fontsize=7, color=colors[j] if hue else colors[-1])
    xs = np.array(list(where.values()), dtype=float)
    if not numeric:
        ax.set_xticks(xs, list(where))
        ax.set_xlim(-0.5, len(xs) - 0.5)
    elif _log_scale(xs):
        ax.set_xscale("log")
        ax.set_xlim(xs.min() / 1.3, xs.max() * 1.3)
    else:  # set, not autoscaled: a configuration without any finished run still gets its place
        pad = 0.06 * (xs.max() - xs.min()) or 0.5
        ax.set_xlim(xs.min() - pad, xs.max() + pad)
    if not len(points):
        ax.text(0.5, 0.5, f"no run has a finite {metric}", transform=ax.transAxes, ha="center")
        ax.set_yticks([])
    ax.set_xlabel(x)
    ax.set_ylabel(label)
    ax.set_title(f"{label} against {x}\nmean ± std (ddof=1) over seeds; dots: seeds", fontsize=9)
    ax.legend(fontsize=7)
    return _done(fig)


def plot_curves(history: pd.DataFrame, hue: str | None = None, runs: pd.DataFrame | None = None,
                include_flagged: bool = False) -> Figure:
    """Mean curve over seeds with a ±std (ddof=1) band, one per value of `hue` (a runs column).

    `runs` supplies `hue` when the history lacks it and drops flagged runs unless `include_flagged`.
    """
    if runs is not None:
        keep = runs if include_flagged else runs[~runs["flagged"]]
        cols = ["run_id"] + ([hue] if hue and hue not in history else [])
        history = history.merge(keep[cols], on="run_id")
    metric = history["metric"].iloc[0] if len(history) else "value"
    label, scale = _metric_label(metric)
    fig, (ax,) = _figure(width=5.6)
    groups = list(history.groupby(history[hue].map(_cell_value), sort=True)) if hue else [(None, history)]
    for color, (value, g) in zip(_palette(max(len(groups), 1)), groups):
        stats = g.groupby("step")["value"].agg(["mean", "std", "count"])
        name = f"{hue}={value}" if hue else "all runs"
        ax.plot(stats.index, stats["mean"] * scale, color=color, label=f"{name} (n={stats['count'].max()})")
        ax.fill_between(stats.index, (stats["mean"] - stats["std"].fillna(0)) * scale,
                        (stats["mean"] + stats["std"].fillna(0)) * scale, color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel(label)
    ax.set_title(f"{label}: mean ± std (ddof=1) over seeds", fontsize=10)
    ax.legend(fontsize=7)
    return _done(fig)


def _theta_facets(theta: pd.Series) -> pd.Series:
    if theta.nunique() <= 6:
        return theta.map(lambda t: f"θ = {t:g}")
    return pd.qcut(theta, 4, duplicates="drop").astype(str).map(lambda s: f"θ in {s}")


def plot_stability_map(runs: pd.DataFrame) -> Figure:
    """Each run at (delta, eta), one panel per theta, coloured by its Appendix A outcome.

    Marker size counts the runs at a point; outcomes at one point are drawn side by side. The
    lines are the `decay` condition (delta = 1) and the `eta_gt_delta` reading (eta = delta).
    """
    from matplotlib.ticker import NullFormatter

    facets = _theta_facets(runs["theta"])
    names = sorted(facets.unique(), key=lambda s: runs.loc[facets == s, "theta"].min())
    fig, axes = _figure(len(names), width=4.2, height=3.8, sharey=True)
    kinds, colors = outcome(runs), _outcome_colors()
    log = _log_scale(runs["delta"]) or _log_scale(runs["eta"])
    for ax, name in zip(axes, names):
        for i, kind in enumerate(OUTCOMES):
            sel = runs[(facets == name) & (kinds == kind)]
            if len(sel):
                counts = sel.groupby(["delta", "eta"]).size().reset_index(name="count")
                _dodged(fig, ax, counts["delta"], counts["eta"], 5 * (i - 1.5), s=25 + 25 * counts["count"],
                        color=colors[kind], label=kind, zorder=3, edgecolor="white", linewidth=0.5)
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=1, label="δ = 1 (decay)")
        lo = float(min(runs["delta"].min(), runs["eta"].min()))
        lo = lo if lo > 0 else 1.0
        ax.axline((lo, lo), (2 * lo, 2 * lo), color="grey", linestyle=":", linewidth=1, label="η = δ")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short ranges
        ax.margins(0.15)  # markers at the grid's edges stay whole
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("delta (δ)")
    axes[0].set_ylabel("eta (η)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    fig.suptitle("Appendix A outcome of each run (marker size: runs)", fontsize=10)
    return _done(fig)


def learnable(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that trained their memory rates (`learnable_rates`)."""
    return runs[runs["learnable_rates"].fillna(False).astype(bool)]


def plot_rate_trajectories(history: pd.DataFrame, runs: pd.DataFrame | None = None) -> Figure:
    """Learned delta, eta, theta per epoch, one line per run and a panel per rate.

    `history` is `metric_histories(runs, RATES, ...)`; with `runs`, only learnable runs are drawn,
    coloured by outcome.
    """
    if runs is not None:
        history = history[history["run_id"].isin(learnable(runs)["run_id"])]
    rates = [r for r in RATES if r in set(history["metric"])]
    if not rates:
        raise ValueError("no rate histories (delta, eta, theta) of learnable runs to plot")
    fig, axes = _figure(len(rates), width=3.8)
    kinds = outcome(runs).set_axis(runs["run_id"]) if runs is not None else None
    colors, seen = _outcome_colors(), set()
    for ax, rate in zip(axes, rates):
        for run_id, g in history[history["metric"] == rate].groupby("run_id", sort=False):
            kind = kinds[run_id] if kinds is not None else "passed"
            ax.plot(g["step"], g["value"], color=colors[kind], alpha=0.7, linewidth=1,
                    label=kind if kind not in seen else None)
            seen.add(kind)
        if rate == "delta":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_title(rate, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_integer_ticks())
    axes[0].set_ylabel("rate")
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.append(h)
            labels.append(lab)
    axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    fig.suptitle("learned memory rates (one line per run; dashed: δ = 1)", fontsize=10)
    return _done(fig)


def ablation_figures(runs: pd.DataFrame, fields: Sequence[str], metric: str = "test_error",
                     seeds_expected: int | None = None, include_flagged: bool = False,
                     swept: Sequence[str] = ()) -> dict[str, Figure]:
    """`plot_ablation` for each field, named "ablation_<field>"; the first other `swept` field
    (if any) is the hue, so that configurations differing in it are not pooled."""
    figures = {}
    for f in fields:
        hue = next((s for s in swept if s != f), None)
        figures[f"ablation_{f}"] = plot_ablation(runs, f, metric, seeds_expected, include_flagged, hue)
    return figures


def save_figure(fig: Figure, out_dir: str | Path, name: str, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Write the figure as out_dir/name.<format> for each format; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.{ext}" for ext in formats]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def summary(agg: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """The CSV form of an `aggregate` table: by fields (tuples as "[64, 128]"), n,
    <metric>_mean, <metric>_std (fractions as logged, ddof=1), flagged, complete."""
    metric = metric or agg.attrs.get("metric", "test_error")
    by = agg.attrs.get("by", [])
    out = agg[by].copy()
    for c in by:
        if out[c].map(lambda v: isinstance(v, tuple)).any():
            out[c] = out[c].map(_cell_value)
    out["n"] = agg["n"]
    out[f"{metric}_mean"], out[f"{metric}_std"] = agg["mean"], agg["std"]
    out["flagged"], out["complete"] = agg["flagged"], agg["complete"]
    return out


__all__ = [
    "ABLATION_FIELDS", "BASELINES", "MATCH_FIELDS", "OUTCOMES", "PUBLISHED", "Published",
    "RATES", "RATE_FIELDS", "StudyNotFound", "Table", "ablation_figures", "aggregate", "bootstrap_ci",
    "cast_param", "flag_divergence", "format_table", "learnable", "load_runs", "load_study", "mean_std",
    "metric_histories", "metric_history", "outcome", "outcome_table", "plot_ablation", "plot_curves",
    "plot_rate_trajectories", "plot_stability_map", "save_figure", "sem", "study_info", "summary",
    "swept_fields", "table1", "varying_fields", "welch_p",
]
