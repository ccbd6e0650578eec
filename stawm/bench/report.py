"""The throughput benchmark's rows and what is made of them: medians over repeats, speed-ups, the
accuracy check, the Markdown table and the JSON file (what each number means: studies/throughput.py)."""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

from .. import schema
from ..config import Config

VARIANTS = {
    "a": "baseline: authors' pipeline",
    "b": "engine",
    "c": "packed: separate trials",
    "d": "fused: one process",
}


def steady(values: list[float]) -> float:
    """The mean over epochs after the first when there are several (the first compiles and warms up)."""
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def row(variant: str, K: int, opts: tuple[str, str] | None, *, epoch_seconds: list[float], images_per_epoch: int,
        wall: float, peak: float, test_errors: list[float], **extra) -> dict:
    s = steady(epoch_seconds)
    finite = [e for e in test_errors if e is not None and math.isfinite(e)]
    return {
        "variant": variant, "name": VARIANTS[variant], "K": K,
        "options": "/".join(opts) if opts else "", "seconds_per_epoch": s, "images_per_second": images_per_epoch / s,
        "first_epoch_seconds": epoch_seconds[0], "wall_seconds": wall, "peak_memory_mb": peak,
        schema.TEST_ERROR: statistics.fmean(finite) if finite else None,
        "test_error_std": statistics.stdev(finite) if len(finite) > 1 else None,
        "test_errors": test_errors, **extra,
    }


def median_row(rows: list[dict]) -> dict:
    """One variant over its repeats: the run with the median images/s, the other runs' rates beside it."""
    ranked = sorted(rows, key=lambda r: r["images_per_second"])
    return {**ranked[(len(ranked) - 1) // 2], "repeats": len(rows),
            "images_per_second_repeats": [r["images_per_second"] for r in rows]}


def meta(args, cfg: Config, device: torch.device) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
        "torch": torch.__version__, "preset": cfg.preset, "dataset": cfg.dataset, "epochs": cfg.epochs,
        "max_steps": cfg.max_steps, "batch_size": cfg.batch_size, "seed": args.seed, "ks": args.ks,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "config": cfg.to_flat(),
    }


def add_speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if r["variant"] == "a"), None)
    for r in rows:
        r["speedup"] = r["images_per_second"] / base["images_per_second"] if base else None


def accuracy(rows: list[dict]) -> dict:
    """The test errors of (a) and (b) after the same epochs and seed, beside the spread over fused seeds."""
    def pick(variant: str, opts: str = ""):
        return next((r for r in rows if r["variant"] == variant and (not opts or r["options"] == opts)), None)

    a, b = pick("a"), pick("b", "none/fp32")
    spread = max((r for r in rows if r["variant"] == "d" and r["test_error_std"] is not None),
                 key=lambda r: r["K"], default=None)
    return {"baseline": a and a[schema.TEST_ERROR], "engine": b and b[schema.TEST_ERROR],
            "seeds": spread and {"K": spread["K"], "mean": spread[schema.TEST_ERROR], "std": spread["test_error_std"]}}


def fmt_error(r: dict) -> str:
    if r.get(schema.TEST_ERROR) is None:
        return "-"
    text = f"{100 * r[schema.TEST_ERROR]:.2f}%"
    if r.get("test_error_std") is not None:
        text += f" ± {100 * r['test_error_std']:.2f}"
    return text


def table(report: dict) -> str:
    """The rows as a Markdown table, then the notes and the accuracy check."""
    lines = ["| variant | K | options | s/epoch | full-epoch s | images/s | wall s | peak MB | speed-up | test error |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        lines.append(f"| ({r['variant']}) {r['name']} | {r['K']} | {r['options'] or '-'} "
                     f"| {r['seconds_per_epoch']:.3f} | {r['full_epoch_seconds']:.2f} | {r['images_per_second']:.0f} "
                     f"| {r['wall_seconds']:.1f} | {r['peak_memory_mb']:.0f} | {speedup} | {fmt_error(r)} |")
    meta_ = report["meta"]
    lines.append("")
    lines.append(f"{meta_['device']}, torch {meta_['torch']}, {meta_['preset']} on {meta_['dataset']}, "
                 f"{meta_['epochs']} epoch(s) of {meta_['max_steps'] or 'all'} steps, batch {meta_['batch_size']}, "
                 f"{meta_['threads']} torch thread(s), median of {meta_['repeats']} round-robin repeat(s). "
                 "Test error for K trials: mean ± std (ddof=1) over seeds 0..K-1.")
    acc = report.get("accuracy") or {}
    if acc.get("baseline") is not None and acc.get("engine") is not None:
        seeds = acc.get("seeds")
        noise = (f"; over {seeds['K']} fused seeds {100 * seeds['mean']:.2f}% ± {100 * seeds['std']:.2f}"
                 if seeds else "")
        lines.append(f"Accuracy check, same epochs and seed: baseline {100 * acc['baseline']:.2f}%, "
                     f"engine {100 * acc['engine']:.2f}%{noise}.")
    for r in report["rows"]:
        if r.get("vmap_fallbacks"):
            lines.append(f"(d) K={r['K']}: vmap ran these ops member by member: {', '.join(r['vmap_fallbacks'])}")
    lines += [f"Note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def write(report: dict, path: Path | None) -> None:
    """The report as JSON at `path` (atomically: a reader never sees half a file); nothing without a path."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)
