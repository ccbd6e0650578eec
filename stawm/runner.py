"""Shared pieces every study composes in view: flags, the Ray Tune trainable, MLflow runs, resume.

A study (studies/*.py) reads top to bottom:

    args = runner.parse_args(__doc__, preset="mnist-class-8")     # flags, all validated before Ray starts
    grid = {"glimpse_size": [6, 8, 12, 16, 28]}
    runner.check_grid(args, grid)                                  # every combination is a valid Config
    study = runner.start_study(args, swept=list(grid))             # Ray up, storage checked, MLflow parent run
    space = {**study.base_config, "glimpse_size": tune.grid_search(grid["glimpse_size"]),
             **runner.seed_space(args)}                            # a seed grid, or with --fuse-seeds `_seeds`
    trainable = tune.with_resources(runner.trainable, runner.resources(args))
    tuner = runner.restored(args, trainable) or tune.Tuner(        # --resume continues a saved study
        trainable, param_space=space, tune_config=tune.TuneConfig(...), run_config=runner.run_config(args))
    sys.exit(runner.finish_study(study, tuner.fit()))              # one line per trial, where to look

The MLflow schema below is what the results library (analysis/) reads; keep it exact.
- Experiment = the study's name. One parent run per study, tags `stawm.role=study`, `stawm.study`;
  params `seeds`, `swept` (config fields the study varies, seed excluded) and the study's flags;
  with `--gpus-per-trial auto` also `gpu_fraction` (the share chosen) and, when a GPU was probed,
  `probe_peak_mb`, `probe_overhead_mb`, `gpu_total_mb` (see `gpu_fraction`).
- One child run per Tune trial and member, keyed to the trial id (and member) so that a retried trial
  or a restored study continues its run instead of opening a second one. A plain trial has one
  member; a trial of fused seeds (--fuse-seeds) one per seed, each tagged `stawm.member` (its index)
  besides the trial id they share. Tags `mlflow.parentRunId`, `stawm.role=trial`,
  `stawm.study`, `stawm.preset`, `stawm.seed`, `stawm.trial_id`, `stawm.git_commit`, `stawm.host`,
  `stawm.gpu`, and the verdict `stability.ok`, `stability.flags`, `stability.static_ok`,
  `stability.diverged` (kept current every epoch). Params = `Config.to_flat()`. Metrics with
  step=epoch: every numeric field of the engine's record plus `best_test_error` (running min).
  Artifacts `config.json` (flat config) and `stability.json` (the Appendix A report).

Trial config = the flat config plus runner keys, all starting with "_" (RUNNER_KEYS below).
Studies pass `reuse_actors=True`: one worker process runs trial after trial (torch, the data and
MLflow load once per process, which is most of a small trial's time); on CPU, `peak_memory_mb`
is then the process's peak so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import posixpath
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.fs
import ray
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray import tune

from . import preflight
from .config import PRESETS, Config, ConfigError, preset
from .schema import parse_pairs
from .data import MissingDataError, load_data
from .engine import CHECKPOINT, train
from .fused import FUSED_CHECKPOINT, train_fused
from .stability import StabilityMonitor

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNNER_STATE = "runner_state.json"  # beside the engine's checkpoint.pt: epoch, its size, best_test_error, the report
RUNNER_KEYS = {
    "_study": "the study's name (MLflow experiment)",
    "_experiment_id": "MLflow experiment id of the study",
    "_parent_run_id": "MLflow parent run of the study",
    "_tracking_uri": "MLflow tracking URI; trials on other nodes do not see the driver's environment",
    "_git_commit": "commit of the driver's checkout",
    "_data_root": "dataset folder (absolute: Tune moves each trial into its own directory)",
    "_device": "cpu or cuda",
    "_gpu_fraction": "share of a GPU per trial; below 1 the trial caps its CUDA memory to it",
    "_gpu_overhead_mb": "CUDA memory a trial's process holds outside torch's allocator (probed); off its cap",
    "_fuse_seeds": "--fuse-seeds was given: a trial without `_seeds` is an error (the study cannot fuse)",
    "_seeds": "the seeds one trial trains fused (stawm.fused), one member and MLflow run each",
    "_variant": "dict of config fields set on top of the rest (explicit lists of configurations)",
    "_fail_once_at_epoch": "FAULT INJECTION FOR TESTS ONLY: raise at this epoch (>= 2) on a trial's first attempt",
}
ERROR_METRICS = ("test_error", "val_error")
QUICK = dict(preset="tiny", seeds=2, epochs=1, dataset="mnist-sample")  # a few minutes on 2 CPU cores
GPU_SAFETY = 1.25  # on the probe's peak: a few steps of the base config, not a whole epoch of every trial
MAX_TRIALS_PER_GPU = 8  # processes time-slice a GPU (../shared/PITFALLS.md): more add no throughput
PROBE_STEPS = 5


# --- flags --------------------------------------------------------------------------------------


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class StudyArgs:
    """Flags every study shares; each field's doc is its --help line."""

    preset: str = _help("Appendix D configuration the study starts from (default: the study's; tiny with --quick)",
                        default="")
    seeds: int = _help("seeds per configuration: 0..SEEDS-1 (default: 5; 2 with --quick)", default=0)
    epochs: int = _help("epochs per trial (default: the preset's, i.e. the paper's; 1 with --quick)", default=0)
    quick: bool = _help("small mode: tiny preset on mnist-sample, 1 epoch, 2 seeds, a small grid", default=False)
    gpus_per_trial: float | str = _help(
        "GPUs per trial; a fraction packs trials on one GPU and caps each one's CUDA memory to it. auto: "
        f"the share a {PROBE_STEPS}-step probe of the base config needs (its peak CUDA memory x {GPU_SAFETY} "
        f"plus the process's own, rounded up to 1/k, at most {MAX_TRIALS_PER_GPU} trials per GPU); "
        "0 when the cluster has no GPU", default=0.0)
    fuse_seeds: bool = _help("one Tune trial per configuration trains all its seeds fused in one process "
                             "(stawm.fused), each seed still its own MLflow run; for studies that take "
                             "their seeds from runner.seed_space", default=False)
    cpus_per_trial: float = _help("CPUs per trial", default=1.0)
    max_concurrent: int = _help("most trials running at once (default: as many as the resources allow)", default=0)
    name: str = _help("the study's name: MLflow experiment, parent run and Ray experiment "
                      "(default: the script's name)", default="")
    resume: bool = _help("continue the study of this --name: unfinished and errored trials resume from "
                         "their checkpoints, into their own MLflow runs", default=False)
    tracking_uri: str = _help("MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)",
                              default="")
    storage: str = _help("Ray storage path or URI for checkpoints and results (default: ./ray_results); "
                         "several nodes need shared storage", default="")
    data_root: str = _help("dataset folder (default: $STAWM_DATA or ~/.cache/stawm)", default="")
    device: str = _help("auto | cpu | cuda (auto: cuda when trials get GPUs)", default="auto")
    set: list = _help("FIELD=VALUE: override any config field, repeatable (e.g. --set memory_size=128)",
                      default_factory=list)
    # filled in by parse_args, not flags
    changes: dict = field(default_factory=dict)  # what the flags change in any preset (--quick, --epochs, --set)
    config: dict = field(default_factory=dict)  # the validated flat base config: the preset with `changes`
    extra: dict = field(default_factory=dict)  # the study's own flags
    gpu_choice: dict = field(default_factory=dict)  # --gpus-per-trial auto: what start_study chose, and from what


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit status 2 (argparse would add the usage lines)
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(description: str, *, preset: str, argv: list[str] | None = None, extra=None) -> StudyArgs:
    """Parse and validate the common flags (+ the study's own, added by `extra(parser)`), or exit 2.

    Everything that can be checked without Ray is checked here: the preset, the seeds, each --set
    field and value (by building the Config once), the tracking URI and the storage path.
    """
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = {"seeds": positive_int, "epochs": positive_int, "max_concurrent": positive_int,
             "gpus_per_trial": gpu_share}
    for f in dataclasses.fields(StudyArgs):
        if "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.name == "set":
            parser.add_argument(flag, action="append", default=[], metavar="FIELD=VALUE", help=f.metadata["help"])
        elif f.name == "preset":
            parser.add_argument(flag, choices=sorted(PRESETS), metavar="NAME",
                                help=f"{f.metadata['help']}: {', '.join(sorted(PRESETS))}")
        else:
            kind = kinds.get(f.name) or {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    own = [a.dest for a in parser._actions]
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    values = vars(ns)
    args = StudyArgs(**{k: values[k] for k in own if k != "help"},
                     extra={k: v for k, v in values.items() if k not in own})
    args.name = args.name or Path(sys.argv[0]).stem
    args.preset = args.preset or (QUICK["preset"] if args.quick else preset)
    args.seeds = args.seeds or (QUICK["seeds"] if args.quick else 5)
    auto_gpus = args.gpus_per_trial == "auto"  # share and device are chosen in start_study, once Ray is up
    if args.device == "auto" and not auto_gpus:
        args.device = "cuda" if args.gpus_per_trial > 0 else "cpu"
    try:
        if args.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
        if auto_gpus and args.device == "cpu":
            raise ValueError("--gpus-per-trial auto chooses GPUs: leave --device at auto (or cuda)")
        if args.device == "cuda" and not auto_gpus and args.gpus_per_trial <= 0:
            raise ValueError("--device cuda needs --gpus-per-trial > 0 (Ray hides GPUs from trials that ask none)")
        if args.cpus_per_trial <= 0:
            raise ValueError("--cpus-per-trial must be > 0")
        changes = {"dataset": QUICK["dataset"], "epochs": QUICK["epochs"]} if args.quick else {}
        if args.epochs:
            changes["epochs"] = args.epochs
        changes.update(parse_pairs(args.set))
        args.changes, args.config = changes, preset_config(args.preset, changes)
        args.tracking_uri = preflight.check_tracking_uri(args.tracking_uri or preflight.default_tracking_uri())
        args.storage = preflight.check_storage(args.storage or os.path.abspath("ray_results"))
        args.data_root = os.path.abspath(args.data_root) if args.data_root else ""
        if not os.environ.get("RAY_ADDRESS"):  # trials run here and read what the driver sees
            _check_data(args.config, args.data_root)
        if not args.resume and tune.Tuner.can_restore(experiment_path(args)):
            raise ValueError(f"study {args.name!r} already has results in {experiment_path(args)}: "
                             "pass --resume to continue it, or choose another --name")
    except (ValueError, preflight.PreflightError, MissingDataError) as err:  # ConfigError is a ValueError
        parser.error(str(err))
    return args


def gpu_share(text: str) -> float | str:
    """--gpus-per-trial: `auto` or a number >= 0."""
    if text == "auto":
        return text
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be auto or a number >= 0, got {text}")
    return value


def _check_data(config: dict, data_root: str) -> None:
    """Load the dataset once, as each trial will: missing files would otherwise fail every trial, three
    times each (Tune retries), minutes later. On a cluster (RAY_ADDRESS) the nodes' files are not
    necessarily the driver's, so this is skipped there."""
    load_data(config["dataset"], data_root or None, validation_size=config["validation_size"],
              image_size=config["image_size"])


def preset_config(name: str, changes: dict) -> dict:
    """The preset with `changes`, validated; flat."""
    return preset(name, **changes).to_flat()


def check_grid(args: StudyArgs, grid: dict[str, list] | None = None, variants: list[dict] | None = None) -> None:
    """Build every combination of `grid` (crossed with each of `variants`) once, or exit 2 naming it."""
    keys = list(grid or {})
    for combo in itertools.product(*(grid or {}).values()):
        for variant in variants or [{}]:
            changes = {**dict(zip(keys, combo)), **variant}
            try:
                Config.from_flat({**args.config, **changes})
            except ConfigError as err:
                _exit(f"{changes}: {err}")


def variant(args: StudyArgs, preset_name: str | None = None, **fields) -> dict:
    """One entry of a `_variant` list: the fields in which `preset_name` (default: the study's preset),
    with the flags' changes and `fields`, differs from the study's base config. Exits 2 if invalid."""
    try:
        flat = preset_config(preset_name or args.preset, {**args.changes, **fields})
    except ConfigError as err:
        _exit(f"{preset_name or args.preset} {fields}: {err}")
    return {k: v for k, v in flat.items() if args.config.get(k) != v}


def seeds(args: StudyArgs) -> list[int]:
    """The seeds of the study, listed explicitly: 0..seeds-1."""
    return list(range(args.seeds))


def seed_space(args: StudyArgs) -> dict:
    """The seed axis of a study's search space: one Tune trial per seed, crossed with everything else;
    with --fuse-seeds, one trial per configuration that trains all the seeds fused (`_seeds`)."""
    return {"_seeds": seeds(args)} if args.fuse_seeds else {"seed": tune.grid_search(seeds(args))}


def _exit(message: str) -> None:
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {' '.join(str(message).split())}\n")
    sys.exit(2)


# --- Ray and the MLflow parent run --------------------------------------------------------------


@dataclass
class Study:
    name: str  # MLflow experiment and the parent run's `stawm.study`
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    swept: list[str]
    base_config: dict  # flat config + runner keys: what every trial's config starts from


def start_study(args: StudyArgs, swept: list[str], *, name: str | None = None) -> Study:
    """Connect Ray (RAY_ADDRESS: join that cluster; else start one on this machine), check the storage
    for the cluster's size, and create (or, with --resume, reopen) the study's MLflow parent run."""
    name = name or args.name
    if not ray.is_initialized():
        env = {"MLFLOW_TRACKING_URI": args.tracking_uri,
               # trials import stawm: from this checkout when it is not installed on the nodes
               "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
        ray.init(address=os.environ.get("RAY_ADDRESS"), runtime_env={"env_vars": env})
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    try:
        preflight.check_storage_for_cluster(args.storage, nodes)
    except preflight.PreflightError as err:
        ray.shutdown()
        _exit(str(err))
    client = MlflowClient(args.tracking_uri)
    experiment_id = _experiment(client, name, args.tracking_uri)
    found = None
    if args.resume:
        found = client.search_runs([experiment_id], _filter({"stawm.role": "study", "stawm.study": name}),
                                   max_results=1, order_by=["attributes.start_time DESC"])
        found = found[0] if found else None
    if args.gpus_per_trial == "auto" or args.gpu_choice:
        _choose_gpus(args, found.data.params if found is not None else {})
    if found is None:
        parent = client.create_run(experiment_id, run_name=name,
                                   tags={"stawm.role": "study", "stawm.study": name}).info.run_id
        flags = {k: v for k, v in dataclasses.asdict(args).items()
                 if k not in ("changes", "config", "extra", "set", "resume", "gpu_choice")}
        params = {**flags, **args.extra, "set": ",".join(args.set), "seeds": args.seeds,
                  "swept": ",".join(s for s in swept if s != "seed"), "epochs": args.config["epochs"],
                  **({"gpus_per_trial": "auto", **args.gpu_choice} if args.gpu_choice else {})}
        client.log_batch(parent, params=[Param(k, str(v)) for k, v in params.items()])
    else:
        parent = found.info.run_id
        client.update_run(parent, status="RUNNING")
    base = {**args.config, "_study": name, "_experiment_id": experiment_id, "_parent_run_id": parent,
            "_tracking_uri": args.tracking_uri, "_git_commit": _git_commit(), "_data_root": args.data_root,
            "_device": args.device, "_gpu_fraction": args.gpus_per_trial,
            "_gpu_overhead_mb": args.gpu_choice.get("probe_overhead_mb", 0.0), "_fuse_seeds": args.fuse_seeds}
    return Study(name, parent, experiment_id, args.tracking_uri, list(swept), base)


# --- --gpus-per-trial auto: a GPU share from a measured peak --------------------------------------


def gpu_fraction(peak_mb: float, total_mb: float, *, overhead_mb: float = 0.0, safety: float = GPU_SAFETY,
                 max_trials: int = MAX_TRIALS_PER_GPU) -> float:
    """Each trial's share of a GPU: 1/k for the most trials k (at most `max_trials`) that fit on it.

    A trial needs `peak_mb * safety + overhead_mb` (its allocator's peak with a margin, plus what its
    process holds outside the allocator: the CUDA context, library handles). k = floor(total / need),
    so the share is max(need / total, 1 / max_trials) rounded up to the next 1/k: k trials then fill a
    GPU with no sliver left that no trial could use. A need above the whole GPU still gets 1 (k = 1).
    E.g. peak 3,000 MiB on 80,000 MiB: need 3,750, 80,000 / 3,750 = 21.3, so 1/21 (with max_trials >= 21).
    """
    need = peak_mb * safety + overhead_mb
    return 1 / max(1, min(max_trials, math.floor(total_mb / need)))


def _choose_gpus(args: StudyArgs, previous: dict) -> None:
    """--gpus-per-trial auto: set the share (and the device) from a probe, once per study; a study that
    resumes keeps the share its parent run recorded, as its restored trials' configs do."""
    if not args.gpu_choice:
        if "gpu_fraction" in previous:
            args.gpu_choice = {k: float(v) for k, v in previous.items()
                               if k in ("gpu_fraction", "probe_peak_mb", "probe_overhead_mb", "gpu_total_mb")}
            how = "as when the study started"
        elif ray.cluster_resources().get("GPU", 0) < 1:
            args.gpu_choice = {"gpu_fraction": 0.0}
            how = "the Ray cluster has no GPU, so trials run on the CPU"
        else:
            probe = ray.get(_probe.remote(_probe_configs(args), args.data_root, fused=args.fuse_seeds))
            fraction = gpu_fraction(probe["peak_mb"], probe["total_mb"], overhead_mb=probe["overhead_mb"])
            args.gpu_choice = {"gpu_fraction": fraction, "probe_peak_mb": round(probe["peak_mb"], 1),
                               "probe_overhead_mb": round(probe["overhead_mb"], 1),
                               "gpu_total_mb": round(probe["total_mb"], 1)}
            how = (f"measured on {probe['gpu']} in {PROBE_STEPS} steps: peak {probe['peak_mb']:.0f} MiB allocated "
                   f"+ {probe['overhead_mb']:.0f} MiB outside the allocator, of {probe['total_mb']:.0f} MiB; "
                   f"{round(1 / fraction)} trials per GPU")
        print(f"--gpus-per-trial auto: {args.gpu_choice['gpu_fraction']:.4g} GPU per trial ({how})", flush=True)
    args.gpus_per_trial = args.gpu_choice["gpu_fraction"]
    if args.device == "cuda" and args.gpus_per_trial == 0:
        ray.shutdown()
        _exit("--device cuda, but the Ray cluster has no GPU")
    args.device = "cuda" if args.gpus_per_trial > 0 else "cpu"


def _probe_configs(args: StudyArgs) -> list[dict]:
    """What a trial of the study trains, cut to PROBE_STEPS steps: the base config, over every seed if fused.

    The base config only: a grid that makes trials bigger (glimpse_size, memory_size) needs more; the
    cap then stops the bigger trial (out of memory, loudly) rather than its neighbours."""
    flat = {**args.config, "epochs": 1, "max_steps": PROBE_STEPS}
    return [{**flat, "seed": seed} for seed in seeds(args)] if args.fuse_seeds else [flat]


@ray.remote(num_gpus=1, max_calls=1)  # a GPU of its own; max_calls=1: the process exits and frees it
def _probe(flat_cfgs: list[dict], data_root: str, fused: bool) -> dict:
    """Train the configs (fused, or the one plain) for one capped epoch on a GPU; the CUDA memory that took.

    Untested here: the machines the tests run on have no GPU (BENCHMARKS.md, "GPU: to be measured")."""
    cfgs = [Config.from_flat(flat) for flat in flat_cfgs]
    torch.cuda.reset_peak_memory_stats(0)
    if fused:
        for _ in train_fused(cfgs, device="cuda", data_root=data_root or None):
            pass
    else:
        for _ in train(cfgs[0], device="cuda", data_root=data_root or None):
            pass
    free, total = torch.cuda.mem_get_info(0)  # counts every process on the GPU: errs towards fewer trials
    return {"peak_mb": torch.cuda.max_memory_allocated(0) / 2**20, "total_mb": total / 2**20,
            "overhead_mb": (total - free - torch.cuda.memory_reserved(0)) / 2**20, "gpu": torch.cuda.get_device_name(0)}


def _experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):  # artifacts beside the database, not in whatever cwd the driver has
        database = Path(tracking_uri[len("sqlite:///"):].partition("?")[0]).resolve()
        location = (database.parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _filter(tags: dict[str, str]) -> str:
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


# --- Tune pieces ---------------------------------------------------------------------------------


def resources(args: StudyArgs) -> dict[str, float]:
    """For tune.with_resources. A fractional GPU only sets CUDA_VISIBLE_DEVICES: the trial caps its memory."""
    return {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}


def experiment_path(args: StudyArgs, name: str | None = None) -> str:
    return f"{args.storage.rstrip('/')}/{name or args.name}"


def run_config(args: StudyArgs, name: str | None = None) -> tune.RunConfig:
    """A failed trial is retried twice from its last checkpoint.

    Tune deletes no checkpoint (num_to_keep=None): with num_to_keep=1 it deletes checkpoint k-1 as soon as
    k is registered, while the experiment state on storage still names k-1 until its next snapshot; a
    driver killed in between leaves a study that cannot resume ("does not exist on storage anymore":
    it happened here on the first try). Instead the trainable empties older checkpoint folders itself
    (`_drop_payload`): one full checkpoint per trial, the folders Tune may name stay, and a resumed
    trial continues from the newest complete one (`_restore_newest`).
    """
    return tune.RunConfig(
        name=name or args.name,
        storage_path=args.storage,
        failure_config=tune.FailureConfig(max_failures=2),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
    )


def restored(args: StudyArgs, trainable, *, name: str | None = None) -> tune.Tuner | None:
    """With --resume and a saved Ray experiment: `Tuner.restore` (unfinished and errored trials continue
    from their checkpoints; the saved search space and RunConfig apply). None when there is nothing to
    restore: the study then builds its new `tune.Tuner(...)` in view."""
    path = experiment_path(args, name)
    if not tune.Tuner.can_restore(path):
        return None
    if not args.resume:
        _exit(f"{path} already holds a Ray experiment: pass --resume to continue it, or choose another --name")
    print(f"resuming the Ray experiment in {path}", flush=True)
    return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)


def checkpoint_file(args: StudyArgs, checkpoint: tune.Checkpoint) -> str:
    """The engine's checkpoint.pt inside a Tune checkpoint, as a path or URI a trial on any node can read."""
    scheme = args.storage.split("://")[0] + "://" if "://" in args.storage else ""
    return f"{scheme}{checkpoint.path}/{CHECKPOINT}"


def best_configs(results, keys: list[str], *, metric: str, top: int) -> list[dict]:
    """The `top` settings of `keys` with the lowest mean last-epoch `metric` over their trials (seeds)."""
    frame = results.get_dataframe()  # one row per trial: its last result and its config
    columns = [f"config/{k}" for k in keys]
    means = frame.dropna(subset=[metric]).groupby(columns)[metric].agg(["mean", "count"]).sort_values("mean")
    print(means.head(top).to_string())
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(keys, index)} for index in means.index[:top]]


def finish_study(study: Study, results) -> int:
    """Close runs Tune stopped from outside, end the parent run, print one line per trial; 0 if no trial errored.

    `results`: a ResultGrid, or the Results of several Tuners of one study."""
    results = list(results)
    client = MlflowClient(study.tracking_uri)
    errors = 0
    print(f"\n{study.name}: {len(results)} trials")
    for result in results:
        trial_id = result.metrics.get("trial_id")  # absent if the trial never reported
        if trial_id:
            _close_stopped_runs(client, study, trial_id, result)
        errors += result.error is not None
        print("  " + _summary_line(result, study.swept, trial_id or Path(result.path).name))
    client.set_terminated(study.parent_run_id, "FAILED" if errors else "FINISHED")
    where = (f"mlflow ui --backend-store-uri {study.tracking_uri}" if not study.tracking_uri.startswith("http")
             else study.tracking_uri)
    print(f"MLflow experiment {study.name!r}, parent run {study.parent_run_id}: {where}", flush=True)
    return 1 if errors else 0


def _close_stopped_runs(client: MlflowClient, study: Study, trial_id: str, result) -> None:
    """End the trial's runs left RUNNING: a trial stopped by a scheduler (ASHA) may be killed inside
    `tune.report` before it closes its runs; a trial whose process died (a lost node, out of memory) cannot."""
    runs = client.search_runs([study.experiment_id], _filter({"mlflow.parentRunId": study.parent_run_id,
                                                              "stawm.trial_id": trial_id}))
    running = [run for run in runs if run.info.status == "RUNNING"]
    if not running:
        return
    state = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            state = _read_state(Path(folder))
    members = _member_states(state) if state else []
    for run in running:
        member = int(run.data.tags.get("stawm.member", 0))
        if member < len(members) and "stability" in members[member]:
            client.log_dict(run.info.run_id, members[member]["stability"], "stability.json")
        if result.error is None and state.get("epoch", 0) < trial_config(result.config).epochs:
            client.set_tag(run.info.run_id, "stawm.stopped_early", "true")
        client.set_terminated(run.info.run_id, "FAILED" if result.error is not None else "FINISHED")


def _summary_line(result, swept: list[str], trial_id: str) -> str:
    config = {**result.config, **result.config.get("_variant", {})}
    if "__trial_index__" in result.config:
        config["seed"] = result.config["__trial_index__"]
    if "_seeds" in config:  # fused seeds: Tune's numbers are their means (`_fused_tune_metrics`)
        config["seed"] = ",".join(map(str, config["_seeds"]))
    shown = " ".join(f"{k}={_short(config[k])}" for k in [*swept, "seed"] if k in config)
    if result.error is not None:
        return f"{trial_id}  {shown}  ERROR: {str(result.error).strip().splitlines()[-1]}"
    m = result.metrics
    scores = ("diverged" if m.get("diverged") else
              "  ".join(f"{k}={m[k]:.4f}" for k in ("test_error", "val_error", "test_recon_loss") if k in m))
    verdict = "stable" if m.get("stability_ok", True) else f"FLAGGED: {m.get('stability_flags', '')}"
    return f"{trial_id}  {shown}  {scores or 'no result'}  {verdict}"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- the trainable ------------------------------------------------------------------------------


def trainable(config: dict) -> None:
    """One Tune trial: train its members, mirror each epoch into their MLflow runs and a Tune report.

    A plain trial has one member, trained by `engine.train`. A trial whose config lists `_seeds`
    (--fuse-seeds, `seed_space`) has one member per seed, trained as one fused model by
    `fused.train_fused`: each member keeps its own MLflow run, seed and stability report, and Tune
    sees their mean (`_fused_tune_metrics`).

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
    device, gpu = _device(config)
    runs = [_open_run(client, config, cfg, context.get_trial_id(), context.get_trial_name(), gpu,
                      member=k if fused else None) for k, cfg in enumerate(cfgs)]  # (run id, resumed) each
    checkpoint = tune.get_checkpoint()  # None on a trial's first attempt
    fail_at = config.get("_fail_once_at_epoch", 0) if checkpoint is None else 0
    for stale in Path(tempfile.gettempdir()).glob(f"stawm-{context.get_trial_id()}-*"):  # a killed attempt's
        shutil.rmtree(stale, ignore_errors=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"stawm-{context.get_trial_id()}-"))
    members = [{"stability": StabilityMonitor(cfg).report()} for cfg in cfgs]  # before any epoch: the static check
    epoch, open_runs = 0, {k: run_id for k, (run_id, _) in enumerate(runs)}  # member -> its run, until closed
    try:
        if checkpoint is not None:
            checkpoint, state = _restore_newest(checkpoint, workdir)
            epoch, members = state["epoch"], _member_states(state)
        _close_stopped(client, open_runs, members)  # stopped before the restart: their runs stay closed
        logged = [_last_logged_epoch(client, run_id) if resumed else 0  # killed between a log and its report
                  for run_id, resumed in runs]
        epochs = _member_epochs(cfgs, fused, device, config.get("_data_root") or None, workdir,
                                resume=checkpoint is not None) if open_runs else []
        for records in epochs:
            epoch = next(record["epoch"] for record in records if record is not None)
            if epoch == fail_at:
                raise RuntimeError(f"fault injected at epoch {fail_at} (_fail_once_at_epoch, a test-only knob)")
            results = []  # what Tune would see of each member alone
            for k, record in enumerate(records):
                if record is None:  # fused and stopped in an earlier epoch: it diverged
                    results.append(_tune_metrics({}, {"stability": members[k]["stability"], "diverged": True}, cfgs[k]))
                    continue
                metrics, members[k] = _member_epoch(record, members[k])
                if epoch > logged[k]:
                    client.log_batch(open_runs[k], metrics=[Metric(key, value, int(time.time() * 1000), epoch)
                                                            for key, value in metrics.items()],
                                     tags=_stability_tags(record["stability"]))
                results.append(_tune_metrics(metrics, record, cfgs[k]))
            _save_state(workdir, epoch, members, FUSED_CHECKPOINT if fused else CHECKPOINT)
            tune.report(_fused_tune_metrics(results, config["_seeds"]) if fused else results[0],
                        checkpoint=tune.Checkpoint.from_directory(workdir))
            checkpoint = _keep_only(tune.get_checkpoint(), checkpoint)  # report returns once it is stored
            _close_stopped(client, open_runs, members)  # a diverged member: closed, flagged; the rest go on
    except SystemExit:  # Tune stopped the trial inside tune.report (a scheduler's decision): not a failure
        shutil.rmtree(workdir, ignore_errors=True)  # first: Tune may end this process any moment now
        for k, run_id in open_runs.items():
            _close_run(client, run_id, members[k]["stability"], "FINISHED", stopped_early=epoch < cfgs[k].epochs)
        raise
    except BaseException:
        for k, run_id in open_runs.items():
            _close_run(client, run_id, members[k]["stability"], "FAILED")
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for k, run_id in open_runs.items():
        _close_run(client, run_id, members[k]["stability"], "FINISHED")


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


def _member_epochs(cfgs: list[Config], fused: bool, device: str, data_root: str | None, workdir: Path,
                   resume: bool) -> Iterator[list[dict | None]]:
    """Per epoch, one record per member: train_fused's list, or engine.train's record as a list of one."""
    cfgs = [_local_pretrained(cfg) for cfg in cfgs]
    if fused:
        yield from train_fused(cfgs, device=device, data_root=data_root, checkpoint_dir=workdir, resume=resume)
    else:
        yield from ([record] for record in train(cfgs[0], device=device, data_root=data_root,
                                                  checkpoint_dir=workdir, resume=resume))


def _member_epoch(record: dict, member: dict) -> tuple[dict, dict]:
    """A member's epoch metrics (numeric fields + best_test_error) and its runner state after the epoch."""
    metrics = {k: float(v) for k, v in record.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
    best = [v for v in (metrics.get("test_error", math.nan), member.get("best_test_error", math.nan))
            if math.isfinite(v)]
    if best:
        metrics["best_test_error"] = min(best)
    member = {"stability": record["stability"], "stopped": record["diverged"],
              **{k: metrics[k] for k in ("best_test_error",) if k in metrics}}
    return metrics, member


def _save_state(workdir: Path, epoch: int, members: list[dict], checkpoint: str) -> None:
    """The runner state beside the epoch's checkpoint: its size (to tell a whole copy) and each member's state."""
    state = {"epoch": epoch, "checkpoint": checkpoint, "checkpoint_bytes": (workdir / checkpoint).stat().st_size,
             "members": members}
    (workdir / RUNNER_STATE).write_text(json.dumps(state))


def _member_states(state: dict) -> list[dict]:
    """Each member's state in a runner state (one written before fused trials holds one member, flat)."""
    if "members" in state:
        return state["members"]
    return [{k: state[k] for k in ("stability", "best_test_error") if k in state}]


def _close_stopped(client: MlflowClient, open_runs: dict[int, str], members: list[dict]) -> None:
    """Close the runs of members that stopped (diverged): FINISHED, their verdict in the tags."""
    for k in [k for k in open_runs if members[k].get("stopped")]:
        _close_run(client, open_runs.pop(k), members[k]["stability"], "FINISHED")


def _local_pretrained(cfg: Config) -> Config:
    """A `pretrained` checkpoint on remote storage (s3://, gs://...) copied to a fixed local path once.

    The path depends only on the URI, so a retried trial (even on another node) resumes with the same config."""
    if "://" not in cfg.pretrained:
        return cfg
    local = Path(tempfile.gettempdir()) / "stawm-pretrained" / hashlib.sha1(cfg.pretrained.encode()).hexdigest()[:16]
    if not (local / CHECKPOINT).exists():
        local.mkdir(parents=True, exist_ok=True)
        filesystem, path = pyarrow.fs.FileSystem.from_uri(cfg.pretrained)
        pyarrow.fs.copy_files(path, str(local / (CHECKPOINT + ".part")), source_filesystem=filesystem)
        os.replace(local / (CHECKPOINT + ".part"), local / CHECKPOINT)
    return cfg.replace(pretrained=str(local / CHECKPOINT))


def _device(config: dict) -> tuple[str, str]:
    """The trial's device and its name for `stawm.gpu`; caps CUDA memory to a fractional GPU's share."""
    if config.get("_device", "cpu") != "cuda":
        return "cpu", "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("device cuda asked but this trial sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    torch.cuda.reset_peak_memory_stats(0)  # peak_memory_mb is this trial's, also when Tune reuses the process
    fraction = float(config.get("_gpu_fraction") or 1.0)
    if fraction < 1.0:  # Ray only set CUDA_VISIBLE_DEVICES; nothing else stops a trial taking the whole GPU
        # the cap binds torch's allocator only: what the process holds besides (CUDA context) comes off it
        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        torch.cuda.set_per_process_memory_fraction(fraction - float(config.get("_gpu_overhead_mb", 0)) / total_mb, 0)
    return "cuda", torch.cuda.get_device_name(0)


def _open_run(client: MlflowClient, config: dict, cfg: Config, trial_id: str, trial_name: str,
              gpu: str, member: int | None = None) -> tuple[str, bool]:
    """The child run of the trial (or of its member, when fused): continued if one is tagged with this
    trial id (and member index), else created. Returns the run id and whether it was continued."""
    keys = {"mlflow.parentRunId": config["_parent_run_id"], "stawm.trial_id": trial_id}
    if member is not None:
        keys["stawm.member"] = str(member)
        trial_name = f"{trial_name}_seed{cfg.seed}"
    found = client.search_runs([config["_experiment_id"]], _filter(keys), max_results=1)
    where = [RunTag("stawm.host", socket.gethostname()), RunTag("stawm.gpu", gpu)]  # a retry may move
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=where)
        return run_id, True
    tags = {**keys, "stawm.role": "trial", "stawm.study": config["_study"], "stawm.preset": cfg.preset,
            "stawm.seed": str(cfg.seed), "stawm.git_commit": config.get("_git_commit", "unknown")}
    run_id = client.create_run(config["_experiment_id"], run_name=trial_name, tags=tags).info.run_id
    flat = cfg.to_flat()
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in flat.items()],
                     tags=[*where, *_stability_tags(StabilityMonitor(cfg).report())])
    client.log_dict(run_id, flat, "config.json")
    return run_id, False


def _stability_tags(report: dict) -> list[RunTag]:
    def text(flag: bool) -> str:
        return "true" if flag else "false"

    return [RunTag("stability.ok", text(report["ok"])), RunTag("stability.flags", ",".join(report["failed"])),
            RunTag("stability.static_ok", text(report["static_ok"])),
            RunTag("stability.diverged", text(report["diverged"]))]


def _close_run(client: MlflowClient, run_id: str, report: dict, status: str, stopped_early: bool = False) -> None:
    tags = [RunTag("stawm.stopped_early", "true")] if stopped_early else []
    client.log_batch(run_id, tags=[*_stability_tags(report), *tags])
    client.log_dict(run_id, report, "stability.json")
    client.set_terminated(run_id, status)


def _read_state(folder: Path) -> dict:
    path = folder / RUNNER_STATE
    return json.loads(path.read_text()) if path.exists() else {}


def _restore_newest(checkpoint: tune.Checkpoint, workdir: Path) -> tuple[tune.Checkpoint, dict]:
    """Copy the trial's newest complete checkpoint into workdir (the one Tune names may be older or
    emptied, see `run_config`), empty the others; return it and its runner state."""
    fs, folder = checkpoint.filesystem, posixpath.dirname(checkpoint.path)
    folders = [info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(folder))
               if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")]
    complete = {path: state for path in folders if (state := _complete_state(fs, path)) is not None}
    if not complete:
        raise RuntimeError(f"no complete checkpoint left in {folder} to resume this trial from")
    newest = max(complete, key=lambda path: complete[path]["epoch"])
    restored = tune.Checkpoint(newest, filesystem=fs)
    restored.to_directory(str(workdir))
    for path in folders:
        if path != newest:
            _drop_payload(fs, path)
    return restored, complete[newest]


def _complete_state(fs, path: str) -> dict | None:
    """The runner state of a checkpoint folder whose checkpoint file is whole (a copy cut short is not)."""
    try:
        with fs.open_input_stream(f"{path}/{RUNNER_STATE}") as stream:
            state = json.loads(stream.read())
        size = fs.get_file_info(f"{path}/{state.get('checkpoint', CHECKPOINT)}").size
    except (OSError, ValueError):
        return None
    return state if size is not None and size == state.get("checkpoint_bytes") else None


def _keep_only(latest: tune.Checkpoint, previous: tune.Checkpoint | None) -> tune.Checkpoint:
    """Empty the previous checkpoint once the latest is stored: one full checkpoint per trial."""
    if previous is not None and previous.path != latest.path:
        _drop_payload(previous.filesystem, previous.path)
    return latest


def _drop_payload(fs, path: str) -> None:
    """Empty an older checkpoint folder, keeping the folder: Tune's saved state may still name it."""
    for name in (RUNNER_STATE, CHECKPOINT, FUSED_CHECKPOINT):
        try:
            fs.delete_file(f"{path}/{name}")
        except FileNotFoundError:
            pass


def _last_logged_epoch(client: MlflowClient, run_id: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, "train_loss")), default=0)


def _tune_metrics(metrics: dict, record: dict, cfg: Config) -> dict:
    """What Tune sees: the numbers, the verdict, and an error of 1 for a diverged epoch.

    A diverged epoch has no evaluation. Searchers and schedulers need the metric, and must not prefer
    a region that diverges: counted as wrong on every image. MLflow keeps the honest record (no value).
    """
    report = record["stability"]
    result = {**metrics, "stability_ok": report["ok"], "stability_flags": ",".join(report["failed"]),
              "static_ok": report["static_ok"], "diverged": report["diverged"]}
    if record["diverged"] and cfg.task != "draw":
        for key in ERROR_METRICS if cfg.validation_size > 0 else ERROR_METRICS[:1]:
            result.setdefault(key, 1.0)
    return result


def _fused_tune_metrics(results: list[dict], seeds: list[int]) -> dict:
    """What Tune sees of a trial of fused seeds, from what each member alone would report (`_tune_metrics`).

    Each number every member has, averaged over the members, and each error metric per seed beside it
    (`test_error_seed3`). A member that stopped counts as diverged (error 1), as its own trial would:
    averaged over the live members only, a configuration would look better as its seeds diverge. The
    verdict holds for all: stable only if every member is, diverged once every member has.
    """
    numbers = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and all(k in r for r in results)]
    report = {k: sum(r[k] for r in results) / len(results) for k in numbers}
    for key in (k for k in ERROR_METRICS if k in report):
        report.update({f"{key}_seed{seed}": r[key] for seed, r in zip(seeds, results)})
    flags = sorted({flag for r in results for flag in r["stability_flags"].split(",") if flag})
    return {**report, "stability_ok": all(r["stability_ok"] for r in results), "stability_flags": ",".join(flags),
            "static_ok": all(r["static_ok"] for r in results), "diverged": all(r["diverged"] for r in results),
            "members_diverged": sum(r["diverged"] for r in results)}
