"""A trial's share of a GPU: chosen from a measured peak (--gpus-per-trial auto), then enforced in the trial.

Ray's fractional GPUs (`{"gpu": 0.25}`) only set CUDA_VISIBLE_DEVICES; nothing stops a trial taking the
whole GPU, its memory included. So the share is chosen from what a trial needs, measured once before
the study by a probe (a few steps of the base config on a GPU of its own), and each trial then caps its
own CUDA memory to the share (`trial_device`).

The choice is recorded in the parent run's params (`gpu_fraction`, and when probed `probe_peak_mb`,
`probe_overhead_mb`, `gpu_total_mb`), so that a resumed study keeps the share its trials started with.
"""

from __future__ import annotations

import math
import os

import ray
import torch

from ..config import Config
from ..train import train
from .cluster import ClusterShape
from .preflight import PreflightError

GPU_SAFETY = 1.25  # on the probe's peak: a few steps of the base config, not a whole epoch of every trial
MAX_TRIALS_PER_GPU = 8  # processes time-slice a GPU: once each is GPU-bound, more add no throughput
PROBE_STEPS = 5
PROBE_WAIT_S = 20 * 60  # for the autoscaler to start a GPU worker for the probe (a cloud GPU takes minutes)
CHOICE_PARAMS = ("gpu_fraction", "probe_peak_mb", "probe_overhead_mb", "gpu_total_mb")


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


def choose(args, previous: dict, seeds: list[int], cluster: ClusterShape) -> None:
    """--gpus-per-trial auto: set args' share (gpu_choice, gpus_per_trial) from a probe, once per study; a study
    that resumes keeps the share its parent run recorded (`previous`, its params), as its restored trials'
    configs do. `seeds`: what a fused trial trains. `cluster`: what the cluster has and can start, so that an
    autoscaling cluster whose GPU workers are not up yet is probed (the probe's GPU request brings one up),
    not taken for a cluster without GPUs. PreflightError when --device cuda meets a cluster without GPUs, when
    the GPU types cannot be known, or when the probe fails (one line naming the node and the cause)."""
    if not args.gpu_choice:
        if "gpu_fraction" in previous:
            args.gpu_choice = {k: float(v) for k, v in previous.items() if k in CHOICE_PARAMS}
            how = "as when the study started"
        elif not cluster.gpus_known:
            raise PreflightError(f"--gpus-per-trial auto: cannot tell whether {cluster.describe()} can start GPU"
                                 " workers; pass --gpus-per-trial N (e.g. 0.25) instead, or run the study on the head")
        elif cluster.live_gpus < 1 and not cluster.gpu_node_types:
            args.gpu_choice = {"gpu_fraction": 0.0}
            how = f"{cluster.describe()} has no GPU and can start none, so trials run on the CPU"
        else:
            args.gpu_choice, how = _probe_choice(args, seeds, cluster)
        print(f"--gpus-per-trial auto: {args.gpu_choice['gpu_fraction']:.4g} GPU per trial ({how})", flush=True)
    args.gpus_per_trial = args.gpu_choice["gpu_fraction"]
    if args.device == "cuda" and args.gpus_per_trial == 0:
        raise PreflightError("--device cuda, but the Ray cluster has no GPU")


def _probe_choice(args, seeds: list[int], cluster: ClusterShape) -> tuple[dict, str]:
    """The share measured by a probe on a GPU of its own; the autoscaler starts a GPU worker for it if none is up."""
    if cluster.live_gpus < 1:
        types = ", ".join(cluster.gpu_node_types)
        print(f"--gpus-per-trial auto: asking the cluster for a GPU to probe on (the autoscaler starts a {types}"
              f" worker: minutes on a cloud, at most {PROBE_WAIT_S // 60} minutes here)", flush=True)
    configs = probe_configs(args.config, seeds if args.fuse_seeds else None)
    try:
        probe = ray.get(_probe.remote(configs, args.data_root), timeout=PROBE_WAIT_S)
    except ray.exceptions.GetTimeoutError:
        raise PreflightError(f"--gpus-per-trial auto: no GPU came up for the probe within {PROBE_WAIT_S} s"
                             f" ({cluster.describe()}); see `ray status` and the autoscaler's log") from None
    if "error" in probe:
        raise PreflightError(f"--gpus-per-trial auto: the probe on node {probe['node']} ({probe['where']}) failed:"
                             f" {probe['error']}")
    fraction = gpu_fraction(probe["peak_mb"], probe["total_mb"], overhead_mb=probe["overhead_mb"])
    choice = {"gpu_fraction": fraction, "probe_peak_mb": round(probe["peak_mb"], 1),
              "probe_overhead_mb": round(probe["overhead_mb"], 1), "gpu_total_mb": round(probe["total_mb"], 1)}
    how = (f"measured on {probe['gpu']} of node {probe['node']} in {PROBE_STEPS} steps: peak {probe['peak_mb']:.0f}"
           f" MiB allocated + {probe['overhead_mb']:.0f} MiB outside the allocator, of {probe['total_mb']:.0f} MiB;"
           f" {round(1 / fraction)} trials per GPU")
    return choice, how


def probe_configs(config: dict, seeds: list[int] | None) -> list[dict]:
    """What a trial of the study trains, cut to PROBE_STEPS steps: the base config, over `seeds` if fused.

    The base config only: a grid that makes trials bigger (glimpse_size, memory_size) needs more; the
    cap then stops the bigger trial (out of memory, loudly) rather than its neighbours."""
    flat = {**config, "epochs": 1, "max_steps": PROBE_STEPS}
    return [{**flat, "seed": seed} for seed in seeds] if seeds is not None else [flat]


@ray.remote(num_gpus=1, max_calls=1)  # a GPU of its own; max_calls=1: the process exits and frees it
def _probe(flat_cfgs: list[dict], data_root: str) -> dict:
    """Train the configs (a trial's members) for one capped epoch on a GPU; the CUDA memory that took.

    Any failure comes back as {"error": one line} with the node, rather than a traceback from inside Ray.
    Its measuring part is untested here: the machines the tests run on have no GPU (BENCHMARKS.md)."""
    node = ray.get_runtime_context().get_node_id()
    where = (f"{os.environ.get('RAY_NODE_TYPE_NAME') or 'node type unknown'}, "
             f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")
    if not torch.cuda.is_available():
        return {"node": node, "where": where,
                "error": f"Ray gave it a GPU but torch {torch.__version__} sees no CUDA device there"
                         f" (built for CUDA {torch.version.cuda}; is the NVIDIA driver in the container?)"}
    try:
        cfgs = [Config.from_flat(flat) for flat in flat_cfgs]
        torch.cuda.reset_peak_memory_stats(0)
        for _ in train(cfgs, device="cuda", data_root=data_root or None):
            pass
    except Exception as err:  # a CUDA or data error on that node: its message, not Ray's wrapped traceback
        return {"node": node, "where": where, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
    free, total = torch.cuda.mem_get_info(0)  # counts every process on the GPU: errs towards fewer trials
    return {"peak_mb": torch.cuda.max_memory_allocated(0) / 2**20, "total_mb": total / 2**20, "node": node,
            "overhead_mb": (total - free - torch.cuda.memory_reserved(0)) / 2**20, "gpu": torch.cuda.get_device_name(0)}


def trial_device(context) -> tuple[str, str]:
    """The trial's device and its name for the GPU tag; caps CUDA memory to a fractional GPU's share.

    context: the trial's `TrialContext` (`device`: auto, cpu or cuda; `gpu_fraction`, `gpu_overhead_mb`).
    auto: CUDA when the trial was given a share of a GPU and sees one, else the CPU (said in one line when it
    was given a share it cannot see: a node whose GPU the container or driver does not expose)."""
    asked, share = context.device, float(context.gpu_fraction or 0)
    if asked == "cpu" or (asked == "auto" and (share == 0 or not torch.cuda.is_available())):
        if asked == "auto" and share > 0:
            print(f"trial asked for {share:g} GPU but sees no CUDA device (CUDA_VISIBLE_DEVICES="
                  f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): --device auto trains it on the CPU", flush=True)
        return "cpu", "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but this trial sees no GPU (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); --device auto would train it on the CPU")
    torch.cuda.reset_peak_memory_stats(0)  # peak_memory_mb is this trial's, also when Tune reuses the process
    fraction = share or 1.0
    if fraction < 1.0:  # Ray only set CUDA_VISIBLE_DEVICES; nothing else stops a trial taking the whole GPU
        # the cap binds torch's allocator only: what the process holds besides (CUDA context) comes off it
        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        torch.cuda.set_per_process_memory_fraction(fraction - float(context.gpu_overhead_mb) / total_mb, 0)
    return "cuda", torch.cuda.get_device_name(0)
