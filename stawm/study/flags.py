"""The flags every study shares (`StudyArgs`), validated before Ray starts, and the helpers that turn
them into a study's configurations: the base config, a grid or variants checked up front, the seeds.

A bad flag, an unknown preset or config field, a grid combination that is no valid Config, an
unreachable tracking server or unwritable storage: one line on stderr and exit status 2, before Ray
starts or anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from ray import tune

from .. import schema
from ..config import PRESETS, Config, ConfigError, preset
from ..train.data import MissingDataError, load_data
from .gpu_share import GPU_SAFETY, MAX_TRIALS_PER_GPU, PROBE_STEPS
from ..provenance import redact
from . import preflight
from .outbox import BUDGET_ENV, DEFAULT_BUDGET_S, budget_from_env

QUICK = dict(preset="tiny", seeds=2, epochs=1, dataset="mnist-sample")  # a few minutes on 2 CPU cores


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def natural_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def gpu_share_flag(text: str) -> float | str:
    """--gpus-per-trial: `auto` or a number >= 0."""
    if text == "auto":
        return text
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be auto or a number >= 0, got {text}")
    return value


def _help(text: str, kind=None, **kw):
    """A flag: its --help line and, when not the field's own type, what parses it."""
    return field(metadata={"help": text, "kind": kind}, **kw)


@dataclass
class StudyArgs:
    """Flags every study shares; each field's doc is its --help line."""

    preset: str = _help("Appendix D configuration the study starts from (default: the study's; tiny with --quick)",
                        default="")
    seeds: int = _help("seeds per configuration: 0..SEEDS-1 (default: 5; 2 with --quick)", positive_int, default=0)
    epochs: int = _help("epochs per trial (default: the preset's, i.e. the paper's; 1 with --quick)", positive_int,
                       default=0)
    quick: bool = _help("small mode: tiny preset on mnist-sample, 1 epoch, 2 seeds, a small grid", default=False)
    authors_code: bool = _help("start every configuration from the authors' script for its preset instead of the "
                               "paper's (preset(name, authors_code=True); the differences: README)", default=False)
    gpus_per_trial: float | str = _help(
        "GPUs per trial; a fraction packs trials on one GPU and caps each one's CUDA memory to it. auto: "
        f"the share a {PROBE_STEPS}-step probe of the base config needs (its peak CUDA memory x {GPU_SAFETY} "
        f"plus the process's own, rounded up to 1/k, at most {MAX_TRIALS_PER_GPU} trials per GPU); "
        "0 when the cluster has no GPU and cannot start a GPU worker", gpu_share_flag, default=0.0)
    fuse_seeds: bool = _help("one Tune trial per configuration trains all its seeds fused in one process "
                             "(stawm.fused), each seed still its own MLflow run; for studies that take "
                             "their seeds from runner.seed_space", default=False)
    cpus_per_trial: float = _help("CPUs per trial", default=1.0)
    max_concurrent: int = _help("most trials running at once (default: as many as the resources allow)",
                                positive_int, default=0)
    max_failures: int = _help("times Tune retries a failed trial from its last checkpoint (a lost node, a "
                              "tracking server down past its budget) before it is ERROR", natural_int, default=2)
    name: str = _help("the study's name: MLflow experiment, parent run and Ray experiment "
                      "(default: the script's name)", default="")
    resume: bool = _help("continue the study of this --name: unfinished and errored trials resume from "
                         "their checkpoints, into their own MLflow runs", default=False)
    tracking_uri: str = _help("MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)",
                              default="")
    tracking_outage_budget: float = _help(
        "seconds a trial keeps training while the tracking server does not answer, its epochs queued and logged "
        f"when it answers again; past it the trial fails, its epochs kept for --resume (default: ${BUDGET_ENV} "
        f"or {DEFAULT_BUDGET_S:.0f})", default=0.0)
    storage: str = _help("Ray storage path or URI for checkpoints and results (default: ./ray_results); "
                         "several nodes need shared storage", default="")
    data_root: str = _help("dataset folder (default: $STAWM_DATA or ~/.cache/stawm)", default="")
    device: str = _help("auto | cpu | cuda (auto: each trial trains on CUDA when it sees a GPU, else on the CPU; "
                        "recorded in its run)", default="auto")
    set: list = _help("FIELD=VALUE: override any config field, repeatable (e.g. --set memory_size=128)",
                      default_factory=list)
    # filled in by parse_args, not flags
    changes: dict = field(default_factory=dict)  # what the flags change in any preset (--quick, --epochs, --set)
    config: dict = field(default_factory=dict)  # the validated flat base config: the preset with `changes`
    extra: dict = field(default_factory=dict)  # the study's own flags
    gpu_choice: dict = field(default_factory=dict)  # --gpus-per-trial auto: what start_study chose, and from what


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit status 2 (argparse would add the usage lines)
        self.exit(2, f"{self.prog}: error: {redact(' '.join(str(message).split()))}\n")


def parse_args(description: str, *, preset: str, argv: list[str] | None = None, extra=None) -> StudyArgs:
    """Parse and validate the common flags (+ the study's own, added by `extra(parser)`), or exit 2.

    Everything that can be checked without Ray is checked here: the preset, the seeds, each --set
    field and value (by building the Config once), the tracking URI and the storage path.
    """
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
            kind = f.metadata["kind"] or {"int": int, "float": float, "str": str}[f.type]
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
    auto_gpus = args.gpus_per_trial == "auto"  # the share is chosen in start_study, once Ray is up
    try:
        if args.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {args.device!r}")
        if auto_gpus and args.device == "cpu":
            raise ValueError("--gpus-per-trial auto chooses GPUs: leave --device at auto (or cuda)")
        if args.device == "cuda" and not auto_gpus and args.gpus_per_trial <= 0:
            raise ValueError("--device cuda needs --gpus-per-trial > 0 (Ray hides GPUs from trials that ask none)")
        if args.cpus_per_trial <= 0:
            raise ValueError("--cpus-per-trial must be > 0")
        if args.tracking_outage_budget < 0:
            raise ValueError("--tracking-outage-budget must be > 0 seconds")
        args.tracking_outage_budget = args.tracking_outage_budget or budget_from_env()
        changes = {"dataset": QUICK["dataset"], "epochs": QUICK["epochs"]} if args.quick else {}
        if args.authors_code:  # preset() applies it to whichever preset a configuration starts from
            changes["authors_code"] = True
        if args.epochs:
            changes["epochs"] = args.epochs
        changes.update(schema.parse_pairs(args.set))
        args.changes, args.config = changes, preset_config(args.preset, changes)
        args.tracking_uri = args.tracking_uri or preflight.default_tracking_uri()
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
        parser.error(str(err))
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
    """One entry of a `_variant` list: the fields in which `preset_name` (default: the study's preset),
    with the flags' changes and `fields`, differs from the study's base config. Exits 2 if invalid."""
    try:
        flat = preset_config(preset_name or args.preset, {**args.changes, **fields})
    except ConfigError as err:
        fail(f"{preset_name or args.preset} {fields}: {err}")
    return {k: v for k, v in flat.items() if args.config.get(k) != v}


def seeds(args: StudyArgs) -> list[int]:
    """The seeds of the study, listed explicitly: 0..seeds-1."""
    return list(range(args.seeds))


def seed_space(args: StudyArgs) -> dict:
    """The seed axis of a study's search space: one Tune trial per seed, crossed with everything else;
    with --fuse-seeds, one trial per configuration that trains all the seeds fused (`_seeds`)."""
    return {"_seeds": seeds(args)} if args.fuse_seeds else {"seed": tune.grid_search(seeds(args))}


def fail(message: str) -> NoReturn:
    """Stop the study before it starts: one line on stderr, exit status 2 (as a bad flag does)."""
    sys.stderr.write(f"{Path(sys.argv[0]).name}: error: {redact(' '.join(str(message).split()))}\n")
    sys.exit(2)


def experiment_path(args: StudyArgs, name: str | None = None) -> str:
    """Where Ray Tune keeps the study `name` (default: the study's own): storage/NAME."""
    return f"{args.storage.rstrip('/')}/{name or args.name}"
