"""One training run from the command line.

    stawm-train --preset mnist-class-8 --epochs 1 --seed 0 --config.memory-size 128 --config.glimpses 4 --json out.json

(`python -m stawm.train` is the same command; its flags are `TrainArgs`, with the config and data groups of
`stawm.flags` that the studies share.)

Prints one summary line per epoch (and a progress bar when the terminal is interactive), and one line when
the run stops before its last epoch (diverged, or its memory provably stuck); with --json
writes the final metrics (`test_error` as a fraction at the top level) and the stability report.
A checkpoint is written atomically each epoch to --checkpoint-dir; `--resume DIR` continues one.
Bad input (a flag, a config value, missing or damaged data or checkpoint files): one line on stderr
naming it, exit status 2, before any epoch runs.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import torch

from .. import schema
from ..flags import ConfigFlags, ConfigGroup, DataFlags, Group, error_line, flag, flat, one_of, parse
from .checkpoints import CHECKPOINT, CheckpointError
from .data import MissingDataError
from .loop import final_metrics, train
from .step import COMPILE_MODES, PRECISIONS

PROG = "stawm-train"
CompileMode, Precision = one_of(COMPILE_MODES), one_of(PRECISIONS)


@flat("configuration", "data")  # args.preset, args.data_root...: see stawm.flags.flat
@dataclass
class TrainArgs:
    """stawm-train's own flags; the configuration and the data are the groups the studies share."""

    seed: int = 0  # seeds init, data order, augmentation, dropout
    # torch.compile mode for the model (none: plain eager); a GPU option
    compile: CompileMode = "none"
    precision: Precision = "fp32"  # bf16 autocasts the forward pass (see BENCHMARKS.md before using bf16)
    # where the per-epoch checkpoint goes
    checkpoint_dir: Annotated[Optional[Path], flag(unset="runs/PRESET-seedSEED", metavar="DIR")] = None
    # continue the run whose checkpoint is in DIR
    resume: Annotated[Optional[Path], flag(unset="a new run", metavar="DIR")] = None
    # write final metrics and the stability report here
    json: Annotated[Optional[Path], flag(unset="none", metavar="FILE")] = None
    no_progress: bool = False  # no progress bar even on a terminal
    configuration: ConfigGroup = field(default_factory=lambda: ConfigFlags(preset="mnist-class-8"))
    data: Group[DataFlags] = field(default_factory=DataFlags)


def parse_args(argv=None) -> TrainArgs:
    return parse(TrainArgs, argv, prog=PROG, description=__doc__.split("\n\n")[0])


def summary_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']:>3}", f"loss {record[schema.TRAIN_LOSS]:.4f}"]
    for key, fmt in (("train_accuracy", "acc {:.2%}"), (schema.TEST_ERROR, "test error {:.2%}"),
                     (schema.VAL_ERROR, "val error {:.2%}"), (schema.TEST_RECON_LOSS, "test recon {:.2f}")):
        if key in record:
            parts.append(fmt.format(record[key]))
    parts.append(f"{record['epoch_seconds']:.1f}s ({record['images_per_second']:.0f} img/s)")
    parts.append("conditions met" if record["stability_ok"] else f"FLAGGED: {','.join(record['stability_flags'])}")
    return " | ".join(parts)


def stop_line(record: dict, epochs: int) -> str | None:
    """The line that says the run stopped after this epoch, and why; None while it goes on."""
    reason, epoch = record.get("stop_reason"), record["epoch"]
    if reason == "diverged":
        return f"stopped after epoch {epoch} of {epochs}: diverged (loss, gradients or W not finite)"
    if reason == "stuck":
        return (f"stopped after epoch {epoch} of {epochs}: memory provably stuck (W = 0 through the epoch, theta = 0, "
                f"sigma flat at 0: nothing before the read-out can train again); the last test error is final "
                f"(--config.stop-stuck false runs every epoch)")
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = args.configuration.config(seed=args.seed)
    except schema.ParamError as err:  # ConfigError is one
        return _error(err)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint_dir = args.resume or args.checkpoint_dir or Path("runs") / f"{cfg.preset}-seed{cfg.seed}"
    if args.resume is None and (checkpoint_dir / CHECKPOINT).exists():
        return _error(f"{checkpoint_dir / CHECKPOINT} exists; continue it with --resume {checkpoint_dir} "
                      "or choose another --checkpoint-dir")
    if args.resume is not None and not (args.resume / CHECKPOINT).exists():
        return _error(f"no {CHECKPOINT} in {args.resume} to resume")
    progress = sys.stderr.isatty() and not args.no_progress
    records = []
    try:
        for (record,) in train([cfg], device=device, data_root=args.data_root or None, checkpoint_dir=checkpoint_dir,
                            resume=args.resume is not None, progress=progress, compile=args.compile,
                            precision=args.precision):
            records.append(record)
            print(summary_line(record), flush=True)
            if line := stop_line(record, cfg.epochs):
                print(line, flush=True)
    except (MissingDataError, CheckpointError) as err:  # the files given are the bad input
        return _error(err)
    if not records:
        print(f"nothing to do: the run in {checkpoint_dir} already finished {cfg.epochs} epochs, or stopped before")
        return 0
    if args.json is not None:
        result = {**final_metrics(records), "config": cfg.to_flat(), "stability": records[-1]["stability"],
                  "checkpoint": str(checkpoint_dir / CHECKPOINT)}
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def _error(message) -> int:
    sys.stderr.write(error_line(PROG, message))
    return 2
