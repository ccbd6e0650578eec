"""The flags every study shares (`StudyArgs`), validated before Ray starts, and the helpers that turn
them into a study's configurations: the base config, a grid or variants checked up front, the seeds.

The flags are declared once, as documented dataclass fields parsed by tyro (`stawm.flags`, which says why):
--help shows them in three groups, study (`StudyFlags`), config (`stawm.flags.ConfigFlags`) and cluster
(`ClusterFlags`), after the study's own (a dataclass of its file, `own`). A bad flag, an unknown preset or config
field, a grid combination that is no valid Config, an unreachable tracking server or unwritable storage: one
line on stderr and exit status 2, before Ray starts or anything is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import tyro
from ray import tune

from .. import flags as shared
from ..config import Config, ConfigError, preset
from ..flags import (ConfigFlags, ConfigGroup, DataFlags, Group, NaturalFloat, NaturalInt, PositiveFloat, PositiveInt,
                     TrackingFlags, flag, value_type)
from ..train.data import MissingDataError, load_data
from .gpu_share import GPU_SAFETY, MAX_TRIALS_PER_GPU, PROBE_STEPS
from . import preflight
from .outbox import BUDGET_ENV, DEFAULT_BUDGET_S, budget_from_env

QUICK = dict(preset="tiny", seeds=2, epochs=1, dataset="mnist-sample")  # a few minutes on 2 CPU cores


def gpu_share_flag(text: str) -> float | str:
    """--gpus-per-trial: `auto` or a number >= 0."""
    if text == "auto":
        return text
    value = float(text)
    if not value >= 0:
        raise ValueError(f"must be auto or a number >= 0, got {text}")
    return value


GpuShare = value_type(float, gpu_share_flag, "auto|FLOAT")  # what --gpus-per-trial takes


@dataclass
class StudyFlags(TrackingFlags):
    """What the study runs, under which name, and where it is recorded."""

    # the study's name: MLflow experiment, parent run and Ray experiment
    name: Annotated[str, flag(unset="the script's name")] = ""
    seeds: Annotated[PositiveInt, flag(unset="5; 2 with --quick")] = 0  # seeds per configuration: 0..SEEDS-1
    quick: bool = False  # small mode: tiny preset on mnist-sample, 1 epoch, 2 seeds, a small grid
    verbose: bool = False  # Tune's status tables and Ray's line per checkpoint on the console too (Ray logs both)
    # run provably stuck runs to their last epoch too (the config's stop_stuck=False; by default such a run stops
    # after the epoch that shows it, stawm.conditions.provably_stuck)
    no_early_stop: bool = False
    # continue the study of this --name: unfinished and errored trials resume from their checkpoints, into their
    # own MLflow runs
    resume: bool = False
    tracking_outage_budget: Annotated[NaturalFloat, flag(
        unset=f"${BUDGET_ENV} or {DEFAULT_BUDGET_S:.0f}",
        help="seconds a trial keeps training while the tracking server does not answer, its epochs queued and "
             "logged when it answers again; past it the trial fails, its epochs kept for --resume")] = 0.0
    # MLflow's system metrics (CPU, memory, GPU utilisation) on each trial's runs, sampled every 10 s; auto: on when
    # the trial trains on a GPU
    system_metrics: Literal["auto", "on", "off"] = "auto"
    # print the study's plan (trials, seconds per epoch and from where, concurrency, wall time, device-hours) and exit
    # 0 without starting a trial
    plan: bool = False
    # price of one device-hour (a GPU-hour, or a CPU-core-hour when trials get no GPU): adds the cost to the plan
    price_per_hour: Annotated[NaturalFloat, flag(unset="none", metavar="X")] = 0.0
    no_report: bool = False  # skip the report (stawm-report's tables and plots) logged on the parent run at the end


@dataclass
class ClusterFlags(DataFlags):
    """Where and how the trials run: their resources, packing, retries and storage."""

    gpus_per_trial: Annotated[GpuShare, flag(help=(
        "GPUs per trial; a fraction packs trials on one GPU and caps each one's CUDA memory to it. auto: "
        f"the share a {PROBE_STEPS}-step probe of the base config needs (its peak CUDA memory x {GPU_SAFETY} "
        f"plus the process's own, rounded up to 1/k, at most {MAX_TRIALS_PER_GPU} trials per GPU); "
        "0 when the cluster has no GPU and cannot start a GPU worker"))] = 0.0
    cpus_per_trial: PositiveFloat = 1.0  # CPUs per trial
    # most trials running at once
    max_concurrent: Annotated[PositiveInt, flag(unset="as many as the resources allow")] = 0
    # times Tune retries a failed trial from its last checkpoint (a lost node, a tracking server down past its
    # budget) before it is ERROR
    max_failures: NaturalInt = 2
    # one Tune trial per configuration trains all its seeds fused in one process (stawm.fused), each seed still
    # its own MLflow run; for studies that take their seeds from runner.seed_space
    fuse_seeds: bool = False
    # Ray storage path or URI for checkpoints and results; several nodes need shared storage
    storage: Annotated[str, flag(unset="./ray_results")] = ""


@dataclass
class NoFlags:
    """A study without flags of its own."""


@shared.flat("study", "configuration", "cluster")  # args.name, args.preset, args.storage...: see `flat`
@dataclass
class StudyArgs:
    """A study's flags, by group, and what parse_args derives from them."""

    study: Group[StudyFlags] = field(default_factory=StudyFlags)
    configuration: ConfigGroup = field(default_factory=ConfigFlags)
    cluster: Group[ClusterFlags] = field(default_factory=ClusterFlags)
    # the study's own flags, a dataclass of its file (parse_args gives this field its type), shown first
    own: tyro.conf.Suppress[Any] = field(default_factory=NoFlags)
    # filled in by parse_args, not flags
    changes: tyro.conf.Suppress[dict] = field(default_factory=dict)  # what the flags change in any preset
    config: tyro.conf.Suppress[dict] = field(default_factory=dict)  # the validated flat base config: preset + changes
    # --gpus-per-trial auto: what start_study chose, and from what
    gpu_choice: tyro.conf.Suppress[dict] = field(default_factory=dict)
    # the first seed this launch trains: 0, or the study's old --seeds when --resume adds seeds (start_study)
    first_seed: tyro.conf.Suppress[int] = 0
    # the Ray experiment this launch runs in: the study's name, or NAME-seedsA-B for seeds added to it
    tune_name: tyro.conf.Suppress[str] = ""

    def flags(self) -> dict:
        """Every flag's value by its field's name, the study's own too; a --config.FIELD given as `config.FIELD`
        (the ones left out are the preset's values, which each trial's run records)."""
        values = {}
        for group in (self.study, self.configuration, self.cluster, self.own):
            values.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group) if f.name != "overrides"})
        overrides = vars(self.configuration.overrides).items()
        return {**values, **{f"config.{name}": value for name, value in overrides if value is not None}}


def parse_args(description: str, *, preset: str, argv: list[str] | None = None, own: type | None = None) -> StudyArgs:
    """Parse and validate the common flags and the study's own (`own`: a dataclass, as `args.own`), or exit 2.

    Everything that can be checked without Ray is checked here: the preset, the seeds, each config field and
    value (by building the Config once), the tracking URI and the storage path.
    """
    prog = Path(sys.argv[0]).name
    own = own or NoFlags
    command = dataclasses.make_dataclass(  # StudyArgs with the study's own flags typed, unprefixed
        "StudyArgs", [("own", Annotated[own, flag(name="")], field(default_factory=own))], bases=(StudyArgs,))
    args = shared.parse(command, argv, prog=prog, description=description)
    args.name = args.name or Path(sys.argv[0]).stem
    args.preset = args.preset or (QUICK["preset"] if args.quick else preset)
    args.seeds = args.seeds or (QUICK["seeds"] if args.quick else 5)
    auto_gpus = args.gpus_per_trial == "auto"  # the share is chosen in start_study, once Ray is up
    try:
        if auto_gpus and args.device == "cpu":
            raise ValueError("--gpus-per-trial auto chooses GPUs: leave --device at auto (or cuda)")
        if args.device == "cuda" and not auto_gpus and args.gpus_per_trial <= 0:
            raise ValueError("--device cuda needs --gpus-per-trial > 0 (Ray hides GPUs from trials that ask none)")
        args.tracking_outage_budget = args.tracking_outage_budget or budget_from_env()
        quick = {"dataset": QUICK["dataset"], "epochs": QUICK["epochs"]} if args.quick else {}
        no_early_stop = {"stop_stuck": False} if args.no_early_stop else {}
        changes = {**quick, **no_early_stop, **args.configuration.changes()}
        args.changes, args.config = changes, preset_config(args.preset, changes)
        args.tracking_uri = args.tracking_uri or shared.default_tracking_uri()
        args.storage = args.storage or os.path.abspath("ray_results")
        preflight.check_outside_job_folder({"--storage": args.storage, "--tracking-uri": args.tracking_uri,
                                            **({"--data-root": args.data_root} if args.data_root else {})})
        args.tracking_uri = preflight.check_tracking_uri(args.tracking_uri)
        args.storage = preflight.check_storage(args.storage)
        args.data_root = os.path.abspath(os.path.expanduser(args.data_root)) if args.data_root else ""
        if not os.environ.get("RAY_ADDRESS"):  # trials run here and read what the driver sees
            _check_data(args.config, args.data_root)
        if not args.resume and tune.Tuner.can_restore(experiment_path(args)):
            raise ValueError(f"study {args.name!r} already has results in {experiment_path(args)}: "
                             "pass --resume to continue it, or choose another --name")
    except (ValueError, preflight.PreflightError, MissingDataError) as err:  # ConfigError is a ValueError
        fail(str(err))
    return args


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
                fail(f"{changes}: {err}")


def variant(args: StudyArgs, preset_name: str | None = None, **fields) -> dict:
    """One entry of a `variant` list: the fields in which `preset_name` (default: the study's preset),
    with the flags' changes and `fields`, differs from the study's base config. Exits 2 if invalid."""
    try:
        flat = preset_config(preset_name or args.preset, {**args.changes, **fields})
    except ConfigError as err:
        fail(f"{preset_name or args.preset} {fields}: {err}")
    return {k: v for k, v in flat.items() if args.config.get(k) != v}


def seeds(args: StudyArgs) -> list[int]:
    """The seeds this launch trains, listed explicitly: 0..seeds-1, or only the seeds added to a finished
    study (`first_seed`..seeds-1, set by start_study when --resume raises --seeds)."""
    return list(range(args.first_seed, args.seeds))


def seed_space(args: StudyArgs) -> dict:
    """The seed axis of a study's search space: one Tune trial per seed, crossed with everything else;
    with --fuse-seeds, one trial per configuration that trains all the seeds fused (`seeds`)."""
    return {"seeds": seeds(args)} if args.fuse_seeds else {"seed": tune.grid_search(seeds(args))}


def fail(message: str) -> NoReturn:
    """Stop the study before it starts: one line on stderr, exit status 2 (as a bad flag does)."""
    shared.fail(Path(sys.argv[0]).name, message)


def experiment_path(args: StudyArgs, name: str | None = None) -> str:
    """Where Ray Tune keeps the study `name` (default: this launch's Ray experiment): storage/NAME."""
    return f"{args.storage.rstrip('/')}/{name or args.tune_name or args.name}"
