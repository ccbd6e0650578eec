"""Shipped results: a study exported from MLflow into a folder of plain files, and read back.

    stawm-export --study NAME --tracking-uri URI --out analysis/results/NAME

writes into the folder (a few MB for hundreds of trials):
- runs.csv: the runs table (store.py's one shape: config fields, final metrics, the verdict);
- history.csv.gz: every metric per epoch (run_id, metric, step, value);
- stability.csv: the epoch each Appendix A condition first failed, per run (source.py's shape);
- study.json: the parent run (seeds, swept fields, params), the command that ran the study and its
  commit, and the command, commit and time of the export;
- README.md: the same, for a person, with the command that rebuilds the report from the folder.

`source.ExportedStudy(folder)` reads it back with the same interface as `source.MlflowStudy`, so the
report (`stawm-report --from FOLDER`) and the notebooks (`results=FOLDER`) need no MLflow store.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from stawm import schema
from stawm.flags import Group, StoreFlags, default_tracking_uri, flat, parse
from stawm.provenance import command_line, git_commit
from stawm.config import field_types

from . import store
from .files import NotWritable, check_writable, write_whole
from .source import HISTORY, RUNS, STABILITY, STUDY, MlflowStudy

README = "README.md"


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
        "seeds_by_commit": seeds_by_commit(runs),
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


def seeds_by_commit(runs: pd.DataFrame) -> dict[str, str]:
    """Which seeds each commit trained ("0-2", "3,4"): a study extended with more seeds ran its seeds at several."""
    def spans(seeds: list[int]) -> str:
        return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2 else (
            ",".join(map(str, seeds)))

    known = runs.dropna(subset=["git_commit", "seed"])
    return {commit: spans(sorted({int(s) for s in group["seed"]})) for commit, group in known.groupby("git_commit")}


def readme(meta: dict, out: Path) -> str:
    commands = [line.strip() for line in meta["ran_with"].splitlines()
                if line.strip() and not line.strip().endswith("with")]  # the note: "Started with", its command, ...
    ran = "\n".join(f"    {line}" for line in commands) or "    (not recorded)"
    by_commit = meta.get("seeds_by_commit") or {}
    commits = ", ".join(f"{c[:12]}: seeds {by_commit[c]}" if c in by_commit else c[:12]
                        for c in meta["ran_at_commits"]) or "unknown"
    return (f"# Shipped results: study `{meta['study']}`\n\n"
            f"{meta['trials']} trials; seeds per configuration: {meta['seeds']}; "
            f"swept: {', '.join(meta[schema.SWEPT] or [])}.\n\n"
            f"Ran with (commit {commits}):\n\n{ran}\n\n"
            f"Exported at {meta['exported_at']} (commit {meta['exported_at_commit'][:12]}) with:\n\n"
            f"    {meta['exported_with']}\n\n"
            f"Rebuild the report from these files alone:\n\n"
            f"    stawm-report --from {out} --out reports/{meta['study']}\n")


@flat("store")  # args.tracking_uri, args.cache_dir: see stawm.flags.flat
@dataclass
class ExportArgs:
    """stawm-export's own flags, and the MLflow store it reads (the group stawm-report shares)."""

    study: str  # study name (the MLflow experiment)
    out: Path  # folder for the exported files (created)
    store: Group[StoreFlags] = field(default_factory=StoreFlags)


def main(argv=None) -> int:
    """`stawm-export`; the exit status (2: bad input, told in one line on stderr)."""
    args = parse(ExportArgs, argv, prog="stawm-export", description=__doc__.split("\n\n")[0])
    args.tracking_uri = args.tracking_uri or default_tracking_uri()
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
