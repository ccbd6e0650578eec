"""MLflow: a study's experiment and parent run, one child run per Tune trial (and member), kept current.

The layout is `stawm.schema`'s (its docstring): every tag, param, metric and artifact name written here
is read from it when the function runs, so that a rename there renames what lands in the store.

A child run is keyed to the Ray Tune trial id (and, for fused seeds, the member index) rather than
opened afresh: a retried trial or a restored study continues its run, so every trial keeps exactly
one MLflow run (MLflow's own Tune callback opens a second run for every trial resumed by
`Tuner.restore`). The trial's verdict (the stability tags) is rewritten every epoch, so that a
run whose process dies mid-study still says how far it got.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import CodeDatasetSource, LocalArtifactDatasetSource
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from .. import schema
from ..config import Config
from ..model.stability import StabilityMonitor
from ..provenance import PROJECT_ROOT, command_line, redact
from ..store_uri import sqlite_path
from ..train.data import DataBundle
from .context import TrialContext
from . import environment
from .preflight import PreflightError

NOT_PARAMS = ("set", "resume")  # flags the parent records otherwise (set: joined) or not at all


def experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of the experiment `name`, created if new (artifacts beside a sqlite database), with the tags that
    make MLflow 3's UI open on its training runs and offer the view of seeds grouped by configuration."""
    found = client.get_experiment_by_name(name)
    tags = {schema.EXPERIMENT_KIND: schema.EXPERIMENT_KIND_TRAINING,  # MLflow 3's UI: open on the training runs
            schema.shared_view(schema.BY_CONFIG_VIEW): BY_CONFIG}
    if found is not None:
        for key, value in tags.items():
            if found.tags.get(key) != value:
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    location, database = None, sqlite_path(tracking_uri)
    if database is not None:  # artifacts beside the database, not in whatever cwd the driver has
        location = (database.resolve().parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location, tags=tags)


# The experiment's view of seeds grouped by configuration, as MLflow 3's UI saves a view it shares (a JSON experiment
# tag its URL names: `ui_page`): trial runs grouped by schema.CONFIG, each group's mean in the table and mean with its
# min-max band in the charts, the error columns shown, the charts of error metrics first.
BY_CONFIG = json.dumps({
    "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": schema.CONFIG}]},
    "selectedColumns": [f"metrics.`{schema.TEST_ERROR}`", f"metrics.`{schema.BEST_TEST_ERROR}`",
                        f"tags.`{schema.CONFIG}`", "attributes.`Models`"],
    "useGroupedValuesInCharts": True, "chartsSearchFilter": "error"})


def ui_page(experiment_id: str, grouped: bool = True) -> str:
    """The path (after the UI's address) of the experiment's training runs in MLflow 3's UI; `grouped`: in the view of
    seeds grouped by configuration. (MLflow 3.17's UI opens on its GenAI view whatever the experiment's kind tag
    says; the URL chooses training.)"""
    view = f"viewStateShareKey={schema.BY_CONFIG_VIEW}&" if grouped else ""
    return f"#/experiments/{experiment_id}/runs?{view}workflowType=machine_learning"


def source_name() -> str:
    """The study script, relative to the checkout when it lies inside it (what MLflow shows as the source)."""
    script = Path(sys.argv[0]).resolve()
    return str(script.relative_to(PROJECT_ROOT)) if script.is_relative_to(PROJECT_ROOT) else sys.argv[0]


def source_tags(source: str, commit: str, dirty: bool | None) -> dict[str, str]:
    """MLflow's own source tags, which its UI shows in the runs table and on each run, and whether the tree
    had uncommitted changes (`provenance.git_state`)."""
    return {schema.SOURCE_NAME: source, schema.SOURCE_TYPE: schema.SOURCE_TYPE_LOCAL, schema.GIT_COMMIT: commit,
            **({} if dirty is None else {schema.GIT_DIRTY: schema.tag_bool(dirty)})}


def check_artifacts(client: MlflowClient, experiment_id: str) -> None:
    """Write a small artifact where the study's runs will write theirs, and delete it; PreflightError if either fails.

    Trials log their config and stability report as artifacts, through the tracking server (proxied) or
    straight to the experiment's artifact location (s3://...): a wrong bucket or missing rights would
    otherwise fail every trial at its first artifact, after its training."""
    from mlflow.artifacts import get_artifact_repository  # a registry of stores (local, s3, mlflow-artifacts, ...)

    location = client.get_experiment(experiment_id).artifact_location.rstrip("/")
    probe = f"{location}/.stawm-preflight-{uuid.uuid4().hex}"
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "probe.txt"
            path.write_text("ok")
            repository = get_artifact_repository(probe, tracking_uri=client.tracking_uri)  # not the global one
            repository.log_artifact(str(path))
            repository.delete_artifacts()
    except Exception as err:  # any store, any failure: a permission, a bucket, a server refusing
        cause = " ".join(str(err).split())[:300]
        raise PreflightError(f"cannot write MLflow artifacts to {redact(location)}: {type(err).__name__}: {cause}"
                             f" (check the tracking server's --artifacts-destination and its rights)") from None


def value_text(value) -> str:
    """A config value as a run name shows it: floats to 4 significant digits, tuples as 64,128."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def run_name(values: dict, swept: list[str]) -> str:
    """A trial's run name: its swept values, then its seed ("glimpse_size=8 seed=1")."""
    return " ".join(f"{k}={value_text(values[k])}" for k in [*[s for s in swept if s != "seed"], "seed"]
                    if k in values)


def config_label(values: dict, swept: list[str]) -> str:
    """A trial's configuration: its run name without the seed ("glimpse_size=8"), the same for every seed of it
    (schema.CONFIG, what MLflow's UI groups runs by); a study that sweeps nothing has one, its preset."""
    return (" ".join(f"{k}={value_text(values[k])}" for k in swept if k != "seed" and k in values)
            or f"preset={values.get('preset', '')}")


# --- the study's parent run ---------------------------------------------------------------------


def find_study_run(client: MlflowClient, experiment_id: str, name: str):
    """The newest parent run of study `name`, or None."""
    found = client.search_runs([experiment_id], schema.tag_filter({schema.ROLE: schema.ROLE_STUDY, schema.STUDY: name}),
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def study_params(args, swept: list[str]) -> dict:
    """The parent run's params: the study's flags (its own too, and each --config.FIELD given: `StudyArgs.flags`),
    the seeds, the swept fields, the epochs each trial trains and, with --gpus-per-trial auto, the share chosen
    (`gpu_share.choose`)."""
    flags = {k: v for k, v in args.flags().items() if k not in NOT_PARAMS}
    params = {**flags, "set": ",".join(args.set), schema.SEEDS: args.seeds,
              schema.SWEPT: ",".join(s for s in swept if s != "seed"), "epochs": args.config["epochs"],
              **({"gpus_per_trial": "auto", **args.gpu_choice} if args.gpu_choice else {})}
    return {k: redact(v) if isinstance(v, str) else v for k, v in params.items()}  # URIs may carry passwords


def create_study_run(client: MlflowClient, experiment_id: str, name: str, params: dict, source: str,
                     commit: str, dirty: bool | None) -> str:
    """The parent run, named after the study; its description is the command that started it."""
    tags = {schema.ROLE: schema.ROLE_STUDY, schema.STUDY: name, **source_tags(source, commit, dirty),
            **environment.environment_tags(),
            schema.NOTE: f"Started with\n\n    {command_line()}\n"}
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run_id


def reopen_study_run(client: MlflowClient, run) -> str:
    """A parent run continued by --resume: RUNNING again, the resuming command added to its description."""
    note = run.data.tags.get(schema.NOTE, "")
    client.set_tag(run.info.run_id, schema.NOTE, f"{note}\nResumed with\n\n    {command_line()}\n")
    client.update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id


# --- a trial's runs -----------------------------------------------------------------------------


def open_trial_run(client: MlflowClient, context: TrialContext, cfg: Config, trial_id: str, trial_name: str,
                   placement: dict[str, str], member: int | None = None) -> tuple[str, bool]:
    """The child run of the trial (or of its member, when fused): continued if one is tagged with this
    trial id (and member index), else created. Returns the run id and whether it was continued.

    context: the study's (experiment, parent run, source and commit, the swept fields); cfg: the member's Config,
    whose flat fields become the params and, for the values the study sweeps, the run's name (Tune's trial name
    when it sweeps nothing); placement: the tags that say where this attempt runs (host, Ray node, device, GPU),
    rewritten on every attempt."""
    keys = {schema.PARENT_RUN_ID: context.parent_run_id, schema.TRIAL_ID: trial_id}
    if member is not None:
        keys[schema.MEMBER] = str(member)
    name = run_name(dataclasses.asdict(cfg), list(context.swept)) or trial_name
    found = client.search_runs([context.experiment_id], schema.tag_filter(keys), max_results=1)
    where = [RunTag(schema.HOST, socket.gethostname()), *(RunTag(k, v) for k, v in placement.items())]  # may move
    if found:
        run_id = found[0].info.run_id
        if schema.STOPPED_EARLY in found[0].data.tags:  # a stop the trial went on from (an interrupted study)
            client.delete_tag(run_id, schema.STOPPED_EARLY)
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=where)
        return run_id, True
    tags = {**keys, schema.ROLE: schema.ROLE_TRIAL, schema.STUDY: context.study, schema.PRESET: cfg.preset,
            schema.SEED: str(cfg.seed), schema.CONFIG: config_label(dataclasses.asdict(cfg), list(context.swept)),
            **source_tags(context.source, context.git_commit, context.git_dirty)}
    run_id = client.create_run(context.experiment_id, run_name=name, tags=tags).info.run_id
    flat = cfg.to_flat()
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in flat.items()],
                     tags=[*where, *stability_tags(StabilityMonitor(cfg).report())])
    client.log_dict(run_id, flat, schema.CONFIG_ARTIFACT)
    return run_id, False


def ensure_dataset(client: MlflowClient, run_id: str, data: DataBundle) -> None:
    """Log the dataset as the run's input unless the run has one: a continued run keeps its first input,
    and one whose first attempt was killed between creating the run and logging the input gets it now."""
    if not client.get_run(run_id).inputs.dataset_inputs:
        log_dataset(client, run_id, data)


def log_dataset(client: MlflowClient, run_id: str, data: DataBundle) -> None:
    """The dataset as the run's input: its name, where it was read from, and the digest of what was read."""
    source = (CodeDatasetSource({schema.SOURCE_NAME: data.source}) if "/" not in data.source
              else LocalArtifactDatasetSource(data.source))  # a package that ships it, or the folder of its files
    dataset = MetaDataset(source, name=data.name, digest=data.digest())
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),  # MLflow's own conversion (3.x)
                                            tags=[InputTag(schema.DATASET_CONTEXT, schema.DATASET_CONTEXT_TRAINING)])])


def set_checkpoint(client: MlflowClient, run_id: str, uri: str) -> None:
    """Point the run at its newest checkpoint (the file a `pretrained` field or a resume would read)."""
    client.set_tag(run_id, schema.CHECKPOINT, uri)


def stability_tags(report: dict) -> list[RunTag]:
    """The Appendix A verdict of a stability report, as the run's tags."""
    return [RunTag(schema.STABILITY_OK, schema.tag_bool(report["ok"])),
            RunTag(schema.STABILITY_FLAGS, ",".join(report["failed"])),
            RunTag(schema.STABILITY_STATIC_OK, schema.tag_bool(report["static_ok"])),
            RunTag(schema.STABILITY_DIVERGED, schema.tag_bool(report["diverged"]))]


def log_epoch(client: MlflowClient, run_id: str, epoch: int, metrics: dict[str, float], report: dict) -> None:
    """One epoch's metrics (step = epoch) and the verdict after it."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, value, now, epoch) for key, value in metrics.items()],
                     tags=stability_tags(report))


def last_logged_epoch(client: MlflowClient, run_id: str) -> int:
    """The last epoch the run logged (0 if none): every epoch logs TRAIN_LOSS."""
    return max((m.step for m in client.get_metric_history(run_id, schema.TRAIN_LOSS)), default=0)


def close_run(client: MlflowClient, run_id: str, report: dict, status: str, stopped_early: bool = False) -> None:
    """End a trial's run: its final verdict as tags and the report as an artifact, then `status`."""
    tags = [RunTag(schema.STOPPED_EARLY, schema.TRUE)] if stopped_early else []
    client.log_batch(run_id, tags=[*stability_tags(report), *tags])
    client.log_dict(run_id, report, schema.STABILITY_ARTIFACT)
    client.set_terminated(run_id, status)


def close_left_running(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str,
                       members: list[dict], *, failed: bool, stopped_early: bool) -> None:
    """End the trial's runs still RUNNING once Tune is done with it: a trial stopped by a scheduler (ASHA)
    may be killed inside `tune.report` before it closes its runs; a trial whose process died (a lost
    node, out of memory) cannot. members: each member's last saved runner state (its stability report)."""
    runs = client.search_runs([experiment_id], schema.tag_filter({schema.PARENT_RUN_ID: parent_run_id,
                                                                  schema.TRIAL_ID: trial_id}))
    for run in (run for run in runs if run.info.status == "RUNNING"):
        member = int(run.data.tags.get(schema.MEMBER, 0))
        if member < len(members) and "stability" in members[member]:
            client.log_dict(run.info.run_id, members[member]["stability"], schema.STABILITY_ARTIFACT)
        if stopped_early:
            client.set_tag(run.info.run_id, schema.STOPPED_EARLY, schema.TRUE)
        client.set_terminated(run.info.run_id, "FAILED" if failed else "FINISHED")


def study_killed(client: MlflowClient, parent_run_id: str) -> bool:
    """Whether the study's parent run is KILLED: the study was interrupted (`runner.Study.mark_killed`)."""
    return client.get_run(parent_run_id).info.status == "KILLED"


def leave_for_resume(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> None:
    """The runs of a trial an interrupted study stopped, KILLED (MLflow's status for an interrupted run) for --resume
    to continue: those still RUNNING, and those the trial closed as stopped early (Tune stops it as a scheduler
    would: a trial that did not see its parent KILLED, `study_killed`, cannot tell the two apart). Its members that
    had ended (FINISHED, not stopped early) stay."""
    runs = client.search_runs([experiment_id], schema.tag_filter({schema.PARENT_RUN_ID: parent_run_id,
                                                                  schema.TRIAL_ID: trial_id}))
    for run in runs:
        if schema.STOPPED_EARLY in run.data.tags:
            client.delete_tag(run.info.run_id, schema.STOPPED_EARLY)
        elif run.info.status != "RUNNING":
            continue
        client.set_terminated(run.info.run_id, "KILLED")
