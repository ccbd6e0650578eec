"""The harness under load: how many trials ran, how many MLflow runs each kept, what was lost, what it cost.

    python analysis/results/harness.py --from analysis/results/memory_rates --from analysis/results/glimpse_count \
        --wall memory_rates=4891 --wall glimpse_count=861 --concurrency 2

reads the shipped results (or, with `--tracking-uri URI --study NAME`, the MLflow store itself) and
prints one Markdown table row per study, the figures BENCHMARKS.md records:
- runs: MLflow trial runs and their statuses; trials: distinct Tune trial ids among them; configurations:
  distinct (swept values, seed), which equals the trials when every trial ran once;
- runs per trial (min-max, by the trial id tag); lost: trials with no FINISHED run, and with `--storage`
  (the studies' Ray storage) also the Tune trial folders that have no MLflow run at all;
- run wall s: a run's wall time, MLflow start to end, mean over runs; s outside the steps: that minus
  the sum of the run's `epoch_seconds` (evaluation, data loading, MLflow logging, checkpoints);
- Ray s per trial: concurrency x the study's wall time (`--wall NAME=SECONDS`, from the study's log),
  minus the sum of the runs' wall times, over the runs: the time a trial slot was not inside a run
  (scheduling, actor start, Tune's own bookkeeping);
- runs span s: the first run's start to the last run's end, from the runs alone (the study's wall time
  less Ray's start and the driver's wind-down, and for a killed study including the time it was down).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from stawm import schema, store_uri
from stawm.analysis import source


def harness_figures(study, wall: float | None, concurrency: int, storage: Path | None = None) -> dict:
    """The figures of one study (an `open_study` result); `wall` in seconds, or None."""
    runs = study.runs
    finished = set(runs.loc[runs["status"] == "FINISHED", "trial_id"])
    trials = set(runs["trial_id"])
    lost = len(trials - finished)
    if storage is not None:  # Tune's folders are named trainable_<experiment>_<index>_...
        folders = {"_".join(p.name.split("_")[1:3]) for p in (storage / study.info.study).glob("trainable_*")}
        lost += len(folders - trials)
    per_trial = runs.groupby("trial_id").size()
    ended = runs.dropna(subset=["end_time"])
    run_wall = (ended["end_time"] - ended["start_time"]).dt.total_seconds()
    steps = study.history(["epoch_seconds"]).groupby("run_id")["value"].sum()
    outside = run_wall.to_numpy() - ended["run_id"].map(steps).fillna(0.0).to_numpy()
    ray_share = (concurrency * wall - run_wall.sum()) / len(runs) if wall else float("nan")
    return {
        "study": study.info.study, "runs": len(runs),
        "statuses": ", ".join(f"{k} {v}" for k, v in runs["status"].value_counts().sort_index().items()),
        "trials": len(trials), "configurations": len(runs.drop_duplicates(study.info.swept + ["seed"])),
        "runs_per_trial": f"{per_trial.min()}-{per_trial.max()}", "lost": lost,
        "run_wall_s": run_wall.mean(), "outside_steps_s": float(pd.Series(outside).mean()),
        "ray_s_per_trial": ray_share, "study_wall_s": wall or float("nan"),
        "runs_span_s": (ended["end_time"].max() - runs["start_time"].min()).total_seconds(),
    }


def markdown_row(f: dict) -> str:
    return (f"| {f['study']} | {f['runs']} ({f['statuses']}) | {f['trials']} | {f['configurations']} | "
            f"{f['runs_per_trial']} | {f['lost']} | {f['run_wall_s']:.1f} | {f['outside_steps_s']:.1f} | "
            f"{f['ray_s_per_trial']:.1f} | {f['study_wall_s']:.0f} | {f['runs_span_s']:.0f} |")


HEADER = ("| study | MLflow runs | trials | configurations | runs per trial | lost | run wall s | "
          "s outside the steps | Ray s per trial | study wall s | runs span s |\n"
          "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")


def store_size(tracking_uri: str) -> str:
    path = store_uri.sqlite_path(tracking_uri)
    artifacts = sum(f.stat().st_size for f in (path.parent / "mlartifacts").rglob("*") if f.is_file())
    return f"MLflow store {path}: {path.stat().st_size / 2**20:.1f} MiB (artifacts {artifacts / 2**20:.1f} MiB)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="folders", action="append", default=[], metavar="FOLDER",
                   help="a study's shipped results (stawm-export); repeat for several")
    p.add_argument("--tracking-uri", help="read --study NAME from this MLflow store instead")
    p.add_argument("--study", action="append", default=[])
    p.add_argument("--storage", type=Path, help="the studies' Ray storage folder (counts trials with no run)")
    p.add_argument("--wall", action="append", default=[], metavar="STUDY=SECONDS")
    p.add_argument("--concurrency", type=int, default=2, help="trials that ran at once")
    args = p.parse_args(argv)
    if not args.folders and not (args.tracking_uri and args.study):
        p.error("give --from FOLDER, or --tracking-uri URI with --study NAME")
    walls = {k: float(v) for k, v in schema.parse_pairs(args.wall, "--wall").items()}
    studies = [source.open_study(results=folder) for folder in args.folders]
    studies += [source.open_study(name, args.tracking_uri, progress=False) for name in args.study]
    if args.tracking_uri and store_uri.sqlite_path(args.tracking_uri) is not None:
        print(store_size(args.tracking_uri))
    print(HEADER)
    for study in studies:
        print(markdown_row(harness_figures(study, walls.get(study.info.study), args.concurrency, args.storage)))


if __name__ == "__main__":
    main()
