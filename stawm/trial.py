"""One Ray Tune trial (`trainable`): train its members, mirror each epoch into their MLflow runs and a Tune report.

A trial's config is the flat Config plus runner keys, all starting with "_" (RUNNER_KEYS). A plain
trial has one member, trained by `engine.train`. A trial whose config lists `_seeds` (--fuse-seeds,
`flags.seed_space`) has one member per seed, trained as one fused model by `fused.train_fused`: each
member keeps its own MLflow run, seed and stability report, and Tune sees their mean.

Studies pass `reuse_actors=True`: one worker process runs trial after trial (torch, the data and
MLflow load once per process, which is most of a small trial's time); on CPU, `peak_memory_mb`
is then the process's peak so far.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from mlflow import MlflowClient
import ray
from ray import tune

from . import schema, tracking
from .bookkeeping import load_training_data
from .config import Config
from .data import DataBundle
from .engine import CHECKPOINT, train
from .fused import FUSED_CHECKPOINT, train_fused
from .gpu_share import trial_device
from .stability import StabilityMonitor
from .tune_checkpoints import checkpoint_uri, keep_only, local_pretrained, member_states, restore_newest, save_state

RUNNER_KEYS = {
    "_study": "the study's name (MLflow experiment)",
    "_experiment_id": "MLflow experiment id of the study",
    "_parent_run_id": "MLflow parent run of the study",
    "_tracking_uri": "MLflow tracking URI; trials on other nodes do not see the driver's environment",
    "_git_commit": "commit of the driver's checkout ($STAWM_GIT_COMMIT in a Ray job, which has no .git)",
    "_git_dirty": "whether that checkout had uncommitted changes (None: unknown)",
    "_source": "the study script (MLflow's source name)",
    "_swept": "the config fields the study varies: a run is named after their values",
    "_data_root": "dataset folder (absolute: Tune moves each trial into its own directory)",
    "_device": "auto, cpu or cuda (auto: CUDA when the trial has a GPU share and sees a GPU; gpu_share.trial_device)",
    "_gpu_fraction": "share of a GPU per trial; below 1 the trial caps its CUDA memory to it",
    "_gpu_overhead_mb": "CUDA memory a trial's process holds outside torch's allocator (probed); off its cap",
    "_fuse_seeds": "--fuse-seeds was given: a trial without `_seeds` is an error (the study cannot fuse)",
    "_seeds": "the seeds one trial trains fused (stawm.fused), one member and MLflow run each",
    "_variant": "dict of config fields set on top of the rest (explicit lists of configurations)",
    "_fail_once_at_epoch": "FAULT INJECTION FOR TESTS ONLY: raise at this epoch (>= 2) on a trial's first attempt",
}


def trainable(config: dict) -> None:
    """One Tune trial: train its members, mirror each epoch into their MLflow runs and a Tune report.

    Retried or restored, it continues from its newest checkpoint and into the same MLflow runs. A
    diverging member stops after its diverged epoch, flagged; its run ends FINISHED and the other
    members go on. An exception ends the open runs FAILED and is re-raised so that Tune retries the trial.
    """
    if config.get("_fuse_seeds") and "_seeds" not in config:
        raise ValueError("--fuse-seeds: this study's search space has no `_seeds`; only studies that take "
                         "their seed axis from runner.seed_space(args) can fuse seeds")
    fused = "_seeds" in config
    cfgs = member_configs(config)
    context = tune.get_context()
    client = MlflowClient(config["_tracking_uri"])
    device, gpu = trial_device(config)
    placement = {schema.NODE: _ray_node(), schema.DEVICE: device, schema.GPU: gpu}
    runs = [tracking.open_trial_run(client, config, cfg, context.get_trial_id(), context.get_trial_name(), placement,
                                    member=k if fused else None) for k, cfg in enumerate(cfgs)]  # (id, resumed)
    checkpoint = tune.get_checkpoint()  # None on a trial's first attempt
    fail_at = config.get("_fail_once_at_epoch", 0) if checkpoint is None else 0
    for stale in Path(tempfile.gettempdir()).glob(f"stawm-{context.get_trial_id()}-*"):  # a killed attempt's
        shutil.rmtree(stale, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"stawm-{context.get_trial_id()}-"))
    members = [{"stability": StabilityMonitor(cfg).report()} for cfg in cfgs]  # before any epoch: the static check
    epoch, open_runs = 0, {k: run_id for k, (run_id, _) in enumerate(runs)}  # member -> its run, until closed
    try:
        if checkpoint is not None:
            checkpoint, state = restore_newest(checkpoint, workdir)
            epoch, members = state["epoch"], member_states(state)
        _close_stopped(client, open_runs, members)  # stopped before the restart: their runs stay closed
        logged = [tracking.last_logged_epoch(client, run_id) if resumed else 0  # killed between a log and its report
                  for run_id, resumed in runs]
        epochs = []
        if open_runs:
            data = load_training_data(cfgs[0], config.get("_data_root") or None, torch.device(device))
            for run_id, _ in runs:
                tracking.ensure_dataset(client, run_id, data)
            epochs = _member_epochs(cfgs, fused, device, data, workdir, resume=checkpoint is not None)
        for records in epochs:
            epoch = next(record["epoch"] for record in records if record is not None)
            if epoch == fail_at:
                raise RuntimeError(f"fault injected at epoch {fail_at} (_fail_once_at_epoch, a test-only knob)")
            results = []  # what Tune would see of each member alone
            for k, record in enumerate(records):
                if record is None:  # fused and stopped in an earlier epoch: it diverged
                    results.append(tune_metrics({}, {"stability": members[k]["stability"], "diverged": True}, cfgs[k]))
                    continue
                metrics, members[k] = member_epoch(record, members[k])
                if epoch > logged[k]:
                    tracking.log_epoch(client, open_runs[k], epoch, metrics, record["stability"])
                results.append(tune_metrics(metrics, record, cfgs[k]))
            save_state(workdir, epoch, members, FUSED_CHECKPOINT if fused else CHECKPOINT)
            tune.report(fused_tune_metrics(results, config["_seeds"]) if fused else results[0],
                        checkpoint=tune.Checkpoint.from_directory(workdir))
            checkpoint = keep_only(tune.get_checkpoint(), checkpoint)  # report returns once it is stored
            uri = checkpoint_uri(checkpoint, FUSED_CHECKPOINT if fused else CHECKPOINT)
            for run_id in open_runs.values():
                tracking.set_checkpoint(client, run_id, uri)
            _close_stopped(client, open_runs, members)  # a diverged member: closed, flagged; the rest go on
    except SystemExit:  # Tune stopped the trial inside tune.report (a scheduler's decision): not a failure
        shutil.rmtree(workdir, ignore_errors=True)  # first: Tune may end this process any moment now
        for k, run_id in open_runs.items():
            tracking.close_run(client, run_id, members[k]["stability"], "FINISHED",
                               stopped_early=epoch < cfgs[k].epochs)
        raise
    except BaseException:
        for k, run_id in open_runs.items():
            tracking.close_run(client, run_id, members[k]["stability"], "FAILED")
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for k, run_id in open_runs.items():
        tracking.close_run(client, run_id, members[k]["stability"], "FINISHED")


def _ray_node() -> str:
    """The Ray node this trial runs on; "" when called outside Ray (a test, a debugger), where asking Ray's
    runtime context would start a local Ray instance in this process."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def trial_config(config: dict) -> Config:
    """The Config of a trial: the flat fields, its `_variant` on top, the Repeater's index as the seed."""
    flat = {k: v for k, v in config.items() if not k.startswith("_")}
    flat.update(config.get("_variant", {}))
    if "__trial_index__" in config:  # ray.tune.search.Repeater(set_index=True): the repeat index is the seed
        flat["seed"] = config["__trial_index__"]
    return Config.from_flat(flat)


def member_configs(config: dict) -> list[Config]:
    """The Configs a trial trains: its one, or with `_seeds` the same config once per seed."""
    cfg = trial_config(config)
    return [cfg.replace(seed=seed) for seed in config["_seeds"]] if "_seeds" in config else [cfg]


def _member_epochs(cfgs: list[Config], fused: bool, device: str, data: DataBundle, workdir: Path,
                   resume: bool) -> Iterator[list[dict | None]]:
    """Per epoch, one record per member: train_fused's list, or engine.train's record as a list of one."""
    cfgs = [local_pretrained(cfg) for cfg in cfgs]
    if fused:
        yield from train_fused(cfgs, device=device, data=data, checkpoint_dir=workdir, resume=resume)
    else:
        yield from ([record] for record in train(cfgs[0], device=device, data=data, checkpoint_dir=workdir,
                                                  resume=resume))


def member_epoch(record: dict, member: dict) -> tuple[dict, dict]:
    """A member's epoch metrics (numeric fields + BEST_TEST_ERROR) and its runner state after the epoch."""
    metrics = {k: float(v) for k, v in record.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
    best = [v for v in (metrics.get(schema.TEST_ERROR, math.nan), member.get(schema.BEST_TEST_ERROR, math.nan))
            if math.isfinite(v)]
    if best:
        metrics[schema.BEST_TEST_ERROR] = min(best)
    member = {"stability": record["stability"], "stopped": record["diverged"],
              **{k: metrics[k] for k in (schema.BEST_TEST_ERROR,) if k in metrics}}
    return metrics, member


def _close_stopped(client: MlflowClient, open_runs: dict[int, str], members: list[dict]) -> None:
    """Close the runs of members that stopped (diverged): FINISHED, their verdict in the tags."""
    for k in [k for k in open_runs if members[k].get("stopped")]:
        tracking.close_run(client, open_runs.pop(k), members[k]["stability"], "FINISHED")


def tune_metrics(metrics: dict, record: dict, cfg: Config) -> dict:
    """What Tune sees: the numbers, the verdict, and an error of 1 for a diverged epoch.

    A diverged epoch has no evaluation. Searchers and schedulers need the metric, and must not prefer
    a region that diverges: counted as wrong on every image. MLflow keeps the honest record (no value).
    """
    report = record["stability"]
    result = {**metrics, "stability_ok": report["ok"], "stability_flags": ",".join(report["failed"]),
              "static_ok": report["static_ok"], "diverged": report["diverged"]}
    if record["diverged"] and cfg.task != "draw":
        for key in schema.ERROR_METRICS if cfg.validation_size > 0 else schema.ERROR_METRICS[:1]:
            result.setdefault(key, 1.0)
    return result


def fused_tune_metrics(results: list[dict], seeds: list[int]) -> dict:
    """What Tune sees of a trial of fused seeds, from what each member alone would report (`tune_metrics`).

    Each number every member has, averaged over the members, and each error metric per seed beside it
    (`test_error_seed3`). A member that stopped counts as diverged (error 1), as its own trial would:
    averaged over the live members only, a configuration would look better as its seeds diverge. The
    verdict holds for all: stable only if every member is, diverged once every member has.
    """
    numbers = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and all(k in r for r in results)]
    report = {k: sum(r[k] for r in results) / len(results) for k in numbers}
    for key in (k for k in schema.ERROR_METRICS if k in report):
        report.update({f"{key}_seed{seed}": r[key] for seed, r in zip(seeds, results)})
    flags = sorted({flag for r in results for flag in r["stability_flags"].split(",") if flag})
    return {**report, "stability_ok": all(r["stability_ok"] for r in results), "stability_flags": ",".join(flags),
            "static_ok": all(r["static_ok"] for r in results), "diverged": all(r["diverged"] for r in results),
            "members_diverged": sum(r["diverged"] for r in results)}
