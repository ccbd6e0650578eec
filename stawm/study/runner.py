"""The pieces every study composes in view: its flags, Ray and the MLflow parent run, the trainable,
resources, the RunConfig, resume, and the summary at the end.

A study (studies/*.py) reads top to bottom:

    args = runner.parse_args(__doc__, preset="mnist-class-8", argv=argv)  # flags, validated before Ray starts
    grid = {"glimpse_size": [6, 8, 12, 16, 28]}
    runner.check_grid(args, grid)                                  # every combination is a valid Config
    plan = runner.plan(args, configurations=5)                     # trials x epochs x s/epoch: --plan stops here
    study = runner.start_study(args, swept=list(grid), plan=plan)  # Ray up, storage checked, MLflow parent run
    space = {"glimpse_size": tune.grid_search(grid["glimpse_size"]),
             **runner.seed_space(args)}                            # a seed grid, or with --fuse-seeds `seeds`
    trainable = tune.with_resources(tune.with_parameters(runner.trainable, context=study.context),
                                    runner.resources(args))        # what is not searched: the TrialContext
    tuner = runner.restored(args, trainable) or tune.Tuner(        # --resume continues a saved study
        trainable, param_space=space, tune_config=runner.tune_config(args), run_config=runner.run_config(args))
    return runner.finish_study(study, tuner.fit())                 # one line per trial, the plan against it

Each job has its module, and this one gathers what a study needs of them (`__all__`):
- `flags`: the shared flags and their validation, grids, variants and the seed axis;
- `tracking`: the MLflow experiment, parent and child runs, in `stawm.schema`'s names;
- `trial`: the trainable, one Tune trial (its config: what the study sweeps; the rest: its `TrialContext`);
- `tune_checkpoints`: the trial's checkpoints on Tune's storage, resume from the newest;
- `gpu_share`: --gpus-per-trial auto and the per-trial CUDA memory cap;
- `plan`: what a launch will run and take (trials, s/epoch and its source, concurrency, hours), before its trials;
- `preflight`, `cluster`: what is checked before Ray starts, and the Ray cluster's shape.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from mlflow import MlflowClient
from mlflow.entities import RunTag
from ray import tune

from .. import provenance, store_uri
from ..train import CHECKPOINT
from . import cluster, gpu_share, outbox, parent_report, preflight, progress, resume, tracking
from . import plan as plans
from .flags import StudyArgs, check_grid, experiment_path, fail, parse_args, seed_space, seeds, variant
from .context import TrialContext
from .plan import Plan
from .trial import member_seeds, trainable, trial_config
from .tune_checkpoints import checkpoint_uri, read_state

__all__ = ["Study", "StudyArgs", "TrialContext", "best_configs", "check_grid", "checkpoint_file", "finish_study",
           "parse_args", "plan", "resources", "restored", "run_config", "seed_space", "seeds", "start_study",
           "trainable", "tune_config", "variant"]


@dataclass
class Study:
    """A started study: what every trial gets besides its search values (tune.with_parameters), which also
    names the study's experiment, parent run and store."""

    context: TrialContext
    plan: Plan | None = None  # what `plan` expected of this launch: set against what it took in the closing summary
    started: float = field(default_factory=time.monotonic)  # once its parent run is open: the plan's wall time starts
    report: bool = False  # write stawm-report's files on the parent run at the end (start_study: unless --no-report)
    interrupted: int = 0  # the signal (SIGINT, SIGTERM) that stopped it, once caught (`_catch_interrupts`)
    stopped: set = field(default_factory=set)  # the trials Tune had not ended when it stopped (`progress.Progress`)
    handlers: dict = field(default_factory=dict)  # the signal handlers before start_study's: finish_study's again

    def mark_killed(self) -> None:
        """The parent run KILLED, once interrupted and before Tune stops the trials: each trial Tune stops then
        sees it (`recorder`), and leaves its runs KILLED for --resume, not stopped early. One try: a tracking
        server that does not answer leaves it to `finish_study`."""
        try:
            MlflowClient(self.tracking_uri).set_terminated(self.parent_run_id, "KILLED")
        except Exception as err:  # finish_study closes the runs either way
            print(f"the parent run not marked KILLED yet ({type(err).__name__}); the study's end does it", flush=True)

    @property
    def name(self) -> str:  # MLflow experiment and the parent run's STUDY tag
        return self.context.study

    @property
    def parent_run_id(self) -> str:
        return self.context.parent_run_id

    @property
    def experiment_id(self) -> str:
        return self.context.experiment_id

    @property
    def tracking_uri(self) -> str:
        return self.context.tracking_uri


def start_study(args: StudyArgs, swept: list[str], *, name: str | None = None, fixed: dict | None = None,
                plan: Plan | None = None) -> Study:
    """Connect Ray (RAY_ADDRESS: join that cluster; else start one on this machine), check the storage and the
    tracking store for the cluster's shape (what it can grow to), write a probe artifact, and create (or, with
    --resume, reopen) the study's MLflow parent run. `fixed`: Config fields this study sets for every trial on
    top of the flags' base config (not searched, so not in its param_space). `plan`: this launch's (`plan`),
    logged on the parent run."""
    name = name or args.name
    outbox.bound_client_retries()  # before Ray starts: local trials inherit it
    client = MlflowClient(args.tracking_uri)
    found, added_seeds = _resumed_study(args, client, swept, name) if args.resume else (None, {})
    _connect_ray(args)
    try:  # the checks that need Ray up: the cluster's shape, its GPUs; and the store's artifacts
        shape = cluster.shape()
        if shape.multi_node:
            preflight.check_for_cluster(args.storage, args.tracking_uri, shape.describe())
        experiment_id = tracking.experiment(client, name, args.tracking_uri)
        tracking.check_artifacts(client, experiment_id)
        if args.gpus_per_trial == "auto" or args.gpu_choice:
            gpu_share.choose(args, found.data.params if found is not None else {}, seeds(args), shape)
    except preflight.PreflightError as err:
        ray.shutdown()
        fail(str(err))
    source, (commit, dirty) = tracking.source_name(), provenance.git_state()
    if commit == provenance.UNKNOWN:
        print(f"warning: the commit of this code is unknown (no git here: `ray job submit --working-dir` leaves"
              f" .git out); set {provenance.COMMIT_ENV} as the README's submit command does", flush=True)
    if found is None:
        parent = tracking.create_study_run(client, experiment_id, name, tracking.study_params(args, swept), source,
                                           commit, dirty)
    else:
        parent = tracking.reopen_study_run(client, found)
        if added_seeds:
            client.log_batch(parent, tags=[RunTag(k, v) for k, v in added_seeds.items()])
            print(f"study {name!r}: adding seeds {args.first_seed}..{args.seeds - 1} to every configuration, "
                  f"in the Ray experiment {experiment_path(args)}", flush=True)
    context = TrialContext(
        study=name, experiment_id=experiment_id, parent_run_id=parent, tracking_uri=args.tracking_uri,
        base_config={**args.config, **(fixed or {})}, swept=tuple(s for s in swept if s != "seed"),
        outage_budget_s=args.tracking_outage_budget, git_commit=commit, git_dirty=dirty, source=source,
        data_root=args.data_root, device=args.device, gpu_fraction=float(args.gpus_per_trial),
        gpu_overhead_mb=args.gpu_choice.get("probe_overhead_mb", 0.0), fuse_seeds=args.fuse_seeds,
        system_metrics=args.system_metrics)
    if plan is not None:
        plan.log(client, parent)
    study = Study(context, plan, report=not args.no_report)
    _catch_interrupts(study, args.verbose)
    progress.follow(study)  # the study whose trials run_config's progress line counts
    return study


def _catch_interrupts(study: Study, verbose: bool) -> None:
    """Ctrl-C (SIGINT) and SIGTERM, caught once: the study is marked interrupted, and its Progress callback stops Tune
    at its next step as Tune stops on Ctrl-C (its SIGUSR1 handler: the experiment's state is saved with the trials
    as they were, then their actors are stopped), so that `finish_study` leaves their runs for --resume. A second
    signal ends the driver at once, its runs as a kill leaves them (--resume continues them too). Tune's own SIGINT
    handler is off (TUNE_DISABLE_SIGINT_HANDLER): it would take SIGINT over during fit(), and it has none for
    SIGTERM. Only the main thread can set handlers (a study run from another thread keeps Tune's)."""
    if threading.current_thread() is not threading.main_thread():
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read when fit() starts

    def interrupted(signum, frame):
        if study.interrupted:
            print(f"\n{signal.Signals(signum).name} again: stopping now. {_resume_line()}", flush=True)
            raise SystemExit(128 + study.interrupted)
        study.interrupted = signum
        if not verbose:  # Tune's lines on the way out ("Stop signal received", Tuner.restore...): _resume_line says it
            for name in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
        print(f"\n{signal.Signals(signum).name}: stopping the study's trials (again to stop at once)", flush=True)

    study.handlers = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}


def _resume_line() -> str:
    """How to continue an interrupted study: the command that started it, with --resume."""
    command = provenance.command_line()
    return f"interrupted; resume with: {command if ' --resume' in command else command + ' --resume'}"


def _connect_ray(args: StudyArgs) -> None:
    """Join the Ray cluster named by RAY_ADDRESS, else start one on this machine; nothing if Ray is up already.
    Unless --verbose, Ray's console is quieted to what `progress` prints (its Ray settings are named below)."""
    if not args.verbose:
        # RAY_AIR_NEW_OUTPUT=0: Tune's older console, silent at run_config's verbose=0 (the newer one still prints its
        # experiment table and TensorBoard hint); a resumed Tuner, whose saved RunConfig applies, is quiet too
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized():
        env = {"MLFLOW_TRACKING_URI": args.tracking_uri,
               # trials import stawm: from this checkout when it is not installed on the nodes
               "PYTHONPATH": os.pathsep.join(p for p in (str(provenance.PROJECT_ROOT), os.environ.get("PYTHONPATH"))
                                             if p)}
        # worker_process_setup_hook: each worker quiets Ray's line per checkpoint (`progress.quiet_worker`); the
        # workers' other lines still reach this console (log_to_driver stays on: a trial's outage lines print there)
        quiet = {} if args.verbose else {"worker_process_setup_hook": "stawm.study.progress.quiet_worker"}
        ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env, **quiet})


def _resumed_study(args: StudyArgs, client: MlflowClient, swept: list[str], name: str) -> tuple:
    """--resume, checked before Ray starts: the study's parent run (None when only Ray's storage holds it) and the
    parent tags to write when seeds are added (`resume`). Exits 2 for a study that exists nowhere (a misspelt
    --name would otherwise start a whole new one), flags that change what it computes, or fewer seeds."""
    experiment = client.get_experiment_by_name(name)
    found = tracking.find_study_run(client, experiment.experiment_id, name) if experiment is not None else None
    try:
        if found is None:
            if not tune.Tuner.can_restore(experiment_path(args)):
                raise resume.ResumeRefused(
                    f"--resume: no study named {name!r} in {provenance.redact(args.tracking_uri)} or "
                    f"{experiment_path(args)}; check --name, --tracking-uri and --storage")
            return None, {}  # a Ray experiment whose parent run is gone: Tune's saved state decides
        changed = resume.changed_flags(found.data.params, tracking.study_params(args, swept))
        if changed:
            raise resume.ResumeRefused(
                f"--resume would change what study {name!r} computes ({'; '.join(changed)}): resume with the flags "
                "it started with, or start a new study under another --name")
        return found, resume.plan_seeds(args, name, found.data.tags, found.data.params)
    except resume.ResumeRefused as err:
        fail(str(err))


# --- the plan ------------------------------------------------------------------------------------


def plan(args: StudyArgs, configurations: int, *, seeds: list[int] | None = None, fused: bool | None = None,
         stages: list[int] | None = None, variants: list[dict] | None = None, name: str | None = None,
         fixed: dict | None = None, max_concurrent: int = 0, last: bool = True) -> Plan:
    """This launch's plan (`stawm.study.plan`), printed: `configurations` x `seeds` trials (default: `seeds(args)`, the
    seeds this launch trains), or one per configuration when `fused` (default: --fuse-seeds). `stages`: trials per
    stage when a stage waits for the one before (default: one); `variants`: each trial's config changes, when the
    trials differ in speed (table1's rows): s/epoch is their mean (default: the base config's); `name`, `fixed`: as
    start_study's; `max_concurrent`: a cap the study sets besides --max-concurrent. With --plan, exits 0 once the
    `last` plan is printed.

    The store is read, never written: no experiment or run is created. Ray is left alone on this machine when
    trials train on its CPU; on a cluster (RAY_ADDRESS) or for GPU trials it is joined (or started) for the shape, the
    GPU share (--gpus-per-trial auto, which start_study then keeps) and the probe, and left up for start_study."""
    name = name or args.name
    start_s, start_source = plans.startup_s()  # before the probe: this process's start so far
    outbox.bound_client_retries()
    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name(name)
    found = tracking.find_study_run(client, experiment.experiment_id, name) if args.resume and experiment else None
    seeds = seeds if seeds is not None else _launch_seeds(args, found, name)
    fused = args.fuse_seeds if fused is None else fused
    config, shape, joined = {**args.config, **(fixed or {})}, None, False
    if os.environ.get("RAY_ADDRESS") or args.gpus_per_trial == "auto" or float(args.gpus_per_trial) > 0:
        joined = not ray.is_initialized()
        _connect_ray(args)
    if ray.is_initialized():
        try:
            shape = cluster.shape()
            if args.gpus_per_trial == "auto" or args.gpu_choice:
                gpu_share.choose(args, found.data.params if found is not None else {}, seeds, shape)
        except preflight.PreflightError as err:
            ray.shutdown()
            fail(str(err))
    stages = tuple(stages or [configurations * (1 if fused else len(seeds))])
    done = plans.trials_done(client, experiment.experiment_id, found.info.run_id, seeds) if found is not None else 0
    on_gpu = float(args.gpus_per_trial) > 0 and args.device != "cpu"
    configs = [{**config, **variant} for variant in variants] if variants else [config]
    epoch_s, source = (_epoch_seconds(args, client, experiment, configs, seeds, fused, on_gpu) if sum(stages) > done
                       else (0.0, "nothing left to run, so not measured"))
    count, why = _concurrency(args, shape, sum(stages) - done, max_concurrent)
    made = Plan(study=name, configurations=configurations, seeds=len(seeds), fused=fused, stages=stages, done=done,
                epochs=config["epochs"], epoch_s=epoch_s, epoch_source=source, start_s=start_s,
                start_source=start_source, concurrency=count, concurrency_why=why,
                share=float(args.gpus_per_trial) if on_gpu else args.cpus_per_trial,
                device="GPU" if on_gpu else "CPU core", price_per_hour=args.price_per_hour)
    print(made.describe(), flush=True)
    if args.plan and last:
        if joined:  # Ray joined or started above, for the plan alone
            ray.shutdown()
        raise SystemExit(0)
    return made


def _launch_seeds(args: StudyArgs, found, name: str) -> list[int]:
    """`seeds(args)` as start_study will set them: a resumed study that gains seeds trains only those (`resume`),
    worked out on a copy of the flags, which start_study works out again."""
    if found is None:
        return seeds(args)
    launch = copy.copy(args)
    try:
        resume.plan_seeds(launch, name, found.data.tags, found.data.params)
    except resume.ResumeRefused as err:
        fail(str(err))
    return seeds(launch)


def _epoch_seconds(args: StudyArgs, client: MlflowClient, experiment, configs: list[dict], seeds: list[int],
                   fused: bool, on_gpu: bool) -> tuple[float, str]:
    """Seconds of training steps per epoch of a trial, and from where: of the base config (`configs` holds it alone),
    or the mean over the trials' `configs`, each config of another speed (`plan.speed_key`) timed once."""
    timed = {}
    for config in configs:
        if plans.speed_key(config) not in timed:
            timed[plans.speed_key(config)] = _config_epoch_seconds(args, client, experiment, config, seeds, fused,
                                                                   on_gpu)
    if len(configs) == 1:
        seconds, source, _ = timed[plans.speed_key(configs[0])]
        return seconds, f"the base config's, {source}"
    figures, probes = [timed[plans.speed_key(c)][0] for c in configs], [t[2] for t in timed.values() if t[2]]
    how = f"{len(timed) - len(probes)} from the store, {len(probes)} probed"
    took = f" (the probes took {sum(p['probe_s'] for p in probes):.1f} s, on {probes[0]['device']})" if probes else ""
    return sum(figures) / len(figures), (f"the mean over the trials' {len(timed)} configurations ({min(figures):.3g}"
                                         f" to {max(figures):.3g} s): {how}{took}")


def _config_epoch_seconds(args: StudyArgs, client: MlflowClient, experiment, config: dict, seeds: list[int],
                          fused: bool, on_gpu: bool) -> tuple[float, str, dict | None]:
    """(seconds of training steps per epoch, from where, the probe's result or None) of a trial of `config`: earlier
    runs in the store, else a probe (on this machine's CPU, with a trial's threads; on a GPU of the cluster's when
    trials train on GPUs)."""
    members = [{**config, "seed": seed} for seed in seeds] if fused else [config]
    if experiment is not None:
        stored = plans.store_epoch_seconds(client, experiment.experiment_id, config, len(members) > 1)
        if stored is not None:
            return stored[0], f"from {stored[1]} earlier runs in the store (median of their last epochs)", None
    if on_gpu:
        result = plans.probe_on_cluster(members, args.data_root, args.cpus_per_trial)
        if "error" in result:
            ray.shutdown()
            fail(f"the plan's probe on node {result.get('node', '?')} failed: {result['error']}")
    else:
        result = plans.probe(members, args.data_root, "cpu", threads=max(1, int(args.cpus_per_trial)))
    return result["epoch_s"], plans.probe_source(result), result


def _concurrency(args: StudyArgs, shape, trials: int, cap: int) -> tuple[int, str]:
    """Trials at once: what fits on the cluster (Ray up: its live resources, and the nodes its autoscaler may add)
    or on this machine's cores (the local Ray the study will start takes them all)."""
    caps = [c for c in (args.max_concurrent, cap) if c]
    if ray.is_initialized():
        resources = ray.cluster_resources()
        cpus, gpus, where = resources.get("CPU", 0), resources.get("GPU", 0), shape.describe()
        more = (shape.max_nodes - shape.live_nodes) if shape.autoscaling and shape.max_nodes else 0
    else:
        cpus, gpus, where, more = os.cpu_count() or 1, 0, "this machine, for the Ray the study starts", 0
    return plans.concurrency(cpus, gpus, args.cpus_per_trial, float(args.gpus_per_trial), where=where,
                             max_concurrent=min(caps, default=0), trials=trials, more_nodes=more,
                             node_types=shape.node_types if shape is not None else None)


# --- Tune pieces ---------------------------------------------------------------------------------


def resources(args: StudyArgs) -> dict[str, float]:
    """For tune.with_resources. A fractional GPU only sets CUDA_VISIBLE_DEVICES: the trial caps its memory."""
    return {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}


def tune_config(args: StudyArgs, **options) -> tune.TuneConfig:
    """The study's TuneConfig: at most --max-concurrent trials at once (0: as many as fit), one worker process
    running trial after trial (`stawm.study.trial`: torch, the data and MLflow load once per process);
    `options` are TuneConfig's own (metric, mode, search_alg, num_samples...)."""
    return tune.TuneConfig(max_concurrent_trials=args.max_concurrent or None, reuse_actors=True, **options)


def run_config(args: StudyArgs, name: str | None = None) -> tune.RunConfig:
    """A failed trial is retried from its last checkpoint, --max-failures times (2 by default).

    Tune deletes no checkpoint (num_to_keep=None): the trial empties older ones itself, and a resumed
    trial continues from the newest complete one (why: `stawm.tune_checkpoints`).

    The console: the study's progress line and its trials' events (`progress.Progress`); Tune's own status tables
    and trial lines only with --verbose (Tune's `verbose`: 0 silences them, None keeps Tune's default).
    """
    return tune.RunConfig(
        name=name or args.tune_name or args.name,
        storage_path=args.storage,
        failure_config=tune.FailureConfig(max_failures=args.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        callbacks=[progress.Progress(live=False if args.verbose else None)],  # plain lines between Tune's tables
        verbose=None if args.verbose else 0,
    )


def restored(args: StudyArgs, trainable, *, name: str | None = None) -> tune.Tuner | None:
    """With --resume and a saved Ray experiment: `Tuner.restore` (unfinished and errored trials continue
    from their checkpoints; the saved search space and RunConfig apply). None when there is nothing to
    restore: the study then builds its new `tune.Tuner(...)` in view."""
    path = experiment_path(args, name)
    if not tune.Tuner.can_restore(path):
        return None
    if not args.resume:
        fail(f"{path} already holds a Ray experiment: pass --resume to continue it, or choose another --name")
    print(f"resuming the Ray experiment in {path}", flush=True)
    return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)


def checkpoint_file(checkpoint: tune.Checkpoint) -> str:
    """The loop's checkpoint.pt inside a Tune checkpoint, as a path or URI a trial on any node can read."""
    return checkpoint_uri(checkpoint, CHECKPOINT)


def best_configs(results, keys: list[str], *, metric: str, top: int) -> list[dict]:
    """The `top` settings of `keys` with the lowest mean last-epoch `metric` over their trials (seeds)."""
    frame = results.get_dataframe()  # one row per trial: its last result and its config
    columns = [f"config/{k}" for k in keys]
    means = frame.dropna(subset=[metric]).groupby(columns)[metric].agg(["mean", "count"]).sort_values("mean")
    print(means.head(top).to_string())
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(keys, index)} for index in means.index[:top]]


def optuna_storage(args: StudyArgs, study_name: str, url: str = ""):
    """The Optuna storage a search keeps its study in, and its URL (to record and print).

    Default: `optuna.db` beside a sqlite MLflow store (so a study's two records travel together), else in
    the working folder. A study of that name already there is refused unless --resume continues it:
    a new search would otherwise start from the old one's trials. Exits 2 before Ray starts."""
    import optuna

    if not url:
        database = store_uri.sqlite_path(args.tracking_uri)
        folder = database.resolve().parent if database is not None else Path.cwd()
        url = f"sqlite:///{folder / 'optuna.db'}"
    try:
        preflight.check_outside_job_folder({"--optuna-storage": url})
    except preflight.PreflightError as err:
        fail(str(err))
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as err:  # a bad URL, a driver missing, a database it cannot open
        fail(f"--optuna-storage {url}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    names = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
    if study_name in names and not args.resume:
        fail(f"Optuna study {study_name!r} already exists in {url}: pass --resume to continue it, "
             "or choose another --name")
    return storage, url


# --- the end of a study ----------------------------------------------------------------------------


def finish_study(study: Study, results) -> int:
    """Close runs Tune stopped from outside, end the parent run, print one line per trial; 0 if no trial errored.

    `results`: a ResultGrid, or the Results of several Tuners of one study. A tracking server that does not
    answer is waited for within the outage budget; past it the runs stay RUNNING for --resume to close. Then, unless
    --no-report, stawm-report's tables and plots on the parent run (`parent_report`: a failure there is one line)."""
    for sig, handler in study.handlers.items():  # signals from here on: as before the study
        signal.signal(sig, handler)
    results = list(results)
    errors = sum(result.error is not None for result in results)
    print(f"\n{study.name}: {len(results)} trials")
    for result in results:
        print("  " + _summary_line(result, study, result.metrics.get("trial_id") or Path(result.path).name))
    server = outbox.Server(study.tracking_uri, study.context.outage_budget_s, "the study driver")
    unclosed = ""  # why the study's runs could not be closed, if so: then no report
    try:
        server.wait_call(_close_study, study, results, errors, doing="waits to close the study's runs")
    except outbox.OutageBudgetExceeded as err:
        print(f"{err}; the study's runs stay RUNNING until the same command with --resume closes them", flush=True)
        errors += 1
        unclosed = "the tracking server did not answer: the study's runs stay RUNNING; --resume writes it"
    if outage := _outage_line(results, server):
        print(outage)
    if study.plan is not None and not study.interrupted:
        print(study.plan.against(len(results), time.monotonic() - study.started))
    # once its runs are closed, as the analysis reads them; a terminated run still takes artifacts
    if study.report and not study.interrupted:
        parent_report.write_report(study.name, study.tracking_uri, study.parent_run_id, skip=unclosed,
                                   metric=parent_report.scored_on(study.context.base_config))
    page = tracking.ui_page(study.experiment_id)  # its runs, seeds grouped by configuration
    uri = provenance.redact(study.tracking_uri)
    where = (f"`mlflow ui --backend-store-uri {uri}`, then http://127.0.0.1:5000/{page}"
             if not uri.startswith("http") else f"{uri.rstrip('/')}/{page}")
    print(f"MLflow experiment {study.name!r}, parent run {study.parent_run_id}: {where}", flush=True)
    if study.interrupted:
        print(_resume_line(), flush=True)
        return 128 + study.interrupted  # 130 for SIGINT, the shell's convention
    return 1 if errors else 0


def _close_study(study: Study, results: list, errors: int) -> None:
    """The trials' runs left RUNNING, then the parent run: all again if the server stops answering midway
    (each step can be repeated). An interrupted study's unfinished trials keep their runs for --resume, KILLED, as
    the parent run."""
    client = MlflowClient(study.tracking_uri)
    for result in results:
        trial_id = result.metrics.get("trial_id")  # absent if the trial never reported
        if trial_id and trial_id not in study.stopped:
            _close_left_running(client, study, trial_id, result)
    for trial_id in study.stopped:
        tracking.leave_for_resume(client, study.experiment_id, study.parent_run_id, trial_id)
    client.set_terminated(study.parent_run_id, "KILLED" if study.interrupted else "FAILED" if errors else "FINISHED")


def _outage_line(results: list, driver: outbox.Server) -> str:
    """One line if the tracking server stopped answering during the study (from the trials' last reports and the
    driver's own wait), else ""."""
    hit = [r.metrics for r in results if r.metrics.get("tracking_outages")]
    if not hit and not driver.outages:
        return ""
    parts = [f"{len(hit)} of {len(results)} trials rode it out, training on (their lines above say how long)"
             ] if hit else []
    if driver.outages:
        parts.append(f"the driver waited {driver.counts()['tracking_down_s']:.0f} s to close the runs")
    return f"tracking server {provenance.redact(driver.uri)} stopped answering during the study: {'; '.join(parts)}"


def _close_left_running(client: MlflowClient, study: Study, trial_id: str, result) -> None:
    """The trial's runs left RUNNING, ended from its last checkpoint's runner state. A trial that ended before its
    last epoch because every member stopped on its own (stuck or diverged: `recorder.member_epoch`) was not
    stopped by a scheduler, so it is not marked stopped early."""
    state = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            state = read_state(Path(folder))
    members = state.get("members", [])
    ended_itself = bool(members) and all(member.get("stopped") for member in members)
    stopped_early = (result.error is None and not ended_itself
                     and state.get("epoch", 0) < trial_config(result.config, study.context).epochs)
    tracking.close_left_running(client, study.experiment_id, study.parent_run_id, trial_id, members,
                                failed=result.error is not None, stopped_early=stopped_early)


def _summary_line(result, study: Study, trial_id: str) -> str:
    if result.config is None:  # a trial an interrupted study never started
        return f"{trial_id}  not started"
    # with several seeds (fused), Tune's numbers are their means (`recorder.tune_report`)
    config = {**study.context.base_config, **result.config, **result.config.get("variant", {}),
              "seed": ",".join(map(str, member_seeds(result.config, study.context)))}
    shown = tracking.run_name(config, list(study.context.swept))
    if result.error is not None:
        return f"{trial_id}  {shown}  ERROR: {str(result.error).strip().splitlines()[-1]}"
    stopped = "  (interrupted)" if result.metrics.get("trial_id") in study.stopped else ""
    return f"{trial_id}  {shown}  {progress.result_words(result.metrics)}{stopped}"

