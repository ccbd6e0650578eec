"""What MLflow's system metrics (--system-metrics) cost a trial, measured: a benchmark that prints figures.

    python -m stawm.study.system_metrics_cost [--repeats 4] [--epochs 10] [--sampling 1]

Two figures, side by side in one run:
- one sample's work, timed in this thread: what the monitor's thread does every sampling interval (read CPU,
  memory, disk, network and, with NVML, the GPUs; aggregate; log the batch; ask the store whether the run is still
  RUNNING), as a share of the default 10 s interval;
- a tiny trial's training time with the monitor sampling every `--sampling` s (10x the default rate, so that its
  cost shows above the noise) against none, after one warm-up training, `--repeats` pairs in alternating order.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from mlflow import MlflowClient

from ..config import preset
from ..train import train
from . import environment


def sample_seconds(uri: str, run_id: str, samples: int) -> list[float]:
    """Seconds of one monitor sample each, done in this thread as the monitor's thread does it."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor, client, took = SystemMetricsMonitor(run_id, tracking_uri=uri), MlflowClient(uri), []
    for _ in range(samples):
        start = time.perf_counter()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
        client.get_run(run_id)  # the monitor asks after each sample whether to go on
        took.append(time.perf_counter() - start)
    return took


def train_seconds(uri: str, client: MlflowClient, experiment: str, on: bool, epochs: int) -> float:
    """Wall seconds of a tiny trial's training, with the monitor on its run or not."""
    cfg = preset("tiny", dataset="mnist-sample", epochs=epochs, seed=0)
    run_id = client.create_run(experiment).info.run_id
    with environment.system_metrics([run_id], uri, resumed=False, on=on):
        start = time.perf_counter()
        for _ in train([cfg], device="cpu"):
            pass
        took = time.perf_counter() - start
    client.set_terminated(run_id)
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="pairs of trainings (on, off), the order alternating")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the tiny preset per training")
    parser.add_argument("--sampling", type=float, default=1.0, help="seconds between samples while training")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as a trial with one CPU
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        client = MlflowClient(uri)
        experiment = client.create_experiment("cost")
        samples = sample_seconds(uri, client.create_run(experiment).info.run_id, samples=20)
        median = statistics.median(samples)
        print(f"one sample: median {median * 1e3:.1f} ms over {len(samples)} (max {max(samples) * 1e3:.1f} ms) "
              f"= {median / environment.SAMPLING_S:.3%} of one core at the default {environment.SAMPLING_S:.0f} s "
              f"interval; GPU readings: {'NVML' if environment.nvidia_driver_version() != 'unknown' else 'none'}")
        os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = str(args.sampling)  # MLflow's own override
        train_seconds(uri, client, experiment, False, args.epochs)  # warm-up: the data, torch's first steps
        pairs = []
        for repeat in range(args.repeats):  # on first, then off first: neither gains from going second
            order = (True, False) if repeat % 2 == 0 else (False, True)
            took = {on: train_seconds(uri, client, experiment, on, args.epochs) for on in order}
            pairs.append((took[True], took[False]))
        ratios = [on / off for on, off in pairs]
        print(f"training with samples every {args.sampling:g} s against none: "
              + ", ".join(f"{on:.1f} s / {off:.1f} s" for on, off in pairs)
              + f"; ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
