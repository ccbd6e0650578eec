"""The study's report on its parent run: when a study ends, the tables and plots `stawm-report` makes of it are
written and logged as artifacts of its parent run (under `schema.REPORT_ARTIFACT_DIR`), so that the run the study's
last line links to holds them; a study resumed or given more seeds writes it again, over all its runs.

Why a subprocess (`python -m stawm.analysis.report`, the command behind `stawm-report`): the study layer never
imports the analysis, the layer above it (README's layout), and a report that fails or hangs must not change how
the study ends. Its time is bounded (`REPORT_TIMEOUT_S`); a report that does not come is one line saying why (the
report's own last line on stderr) and the command that makes it by hand, and the study keeps its exit status.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from .. import schema
from ..provenance import PROJECT_ROOT, redact

# A study of hundreds of runs on a remote tracking server fetches every run's history: minutes, not hours
REPORT_TIMEOUT_S = 600.0
ANALYSIS_NEEDS = ("pandas", "scipy", "seaborn", "pyarrow")  # what the [analysis] extra adds to a study's install


def scored_on(config: dict) -> str | None:
    """The metric a study's report tabulates: VAL_ERROR where its trials hold out a validation split (a search's
    first stage, scored on it: its table must not rank suggestions by the test set the search never looks at),
    else None, the report's own default (the test error)."""
    return schema.VAL_ERROR if config.get("validation_size", 0) > 0 else None


def by_hand(study: str, tracking_uri: str, metric: str | None = None) -> str:
    """The command that writes the report by hand (README's form), credentials redacted."""
    return (f"stawm-report --study {shlex.quote(study)} --tracking-uri {shlex.quote(redact(tracking_uri))} "
            f"--out {shlex.quote(f'reports/{study}')}" + (f" --metric {metric}" if metric else ""))


def report_module() -> str:
    """The report's module: the installed `stawm.analysis.report`, else this checkout's `analysis.report` (an
    uninstalled checkout, as a Ray job's working dir is: PROJECT_ROOT goes on the subprocess's PYTHONPATH).
    Found, not imported: this layer never imports the analysis."""
    try:
        if importlib.util.find_spec("stawm.analysis") is not None:
            return "stawm.analysis.report"
    except ImportError:
        pass
    return "analysis.report"


def report_command(study: str, tracking_uri: str, out: Path, cache: Path, metric: str | None = None) -> list[str]:
    """`stawm-report` as this interpreter's module, into `out`, its history cache in `cache` (a temporary folder:
    not the working folder's .cache), the files left unlogged: `log_report` logs them on the known parent run."""
    return [sys.executable, "-m", report_module(), "--study", study, "--tracking-uri", tracking_uri,
            "--out", str(out), "--cache-dir", str(cache), "--no-log", *(["--metric", metric] if metric else [])]


def run_report(study: str, tracking_uri: str, out: Path, timeout_s: float, metric: str | None = None) -> str | None:
    """Writes the report into `out`; None if it did, else why not, in a few words."""
    missing = [name for name in ANALYSIS_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        return f"the analysis is not installed here (no {', '.join(missing)}: pip install the [analysis] extra)"
    env = {**os.environ, "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
    command = report_command(study, tracking_uri, out, out.parent / "cache", metric)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"it took more than {timeout_s:g} s and was stopped"
    except OSError as err:
        return f"it could not start: {err}"
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        return f"exit status {done.returncode}: {redact(lines[-1]) if lines else 'nothing on stderr'}"
    return None


def log_report(tracking_uri: str, run_id: str, folder: Path) -> str | None:
    """Logs every file of `folder` on run `run_id` under REPORT_ARTIFACT_DIR (a terminated run takes artifacts);
    None if it did, else why not. A file of an earlier report of the same name is replaced."""
    try:
        MlflowClient(tracking_uri).log_artifacts(run_id, str(folder), schema.REPORT_ARTIFACT_DIR)
    except Exception as err:  # the study has ended whatever the store answers: any failure is the one line
        first = (redact(str(err)).strip().splitlines() or [""])[0]
        return f"logging it on the parent run failed: {type(err).__name__}: {first}"
    return None


def write_report(study: str, tracking_uri: str, run_id: str, *, metric: str | None = None,
                 timeout_s: float = REPORT_TIMEOUT_S, skip: str = "") -> bool:
    """The report of study `study` written and logged on its parent run `run_id`, one line before and one after;
    True if it was. Never raises for a report that does not come: it says why in one line and returns False.
    `metric`: the report's --metric (`scored_on`); `skip`: why not to try (the tracking server did not answer at the
    study's end), said in that line."""
    why, start = skip or None, time.monotonic()
    if not skip:
        print(f"writing the report on the parent run {run_id} (stawm-report, at most {timeout_s:g} s) ...",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="stawm-report-") as tmp:
            out = Path(tmp) / schema.REPORT_ARTIFACT_DIR
            why = run_report(study, tracking_uri, out, timeout_s, metric) or log_report(tracking_uri, run_id, out)
            files = len(list(out.iterdir())) if why is None else 0
    if why is not None:
        print(f"the report did not come ({why}); make it by hand: {by_hand(study, tracking_uri, metric)}", flush=True)
        return False
    print(f"report: {files} files on the parent run under {schema.REPORT_ARTIFACT_DIR}/ "
          f"({time.monotonic() - start:.0f} s)", flush=True)
    return True
