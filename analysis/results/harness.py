"""The harness under load: how many trials ran, how many MLflow runs each kept, what was lost, what it cost.

    python analysis/results/harness.py --tracking-uri sqlite:///runs/cpu/mlflow.db --storage runs/cpu/ray \
        --study memory_rates --study glimpse_count --wall memory_rates=5623 --concurrency 2

Prints one Markdown table row per study (the figures BENCHMARKS.md records):
- trials: Tune trial folders in the Ray storage; runs: MLflow trial runs; runs per trial (min-max, by
  the trial id tag); lost: trials with no FINISHED run; the store's size;
- per run, seconds outside the training steps: the run's wall time (MLflow start to end) minus the
  sum of its epochs' `epoch_seconds` (evaluation, data loading, MLflow logging, checkpoints);
- Ray's share per trial: concurrency x the study's wall time (`--wall NAME=SECONDS`, from the study's
  log), minus the sum of the runs' wall times, over the trials: the time a trial slot was not inside a
  run (scheduling, actor start, Tune's own bookkeeping).
"""

from __future__ import annotations

import argparse
import collections
import statistics
from pathlib import Path

from mlflow import MlflowClient

from stawm import schema


def study_row(client: MlflowClient, storage: Path, study: str, wall: float | None, concurrency: int) -> str:
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], schema.tag_filter({schema.ROLE: schema.ROLE_TRIAL}),
                              max_results=5000)
    per_trial = collections.Counter(r.data.tags.get(schema.TRIAL_ID) for r in runs)
    finished = {r.data.tags.get(schema.TRIAL_ID) for r in runs if r.info.status == "FINISHED"}
    folders = {p.name.split("_")[1] + "_" + p.name.split("_")[2] for p in (storage / study).glob("trainable_*")}
    lost = len(folders - finished)
    run_walls, outside = [], []
    for run in runs:
        if run.info.end_time is None:
            continue
        seconds = (run.info.end_time - run.info.start_time) / 1000
        epochs = sum(m.value for m in client.get_metric_history(run.info.run_id, "epoch_seconds"))
        run_walls.append(seconds)
        outside.append(seconds - epochs)
    share = (concurrency * wall - sum(run_walls)) / len(runs) if wall else float("nan")
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(r.info.status for r in runs).items()))
    return (f"| {study} | {len(folders)} | {len(runs)} ({statuses}) | {min(per_trial.values())}-"
            f"{max(per_trial.values())} | {lost} | {statistics.mean(run_walls):.1f} | "
            f"{statistics.mean(outside):.1f} | {share:.1f} | {wall or float('nan'):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--storage", type=Path, required=True, help="the studies' Ray storage folder")
    p.add_argument("--study", action="append", required=True)
    p.add_argument("--wall", action="append", default=[], metavar="STUDY=SECONDS")
    p.add_argument("--concurrency", type=int, default=2, help="trials that ran at once")
    args = p.parse_args()
    walls = {k: float(v) for k, v in schema.parse_pairs(args.wall, "--wall").items()}
    client = MlflowClient(args.tracking_uri)
    store = Path(args.tracking_uri[len("sqlite:///"):])
    artifacts = sum(f.stat().st_size for f in (store.parent / "mlartifacts").rglob("*") if f.is_file())
    print(f"MLflow store {store}: {store.stat().st_size / 2**20:.1f} MiB (artifacts {artifacts / 2**20:.1f} MiB)")
    print("| study | trials | MLflow runs | runs per trial | lost | run wall s | s outside the steps | "
          "Ray s per trial | study wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for study in args.study:
        print(study_row(client, args.storage, study, walls.get(study), args.concurrency))


if __name__ == "__main__":
    main()
