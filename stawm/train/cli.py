"""One training run from the command line.

    stawm-train --preset mnist-class-8 --epochs 1 --seed 0 --set memory_size=128 --set glimpses=4 --json out.json

(`python -m stawm.train` is the same command.)

Prints one summary line per epoch (and a progress bar when the terminal is interactive); with --json
writes the final metrics (`test_error` as a fraction at the top level) and the stability report.
A checkpoint is written atomically each epoch to --checkpoint-dir; `--resume DIR` continues one.
Bad input (a flag, a config value, missing or damaged data or checkpoint files): one line on stderr
naming it, exit status 2, before any epoch runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import schema
from ..config import PRESETS, preset
from .checkpoints import CHECKPOINT, CheckpointError
from .data import DATASETS, MissingDataError
from .loop import final_metrics, train
from .step import COMPILE_MODES, PRECISIONS

PROG = "stawm-train"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist-class-8", choices=sorted(PRESETS), metavar="NAME",
                   help=f"Appendix D configuration: {', '.join(sorted(PRESETS))} (default: %(default)s)")
    p.add_argument("--authors-code", action="store_true",
                   help="start from the authors' script for the preset instead of the paper (README's table)")
    p.add_argument("--epochs", type=int, help="epochs to train (default: the preset's, i.e. the paper's)")
    p.add_argument("--seed", type=int, default=0, help="seeds init, data order, augmentation, dropout (default: 0)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any config field, repeatable (e.g. --set memory_size=128)")
    p.add_argument("--dataset", choices=DATASETS, help="dataset (default: the preset's)")
    p.add_argument("--data-root", help="dataset folder (default: $STAWM_DATA or ~/.cache/stawm)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device (default: cpu)")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile mode for the model (default: none, plain eager); a GPU option")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16 autocasts the forward pass (default: fp32; see BENCHMARKS.md before using bf16)")
    p.add_argument("--checkpoint-dir", type=Path,
                   help="where the per-epoch checkpoint goes (default: runs/PRESET-seedSEED)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the run whose checkpoint is in DIR")
    p.add_argument("--json", type=Path, metavar="FILE", help="write final metrics and the stability report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p.parse_args(argv)


def summary_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']:>3}", f"loss {record[schema.TRAIN_LOSS]:.4f}"]
    for key, fmt in (("train_accuracy", "acc {:.2%}"), (schema.TEST_ERROR, "test error {:.2%}"),
                     (schema.VAL_ERROR, "val error {:.2%}"), (schema.TEST_RECON_LOSS, "test recon {:.2f}")):
        if key in record:
            parts.append(fmt.format(record[key]))
    parts.append(f"{record['epoch_seconds']:.1f}s ({record['images_per_second']:.0f} img/s)")
    parts.append("conditions met" if record["stability_ok"] else f"FLAGGED: {','.join(record['stability_flags'])}")
    return " | ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        changes = schema.parse_pairs(args.set)
        if args.epochs is not None:
            changes["epochs"] = args.epochs
        if args.dataset is not None:
            changes["dataset"] = args.dataset
        cfg = preset(args.preset, authors_code=args.authors_code, seed=args.seed, **changes)
    except schema.ParamError as err:  # ConfigError is one
        return _error(err)
    checkpoint_dir = args.resume or args.checkpoint_dir or Path("runs") / f"{cfg.preset}-seed{cfg.seed}"
    if args.resume is None and (checkpoint_dir / CHECKPOINT).exists():
        return _error(f"{checkpoint_dir / CHECKPOINT} exists; continue it with --resume {checkpoint_dir} "
                      "or choose another --checkpoint-dir")
    if args.resume is not None and not (args.resume / CHECKPOINT).exists():
        return _error(f"no {CHECKPOINT} in {args.resume} to resume")
    progress = sys.stderr.isatty() and not args.no_progress
    records = []
    try:
        for (record,) in train([cfg], device=args.device, data_root=args.data_root, checkpoint_dir=checkpoint_dir,
                            resume=args.resume is not None, progress=progress, compile=args.compile,
                            precision=args.precision):
            records.append(record)
            print(summary_line(record), flush=True)
    except (MissingDataError, CheckpointError) as err:  # the files given are the bad input
        return _error(err)
    if not records:
        print(f"nothing to do: the checkpoint in {checkpoint_dir} already finished {cfg.epochs} epochs")
        return 0
    if args.json is not None:
        result = {**final_metrics(records), "config": cfg.to_flat(), "stability": records[-1]["stability"],
                  "checkpoint": str(checkpoint_dir / CHECKPOINT)}
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


def _error(message) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
