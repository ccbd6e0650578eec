"""`stawm-replay`: a stopping rule (replay.py) or a search's pruning (prune_replay.py) replayed on shipped studies.

    stawm-replay analysis/results/memory_rates analysis/results/glimpse_size   # the stuck-run rule
    stawm-replay --pruning                                                      # pruning, every shipped study

prints one Markdown table (default: every folder under analysis/results holding a study.json); --csv writes it,
--runs-csv one row per run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
import tyro

from stawm.flags import PositiveInt, at_least, flag, parse

from . import prune_replay
from .files import write_whole
from .replay import RESULTS, replay_studies, stops_markdown
from .source import STUDY
from .store import StudyNotFound


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    write_whole(path, lambda tmp: frame.to_csv(tmp, index=False))


def study_folders(folders: list[Path]) -> list[Path]:
    """The folders named, or every folder under RESULTS holding a study.json; StudyNotFound when there are none."""
    if folders:
        return folders
    found = sorted(path.parent for path in RESULTS.glob(f"*/{STUDY}"))
    if not found:
        raise StudyNotFound(f"no study folders under {RESULTS} here; run from the repository's root or name the "
                            f"folders")
    return found


# --- the command ---------------------------------------------------------------------------------------------

@dataclass
class ReplayArgs:
    """stawm-replay's flags."""

    # export folders (stawm-export) to replay on
    folders: Annotated[list[Path], tyro.conf.Positional, flag(unset="every folder under analysis/results with a "
                                                                     "study.json")] = field(default_factory=list)
    # replay successive-halving pruning of each study's search instead of the stuck-run rule
    pruning: bool = False
    grace_period: PositiveInt = 1  # pruning: the first milestone, in epochs (ASHA's grace_period)
    reduction_factor: at_least(int, 2) = 3  # pruning: 1/INT of the units go on at each milestone (ASHA's)
    csv: Optional[Path] = None  # also write the table(s) as CSV to this file
    runs_csv: Optional[Path] = None  # also write one row per run to this file


def main(argv=None) -> int:
    """`stawm-replay`; the exit status (2: bad input, told in one line on stderr)."""
    args = parse(ReplayArgs, argv, prog="stawm-replay", description=__doc__.split("\n\n")[0])
    try:
        folders = study_folders(args.folders)
        if args.pruning:
            schedule = prune_replay.Schedule(args.grace_period, args.reduction_factor)
            text, table, per_run = prune_replay.replay_studies(folders, schedule)
        else:
            table, per_run = replay_studies(folders)
            text = stops_markdown(table)
        for path, frame in ((args.csv, table), (args.runs_csv, per_run)):
            if path is not None:
                write_csv(frame, path)
    except (StudyNotFound, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
