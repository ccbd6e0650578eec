"""Shipped results: a study exported from MLflow into a folder of plain files, and read back.

    stawm-export --study NAME --tracking-uri URI --out analysis/results/NAME

writes into the folder (a few MB for hundreds of trials):
- runs.csv: the runs table (store.py's one shape: config fields, final metrics, the verdict);
- history.csv.gz: every metric per epoch (run_id, metric, step, value);
- stability.csv: the epoch each Appendix A condition first failed, per run (source.py's shape);
- study.json: the parent run (seeds, swept fields, params), the command that ran the study and its
  commit, and the command, commit and time of the export;
- README.md: the same, for a person, with the command that rebuilds the report from the folder.

`ExportedStudy(folder)` reads it back with the same interface as `source.MlflowStudy`, so the report
(`stawm-report --from FOLDER`) and the notebooks (`results=FOLDER`) need no MLflow store.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import pandas as pd

from stawm import schema
from stawm.provenance import command_line, git_commit
from stawm.config import field_types

from . import store
from .files import NotWritable, check_writable, write_whole
from .source import MlflowStudy, stability_frame

RUNS, HISTORY, STABILITY, STUDY, README = "runs.csv", "history.csv.gz", "stability.csv", "study.json", "README.md"
BOOLEAN_COLUMNS = ("stability_ok", "flagged", "static_ok", "diverged")


def logged_metrics(runs: pd.DataFrame) -> list[str]:
    """The metrics the runs logged, under their logged names (the learned rates' final_ columns back to theirs)."""
    config = set(field_types())
    names = [c for c in runs.columns if c not in config and c not in store.META + store.STABILITY]
    return [c[len("final_"):] if c.startswith("final_") and c[len("final_"):] in config else c for c in names]


def export_study(study: MlflowStudy, out: Path, command: str) -> list[Path]:
    """Write the study's files into `out` (created), each whole; returns their paths."""
    runs = study.runs
    history = study.history(logged_metrics(runs))
    tags = study.parent_tags
    commits = sorted(set(runs["git_commit"].dropna()))
    meta = {
        "study": study.info.study, "seeds": study.info.seeds, schema.SWEPT: study.info.swept,
        "params": study.info.params, "parents": study.info.parents, "trials": len(runs),
        "ran_with": tags.get(schema.NOTE, "").strip(), "ran_at_commits": commits,
        "exported_with": command, "exported_at_commit": git_commit(),
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        write_whole(out / RUNS, lambda tmp: runs.to_csv(tmp, index=False)),
        write_whole(out / HISTORY, lambda tmp: history.to_csv(tmp, index=False, compression="gzip")),
        write_whole(out / STABILITY, lambda tmp: study.stability().to_csv(tmp, index=False)),
        write_whole(out / STUDY, lambda tmp: tmp.write_text(json.dumps(meta, indent=1, default=str) + "\n")),
        write_whole(out / README, lambda tmp: tmp.write_text(readme(meta, out))),
    ]
    return paths


def readme(meta: dict, out: Path) -> str:
    commands = [line.strip() for line in meta["ran_with"].splitlines()
                if line.strip() and not line.strip().endswith("with")]  # the note: "Started with", its command, ...
    ran = "\n".join(f"    {line}" for line in commands) or "    (not recorded)"
    commits = ", ".join(c[:12] for c in meta["ran_at_commits"]) or "unknown"
    return (f"# Shipped results: study `{meta['study']}`\n\n"
            f"{meta['trials']} trials; seeds per configuration: {meta['seeds']}; "
            f"swept: {', '.join(meta[schema.SWEPT] or [])}.\n\n"
            f"Ran with (commit {commits}):\n\n{ran}\n\n"
            f"Exported at {meta['exported_at']} (commit {meta['exported_at_commit'][:12]}) with:\n\n"
            f"    {meta['exported_with']}\n\n"
            f"Rebuild the report from these files alone:\n\n"
            f"    stawm-report --from {out} --out reports/{meta['study']}\n")


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
        frame = pd.read_csv(self.folder / STABILITY, dtype={"run_id": str, "condition": str, "kind": str})
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


def main(argv=None) -> int:
    """`stawm-export`; the exit status (2: bad input, told in one line on stderr)."""
    p = argparse.ArgumentParser(prog="stawm-export", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="study name (the MLflow experiment)")
    p.add_argument("--tracking-uri", required=True, help="MLflow tracking URI of the study")
    p.add_argument("--out", required=True, type=Path, help="folder for the exported files (created)")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/mlflow-history"),
                   help="cache of finished runs' metric histories (default: .cache/mlflow-history)")
    args = p.parse_args(argv)
    try:
        check_writable(args.out, "--out")
        study = MlflowStudy(args.study, args.tracking_uri, args.cache_dir, progress=False)  # a line, not 15 bars
        print(f"exporting {len(study.runs)} trials of {args.study}: runs, histories, stability reports",
              file=sys.stderr)
        paths = export_study(study, args.out, command_line())
    except (store.StudyNotFound, NotWritable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(path.stat().st_size for path in paths)
    print(f"wrote {len(paths)} files ({size / 2**20:.2f} MiB) for {len(study.runs)} trials to {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
