"""One Ray Tune trial (`trainable`): train its members, mirror each epoch into their MLflow runs and a Tune report.

A trial's config is the flat Config plus runner keys, all starting with "_" (RUNNER_KEYS). A trial
trains one member per seed (`member_seeds`): one, or with `_seeds` (--fuse-seeds, `flags.seed_space`)
several, which the loop (`stawm.train.train`) trains as one fused model. Each member keeps its own MLflow
run, seed and stability report; Tune sees their mean (`tune_report`).

Studies pass `reuse_actors=True`: one worker process runs trial after trial (torch, the data and
MLflow load once per process, which is most of a small trial's time); on CPU, `peak_memory_mb`
is then the process's peak so far.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
import ray
from ray import tune

from .. import schema
from ..config import Config
from ..model.stability import StabilityMonitor
from ..train import CHECKPOINT, train
from ..train.data import load_training_data
from . import outbox, tracking
from .gpu_share import trial_device
from .tune_checkpoints import checkpoint_uri, keep_only, local_pretrained, newest_state, restore_newest, save_state

RUNNER_KEYS = {
    "_study": "the study's name (MLflow experiment)",
    "_experiment_id": "MLflow experiment id of the study",
    "_parent_run_id": "MLflow parent run of the study",
    "_tracking_uri": "MLflow tracking URI; trials on other nodes do not see the driver's environment",
    "_tracking_outage_budget": "seconds a trial rides out a tracking server that does not answer (outbox)",
    "_git_commit": "commit of the driver's checkout ($STAWM_GIT_COMMIT in a Ray job, which has no .git)",
    "_git_dirty": "whether that checkout had uncommitted changes (None: unknown)",
    "_source": "the study script (MLflow's source name)",
    "_swept": "the config fields the study varies: a run is named after their values",
    "_data_root": "dataset folder (absolute: Tune moves each trial into its own directory)",
    "_device": "auto, cpu or cuda (auto: CUDA when the trial has a GPU share and sees a GPU; gpu_share.trial_device)",
    "_gpu_fraction": "share of a GPU per trial; below 1 the trial caps its CUDA memory to it",
    "_gpu_overhead_mb": "CUDA memory a trial's process holds outside torch's allocator (probed); off its cap",
    "_fuse_seeds": "--fuse-seeds was given: a trial without `_seeds` is an error (the study cannot fuse)",
    "_seeds": "the seeds one trial trains fused (K members of one loop), one member and MLflow run each",
    "_variant": "dict of config fields set on top of the rest (explicit lists of configurations)",
}

UNLOGGED = "unlogged"  # in a member's saved runner state: the epochs its run did not hold yet (the outbox's)


@dataclass
class Member:
    """One member of a trial: its Config, its MLflow run, and what the trial keeps of it between epochs."""

    cfg: Config
    run_id: str
    resumed: bool  # the run existed: a retried or restored trial goes on in it
    state: dict  # the runner state: its stability report, best test error, whether it stopped (checkpointed)
    open: bool = True  # its run is RUNNING


def trainable(config: dict) -> None:
    """One Tune trial: train its members, mirror each epoch into their MLflow runs and a Tune report.

    Retried or restored, it continues from its newest checkpoint and into the same MLflow runs. A
    diverging member stops after its diverged epoch, flagged; its run ends FINISHED and the other
    members go on. An exception ends the open runs FAILED and is re-raised so that Tune retries the trial.
    A tracking server that stops answering is ridden out (`stawm.study.outbox`): the epochs wait in the
    trial's outbox, and in its checkpoints, until it answers again or the outage budget runs out.
    """
    if config.get("_fuse_seeds") and "_seeds" not in config:
        raise ValueError("--fuse-seeds: this study's search space has no `_seeds`; only studies that take "
                         "their seed axis from runner.seed_space(args) can fuse seeds")
    cfgs = member_configs(config)
    context = tune.get_context()
    outbox.bound_client_retries()
    client = MlflowClient(config["_tracking_uri"])
    server = outbox.Server(config["_tracking_uri"], config.get("_tracking_outage_budget", outbox.DEFAULT_BUDGET_S),
                           f"trial {context.get_trial_name()}")
    checkpoint = tune.get_checkpoint()  # None on a trial's first attempt
    if checkpoint is not None:  # a retry in an outage goes on counting it: the budget is the trial's, not the attempt's
        server.went_on(newest_state(checkpoint)[1].get("tracking_down_since"))
    device, gpu = trial_device(config)
    placement = {schema.NODE: _ray_node(), schema.DEVICE: device, schema.GPU: gpu}
    members = [Member(cfg, *server.wait_call(tracking.open_trial_run, client, config, cfg, context.get_trial_id(),
                                             context.get_trial_name(), placement, k if len(cfgs) > 1 else None,
                                             doing="waits to open its runs"),
                      state={"stability": StabilityMonitor(cfg).report()})  # before any epoch: the static check
               for k, cfg in enumerate(cfgs)]
    box = outbox.Outbox(client, server)
    for stale in Path(tempfile.gettempdir()).glob(f"stawm-{context.get_trial_id()}-*"):  # a killed attempt's
        shutil.rmtree(stale, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"stawm-{context.get_trial_id()}-"))
    epoch = 0
    try:
        if checkpoint is not None:
            checkpoint, saved = restore_newest(checkpoint, workdir)
            epoch = saved["epoch"]
            for member, state in zip(members, saved["members"]):
                member.state = state
        for member in members:  # what the run holds, and what the checkpoint kept unlogged
            logged = (server.wait_call(tracking.last_logged_epoch, client, member.run_id, doing="waits to resume")
                      if member.resumed else 0)
            box.track(member.run_id, logged, member.state.pop(UNLOGGED, []))
            if checkpoint is not None:
                box.checkpoint(member.run_id, checkpoint_uri(checkpoint, CHECKPOINT))
        _close_stopped(box, members)  # stopped before the restart: their runs stay closed
        epochs = []
        if any(member.open for member in members):
            data = load_training_data(cfgs[0], config.get("_data_root") or None, torch.device(device))
            for member in members:
                server.wait_call(tracking.ensure_dataset, client, member.run_id, data, doing="waits to log its dataset")
            epochs = train([local_pretrained(cfg) for cfg in cfgs], device=device, data=data, checkpoint_dir=workdir,
                           resume=checkpoint is not None)
        for records in epochs:
            epoch = next(record["epoch"] for record in records if record is not None)
            results = [_epoch(box, member, record, epoch) for member, record in zip(members, records)]
            box.flush()
            save_state(workdir, epoch, [{**member.state, UNLOGGED: box.unlogged(member.run_id)} for member in members],
                       server.down_since)
            tune.report({**tune_report(results, [cfg.seed for cfg in cfgs]), **server.counts()},
                        checkpoint=tune.Checkpoint.from_directory(workdir))
            checkpoint = keep_only(tune.get_checkpoint(), checkpoint)  # report returns once it is stored
            uri = checkpoint_uri(checkpoint, CHECKPOINT)
            for member in members:
                if member.open:
                    box.checkpoint(member.run_id, uri)
            box.flush()  # the checkpoint tags
            _close_stopped(box, members)  # a diverged member: closed, flagged; the rest go on
            server.check_budget(box.describe())  # after the checkpoint: it holds every epoch still unlogged
        box.drain()
    except SystemExit:  # Tune stopped the trial inside tune.report (a scheduler's decision): not a failure
        shutil.rmtree(workdir, ignore_errors=True)  # first: Tune may end this process any moment now
        for member in members:
            _close_now(box, member, "FINISHED", stopped_early=epoch < member.cfg.epochs)
        raise
    except BaseException:
        for member in members:
            _close_now(box, member, "FAILED")
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for member in members:
        if member.open:
            server.wait_call(_close, box.client, member, "FINISHED", doing="waits to close its runs")


def _epoch(box: outbox.Outbox, member: Member, record: dict | None, epoch: int) -> dict:
    """A member's epoch into its outbox (once) and its state; returns what Tune would see of it alone."""
    if record is None:  # stopped in an earlier epoch: it diverged
        return tune_metrics({}, {"stability": member.state["stability"], "diverged": True}, member.cfg)
    metrics, member.state = member_epoch(record, member.state)
    box.add(member.run_id, epoch, metrics, record["stability"])
    return tune_metrics(metrics, record, member.cfg)


def _close(client: MlflowClient, member: Member, status: str, **kwargs) -> None:
    """End the member's run if it is still open, its verdict in the tags."""
    if member.open:
        tracking.close_run(client, member.run_id, member.state["stability"], status, **kwargs)
        member.open = False


def _close_now(box: outbox.Outbox, member: Member, status: str, **kwargs) -> None:
    """Close the member's run on the way out (failed, or stopped by Tune): its queued epochs first, with one try
    each and no wait. A server that does not answer leaves the run RUNNING, its epochs in the last checkpoint:
    a retry or --resume logs them, and the driver closes what stays open (`runner.finish_study`)."""
    if member.open and box.server.down_since is None and box.flush():
        box.server.try_call(_close, box.client, member, status, **kwargs)


def _close_stopped(box: outbox.Outbox, members: list[Member]) -> None:
    """Close the runs of members that stopped (diverged), once their epochs are logged: FINISHED, their verdict
    in the tags. While the server does not answer they stay open, and close at a later epoch or the end."""
    for member in members:
        if member.open and member.state.get("stopped") and box.flush():
            box.server.try_call(_close, box.client, member, "FINISHED")


def _ray_node() -> str:
    """The Ray node this trial runs on; "" when called outside Ray (a test, a debugger), where asking Ray's
    runtime context would start a local Ray instance in this process."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def trial_config(config: dict) -> Config:
    """The Config of a trial: the flat fields with its `_variant` on top, and its (first) member's seed."""
    flat = {k: v for k, v in config.items() if not k.startswith("_")}
    flat.update(config.get("_variant", {}))
    return Config.from_flat({**flat, "seed": member_seeds(config)[0]})


def member_seeds(config: dict) -> list[int]:
    """The seeds a trial trains, one member each: the one place a trial's seed is worked out.

    `_seeds` (fused seeds), else the Repeater's index (ray.tune.search.Repeater(set_index=True): the repeat
    index is the seed), else a `_variant`'s seed, else the config's (a `seed` grid value, or the preset's)."""
    if "_seeds" in config:
        return list(config["_seeds"])
    if "__trial_index__" in config:
        return [config["__trial_index__"]]
    return [config.get("_variant", {}).get("seed", config.get("seed", 0))]


def member_configs(config: dict) -> list[Config]:
    """The Configs a trial trains, one per member seed."""
    cfg = trial_config(config)
    return [cfg.replace(seed=seed) for seed in member_seeds(config)]


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


def tune_report(results: list[dict], seeds: list[int]) -> dict:
    """What Tune sees of a trial, from what each member alone would report (`tune_metrics`).

    Each number every member has, averaged over the members, and with several members each error metric
    per seed beside it (`test_error_seed3`). A member that stopped counts as diverged (error 1), as its own trial would:
    averaged over the live members only, a configuration would look better as its seeds diverge. The
    verdict holds for all: stable only if every member is, diverged once every member has.
    """
    numbers = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and all(k in r for r in results)]
    report = {k: sum(r[k] for r in results) / len(results) for k in numbers}
    for key in (k for k in schema.ERROR_METRICS if k in report and len(results) > 1):
        report.update({f"{key}_seed{seed}": r[key] for seed, r in zip(seeds, results)})
    flags = sorted({flag for r in results for flag in r["stability_flags"].split(",") if flag})
    return {**report, "stability_ok": all(r["stability_ok"] for r in results), "stability_flags": ",".join(flags),
            "static_ok": all(r["static_ok"] for r in results), "diverged": all(r["diverged"] for r in results),
            "members_diverged": sum(r["diverged"] for r in results)}
