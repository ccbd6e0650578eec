"""A study's plan, made before its first trial: trials × epochs × s/epoch → hours.

How many trials (configurations × seeds, less those a resumed study has FINISHED), how long an epoch's training
steps take and how that is known, how many trials run at once and why, and from these the wall time, the
device-hours and, with --price-per-hour, the cost. `runner.plan` makes it in view in every study, before
`start_study`, and prints `Plan.describe()`; --plan stops the study there. `start_study` logs it on the parent
run (`Plan.log`), and `finish_study` sets it against what the study took (`Plan.against`).

Seconds per epoch: the training steps of one epoch, what the loop logs as `epoch_seconds`, for the study's base
config (a study whose trials differ in speed, as table1's rows, gives each trial's config: their mean), from the
first source that has it:
1. the store: the median last `epoch_seconds` of this experiment's FINISHED trial runs whose config matches on every
   field but SPEED_FREE (`store_epoch_seconds`);
2. a probe: the config's steps timed, scaled to a whole epoch's steps (`probe`): in this process on the CPU with the
   threads a trial gets (the CPU nodes of a cluster taken as like the driver's), or as a Ray task on a GPU of the
   cluster's, as --gpus-per-trial auto probes (`probe_on_cluster`). One trial is timed alone: trials that fill every
   core, or share a GPU, run slower (BENCHMARKS.md, Plan against actual).
What is not training steps comes from the driver's own start (`startup_s`) and named constants measured on this
repository's 2-core machine.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import ray
import torch
from mlflow import MlflowClient
from mlflow.entities import Param

from .. import schema
from ..config import Config
from ..train import train
from ..train.data import Split, load_training_data
from ..train.loop import steps_per_epoch
from .gpu_share import PROBE_WAIT_S

OUTSIDE_STEPS = 0.08  # share of a trial run's wall time outside its training steps: evaluation, loading the data,
# MLflow logging, a checkpoint per epoch (BENCHMARKS.md, Held at load: 3.2-4.6 s of 40-52 s a run, about 8%)
RAY_S_PER_TRIAL = 2.0  # Ray's scheduling between one trial's run and the next (BENCHMARKS.md, Held at load: 1.9-2.0 s)
# From the parent run (or a stage's Tuner) to the first trials' first steps: Tune's own start, then its worker
# processes importing torch and MLflow, loading the data and opening their first runs. The workers repeat the work of
# the driver's own start (Python, the same imports, the data check, the store), which scales with the machine and its
# load as theirs does; so the start is the driver's own plus TUNE_START_S (`startup_s`), or START_S when this process
# was not started for the study. Measured on this 2-core machine, shared (BENCHMARKS.md, Plan against actual): the
# start took the driver's own -12 to +16 s over four quick studies, +9 to +13 s over four more; 5 s is between.
TUNE_START_S = 5.0
START_S = 20.0  # the driver's own start of a quick study on this 2-core machine, lightly loaded (15 s), + TUNE_START_S
STARTUP_MAX_S = 300.0  # a process up longer than this before its plan was not started for it (a notebook, a test)
PROBE_SECONDS = 2.0  # the probe's timed steps last about this long (at least 2 steps, at most an epoch's)
SPEED_FREE = ("seed", "delta", "eta", "theta", "epochs", "pretrained")  # config fields that leave s/epoch alone
EPOCH_SECONDS = "epoch_seconds"  # the loop's record key (stawm.train.loop.epoch_record), logged every epoch


@dataclass(frozen=True)
class Plan:
    """What a launch of a study will run and what that takes; the derived figures are properties."""

    study: str  # the study's name: its MLflow experiment
    configurations: int  # configurations of Config fields the study trains
    seeds: int  # seeds per configuration this launch trains
    fused: bool  # --fuse-seeds: one trial per configuration trains its seeds together
    # trials per stage: a stage is a Tuner of its own (table1's selfsup rows), started once the one before it has ended
    stages: tuple[int, ...]
    done: int  # trials a resumed study has FINISHED already (in the store)
    epochs: int  # epochs each trial trains
    epoch_s: float  # seconds of training steps per epoch
    epoch_source: str  # where epoch_s comes from
    start_s: float  # seconds from the parent run (or a stage's Tuner) to the first trials' first steps
    start_source: str  # where start_s comes from
    concurrency: int  # trials at once
    concurrency_why: str  # from what resources
    share: float  # of a device per trial: GPUs, or CPU cores when trials get no GPU
    device: str  # what `share` counts: "GPU" or "CPU core"
    price_per_hour: float = 0.0  # of one device-hour (--price-per-hour); 0: no cost line

    @property
    def trials(self) -> int:
        return sum(self.stages)

    @property
    def left(self) -> int:
        return max(0, self.trials - self.done)

    @property
    def waves(self) -> tuple[int, ...]:
        """Per stage, the rounds of `concurrency` trials its trials left take (done ones come off the first stages)."""
        done, waves = self.done, []
        for trials in self.stages:
            left, done = max(0, trials - done), max(0, done - trials)
            waves.append(math.ceil(left / self.concurrency))
        return tuple(waves)

    @property
    def trial_s(self) -> float:
        """Wall seconds of one trial: its epochs' steps, what its run spends outside them, Ray's scheduling."""
        return self.epochs * self.epoch_s / (1 - OUTSIDE_STEPS) + RAY_S_PER_TRIAL

    @property
    def wall_s(self) -> float:
        """Expected seconds from the parent run to the closing summary: each stage with trials left starts its Tuner and
        its workers, then runs its waves (0 when nothing is left to run)."""
        return sum(self.start_s + waves * self.trial_s for waves in self.waves if waves)

    @property
    def device_hours(self) -> float:
        """GPU-hours (or CPU-core-hours) of the trials left: their training steps times each one's share."""
        return self.left * self.epochs * self.epoch_s / 3600 * self.share

    @property
    def cost(self) -> float:
        return self.device_hours * self.price_per_hour

    def describe(self) -> str:
        """The short block a study prints before its first trial."""
        per = "fused in one trial each" if self.fused else "a trial each"
        stages = f" in {len(self.stages)} stages ({', then '.join(map(str, self.stages))})" if self.stages[1:] else ""
        done = f", {self.done} done already: {self.left} to run" if self.done else ""
        epochs = f"{self.epochs} epoch{'s' if self.epochs != 1 else ''}"
        unit = f"{self.device}-hour"
        starts = f"{sum(map(bool, self.waves))} x " if sum(map(bool, self.waves)) > 1 else ""  # a start per stage
        lines = [
            f"plan for {self.study}: {_count(self.configurations, 'configuration')} x {_count(self.seeds, 'seed')} "
            f"({per}) = {self.trials} trials{stages}{done}, {epochs} each",
            f"  epoch: {_seconds(self.epoch_s)} of training steps, {self.epoch_source}",
            f"  at once: {self.concurrency} trial{'s' if self.concurrency != 1 else ''} ({self.concurrency_why})",
            f"  trial: {_seconds(self.trial_s)} ({epochs} x {_seconds(self.epoch_s)}, + {OUTSIDE_STEPS:.0%} outside the"
            f" steps, + {RAY_S_PER_TRIAL:.0f} s of Ray's scheduling)",
            f"  wall: ~{_seconds(self.wall_s)} = {starts}{_seconds(self.start_s)} start ({self.start_source}) + "
            f"{' + '.join(map(str, self.waves))} wave{'s' if sum(self.waves) != 1 else ''} x {_seconds(self.trial_s)}",
            f"  device: {_number(self.device_hours)} {unit}s ({self.left} trials x {epochs} x {_seconds(self.epoch_s)}"
            f" x {self.share:g} {self.device} each)",
        ]
        if self.price_per_hour:
            lines.append(f"  cost: {_number(self.cost)} at {self.price_per_hour:g} a {unit}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Every field and derived figure, for plan.json."""
        derived = ("trials", "left", "waves", "trial_s", "wall_s", "device_hours", "cost")
        return {**dataclasses.asdict(self), **{name: getattr(self, name) for name in derived}}

    def log(self, client: MlflowClient, run_id: str) -> None:
        """On the parent run: the block (plan.txt), every figure (plan.json), a few numbers as params. A resumed
        study's parent keeps its first launch's params (MLflow refuses a param changed); its files are this launch's."""
        params = {schema.PLAN_TRIALS: self.trials, schema.PLAN_DONE: self.done,
                  schema.PLAN_EPOCH_S: round(self.epoch_s, 4), schema.PLAN_CONCURRENCY: self.concurrency,
                  schema.PLAN_WALL_S: round(self.wall_s, 1), schema.PLAN_DEVICE_HOURS: f"{self.device_hours:.4g}"}
        logged = client.get_run(run_id).data.params
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items() if k not in logged])
        client.log_text(run_id, self.describe() + "\n", schema.PLAN_TEXT_ARTIFACT)
        client.log_dict(run_id, self.to_dict(), schema.PLAN_ARTIFACT)

    def against(self, trials: int, seconds: float) -> str:
        """The closing summary's line: planned against actual."""
        ratio = f"{seconds / self.wall_s:.2f}x the plan" if self.wall_s else "nothing was planned to run"
        done = f" ({self.done} done before)" if self.done else ""
        return (f"plan: {self.trials} trials{done}, ~{self.wall_s:.0f} s expected; "
                f"actual: {trials} trials in {seconds:.0f} s ({ratio})")


def _number(x: float) -> str:
    """Three significant digits, never in e-notation: 0.00146, 0.1, 1230."""
    text = format(float(f"{x:.3g}"), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _seconds(seconds: float) -> str:
    """A duration in seconds, and past two minutes also as people read it: 1.3 s, 41 s, 223 s (3.7 min), 3.4 h."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    readable = f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
    return f"{seconds:.0f} s ({readable})"


def startup_s() -> tuple[float, str]:
    """(seconds, where from) of the start a launch takes before its first trials' first steps: this process's own
    start so far + TUNE_START_S, when it was started for the study (not older than STARTUP_MAX_S), else START_S."""
    import psutil  # Ray's own dependency

    age = time.time() - psutil.Process().create_time()
    if age < STARTUP_MAX_S:
        return age + TUNE_START_S, f"this driver's own took {age:.0f} s, + {TUNE_START_S:.0f} s of Tune's"
    return START_S, "START_S: this process was not started for the study"


# --- seconds per epoch: the store, else a probe -------------------------------------------------------


def store_epoch_seconds(client: MlflowClient, experiment_id: str, config: dict,
                        fused: bool) -> tuple[float, int] | None:
    """(median epoch_seconds, runs) over the experiment's FINISHED trial runs that match `config` (flat) on every
    field but SPEED_FREE, fused as the plan is (a fused member's run has a MEMBER tag); None if there is none.
    Each run gives its last logged epoch's seconds."""
    wanted = dict(speed_key(config))
    runs = client.search_runs([experiment_id], schema.tag_filter({schema.ROLE: schema.ROLE_TRIAL})
                              + " and attributes.status = 'FINISHED'")
    seconds = [run.data.metrics[EPOCH_SECONDS] for run in runs
               if EPOCH_SECONDS in run.data.metrics and (schema.MEMBER in run.data.tags) == fused
               and all(run.data.params.get(k) == v for k, v in wanted.items())]
    return (statistics.median(seconds), len(seconds)) if seconds else None


def speed_key(config: dict) -> tuple:
    """What of a flat config sets its speed: every field but SPEED_FREE, as trial params hold them (str(value))."""
    return tuple(sorted((k, str(v)) for k, v in config.items() if k not in SPEED_FREE))


def trials_done(client: MlflowClient, experiment_id: str, parent_run_id: str, seeds: list[int]) -> int:
    """Trials of the parent run whose runs FINISHED for one of `seeds` (a fused trial's members count once)."""
    runs = client.search_runs([experiment_id], schema.tag_filter({schema.PARENT_RUN_ID: parent_run_id,
                                                                  schema.ROLE: schema.ROLE_TRIAL})
                              + " and attributes.status = 'FINISHED'")
    planned = {str(seed) for seed in seeds}
    return len({run.data.tags.get(schema.TRIAL_ID) for run in runs if run.data.tags.get(schema.SEED) in planned})


def probe(flat_cfgs: list[dict], data_root: str, device: str, threads: int | None = None) -> dict:
    """Time the training steps of a trial that trains `flat_cfgs` (its members: one, or its fused seeds) on `device`
    with `threads` torch threads (None: as set), and scale them to a whole epoch.

    One step first, untimed in the result (the process's first: kernels, allocator), which also sizes the timed run:
    at least 2 steps lasting about PROBE_SECONDS, at most an epoch's; run again with more steps if that took under a
    quarter of it (a first step slowed by one-off costs, as on a GPU). Each run is the loop on a cut of the data (its
    evaluation on one batch). Returns epoch_s, step_s, steps (timed), epoch_steps, probe_s (all it took), device."""
    started, previous = time.perf_counter(), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cfgs = [Config.from_flat({**flat, "epochs": 1}) for flat in flat_cfgs]
        data = load_training_data(cfgs[0], data_root or None, torch.device(device))
        epoch_steps = steps_per_epoch(cfgs[0], len(data.train))
        batch = cfgs[0].batch_size

        def timed(steps: int) -> float:
            cut = dataclasses.replace(data, train=_head(data.train, steps * batch), test=_head(data.test, batch),
                                      val=_head(data.val, batch) if data.val is not None else None)
            (records,) = train(cfgs, device=device, data=cut)  # one epoch of `steps` steps
            return records[0]["epoch_seconds"]

        steps = min(epoch_steps, max(2, math.ceil(PROBE_SECONDS / timed(1))))
        seconds = timed(steps)
        if seconds < PROBE_SECONDS / 4 and steps < epoch_steps:
            steps = min(epoch_steps, math.ceil(steps * PROBE_SECONDS / seconds))
            seconds = timed(steps)
    finally:
        torch.set_num_threads(previous)
    return {"epoch_s": seconds / steps * epoch_steps, "step_s": seconds / steps, "steps": steps,
            "epoch_steps": epoch_steps, "probe_s": time.perf_counter() - started, "device": device,
            "threads": torch.get_num_threads() if threads is None else threads}


def _head(split: Split, images: int) -> Split:
    return Split(split.images[:images], split.labels[:images])


@ray.remote(max_calls=1)  # its process exits after: a GPU it held is free for the trials
def _remote_probe(flat_cfgs: list[dict], data_root: str, device: str) -> dict:
    """`probe` on a node of the cluster, on what Ray gave the task; a failure comes back as {"error": one line}."""
    node = ray.get_runtime_context().get_node_id()
    unseen = device == "cuda" and not torch.cuda.is_available()
    if unseen:  # what a trial given that GPU does with --device auto: train on the node's CPU (trial_device)
        device = "cpu"
    try:
        result = probe(flat_cfgs, data_root, device)
    except Exception as err:  # a CUDA or data error on that node: its message, not Ray's wrapped traceback
        return {"node": node, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
    name = torch.cuda.get_device_name(0) if device == "cuda" else device
    return {**result, "node": node, "device": name,
            **({"note": f"Ray gave it a GPU that torch {torch.__version__} does not see there: timed on the CPU, "
                        "where --device auto trials train"} if unseen else {})}


def probe_on_cluster(flat_cfgs: list[dict], data_root: str, cpus_per_trial: float) -> dict:
    """`probe` as a Ray task on a GPU of its own with a trial's CPUs (the autoscaler starts a GPU worker if none is up,
    as for --gpus-per-trial auto). {"error": ...} when it fails or no GPU comes up in time."""
    task = _remote_probe.options(num_gpus=1, num_cpus=cpus_per_trial)
    try:
        return ray.get(task.remote(flat_cfgs, data_root, "cuda"), timeout=PROBE_WAIT_S)
    except ray.exceptions.GetTimeoutError:
        return {"error": f"no GPU came up for it within {PROBE_WAIT_S} s"}


def probe_source(result: dict) -> str:
    """What the block says of a probe's figure: what was timed, on what, how it was scaled, what it cost."""
    where = f" of node {result['node'][:8]}" if "node" in result else ""
    threads = f" ({_count(result['threads'], 'thread')})" if result["device"] == "cpu" else ""
    note = f"; {result['note']}" if result.get("note") else ""
    return (f"probe of {result['steps']} steps on {result['device']}{threads}{where}: {result['step_s']:.3g} s a step x"
            f" {result['epoch_steps']} steps an epoch (the probe took {result['probe_s']:.1f} s{note})")


# --- concurrency ------------------------------------------------------------------------------------


def concurrency(cpus: float, gpus: float, cpus_per_trial: float, gpus_per_trial: float, *, where: str,
                max_concurrent: int = 0, trials: int = 0, more_nodes: int = 0,
                node_types: dict[str, dict[str, float]] | None = None) -> tuple[int, str]:
    """(trials at once, why): what fits on `cpus` and `gpus` (the live cluster's, or this machine's), plus what fits
    on `more_nodes` nodes of the best of `node_types` an autoscaler may add; capped at `max_concurrent` (0: none) and
    the trials left. At least 1 (a study whose trial fits nowhere waits: said in the reason)."""
    def fits(node_cpus: float, node_gpus: float) -> int:
        by_cpu = math.floor(node_cpus / cpus_per_trial + 1e-9)
        return min(by_cpu, math.floor(node_gpus / gpus_per_trial + 1e-9)) if gpus_per_trial > 0 else by_cpu

    count = fits(cpus, gpus)
    why = f"{where}: {cpus:g} CPUs / {cpus_per_trial:g} per trial"
    if gpus_per_trial > 0:
        why += f", {gpus:g} GPUs / {gpus_per_trial:g} per trial"
    if more_nodes > 0 and node_types:
        name, best = max(((name, fits(r.get("CPU", 0), r.get("GPU", 0))) for name, r in node_types.items()),
                         key=lambda item: item[1])
        if best > 0:
            count += more_nodes * best
            why += f"; + {more_nodes} x {best} on the {name} nodes the autoscaler may add"
    if max_concurrent and max_concurrent < count:
        count, why = max_concurrent, f"{why}; at most {max_concurrent} (--max-concurrent)"
    if trials and trials < count:
        count, why = trials, f"{why}; only {trials} trials to run"
    if count < 1:
        return 1, f"{why}; no trial fits now: counted as 1"
    return count, why
