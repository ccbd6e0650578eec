"""Re-check the Appendix A conditions of a shipped study on its recorded rates, in place.

    python analysis/results/recheck_conditions.py analysis/results/glimpse_count

rewrites the folder's runs.csv (`stability_ok`, `flags`, `flagged`, `static_ok`) and stability.csv with
today's conditions (`stawm.conditions`; analysis/recheck.py says how), and adds a line to its README.md
naming this command and the commit. For studies exported before the conditions were rewritten; no training.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from stawm import schema
from stawm.analysis import source
from stawm.analysis.recheck import recheck
from stawm.provenance import command_line, git_state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a folder of shipped results (stawm-export)")
    args = p.parse_args(argv)
    study = source.ExportedStudy(args.folder)
    runs, stability = recheck(study.runs, study.history(schema.RATE_METRICS))
    before = int(study.runs["flagged"].sum())
    raw = pd.read_csv(args.folder / source.RUNS, dtype=str, keep_default_na=False)
    for column in ("stability_ok", "flagged", "static_ok"):
        raw[column] = runs[column].map(lambda v: str(bool(v)))
    raw["flags"] = runs["flags"]
    raw.to_csv(args.folder / source.RUNS, index=False)
    stability.to_csv(args.folder / source.STABILITY, index=False)
    commit, dirty = git_state()
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(args.folder / "README.md", "a") as readme:
        readme.write(f"\nConditions re-checked on the recorded rates at {when} (commit {commit[:12]}"
                     f"{'-dirty' if dirty else ''}) with today's Appendix A conditions (stawm.conditions); "
                     f"flagged runs {before} -> {int(runs['flagged'].sum())}:\n\n    {command_line()}\n")
    print(f"{args.folder}: {len(runs)} runs, flagged {before} -> {int(runs['flagged'].sum())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
