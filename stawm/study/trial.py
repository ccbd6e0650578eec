"""One Ray Tune trial (`trainable`): train its members, record each epoch in their MLflow runs, report to Tune.

A study hands the trainable its `TrialContext` with `tune.with_parameters`; the trial's `config` holds only what
the study sweeps: Config fields, a `variant` (several fields set together) and the seed axis. A trial trains
one member per seed (`member_seeds`): one, or with --fuse-seeds the `seeds` list, which the loop
(`stawm.train.train`) trains as one fused model. Each member keeps its own MLflow run (`RunRecorder`); Tune
sees their mean.

Studies pass `reuse_actors=True`: one worker process runs trial after trial (torch, the data and MLflow load
once per process, which is most of a small trial's time); on CPU, `peak_memory_mb` is then the process's peak
so far.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import ray
import torch
from ray import tune

from .. import schema
from ..config import Config
from ..train import CHECKPOINT, train
from ..train.data import load_training_data
from . import environment, models
from .context import TrialContext
from .gpu_share import trial_device
from .recorder import RunRecorder
from .tune_checkpoints import checkpoint_uri, keep_only, local_pretrained, newest_state, restore_newest, save_state


def trainable(config: dict, context: TrialContext) -> None:
    """One Tune trial. Retried or restored, it continues from its newest checkpoint and in the same MLflow runs."""
    cfgs = member_configs(config, context)
    device, gpu = trial_device(context)
    trial, checkpoint = tune.get_context(), tune.get_checkpoint()  # no checkpoint on a trial's first attempt
    down_since = newest_state(checkpoint)[1].get("tracking_down_since") if checkpoint is not None else None
    placement = {schema.NODE: _ray_node(), schema.DEVICE: device, schema.GPU: gpu,
                 **environment.environment_tags(device)}  # rewritten on every attempt: a retry may move
    recorder = RunRecorder(context, cfgs, trial.get_trial_id(), trial.get_trial_name(), placement, down_since)
    monitored = environment.system_metrics([m.run_id for m in recorder.members], context.tracking_uri,
                                           resumed=any(member.resumed for member in recorder.members),
                                           on=environment.system_metrics_on(context.system_metrics, device))
    with recorder, monitored, scratch_folder(trial.get_trial_id()) as workdir:
        saved = None
        if checkpoint is not None:
            checkpoint, saved = restore_newest(checkpoint, workdir)
        recorder.resume(saved, checkpoint_uri(checkpoint, CHECKPOINT) if checkpoint is not None else None, workdir)
        if not recorder.training:  # every member stopped before the restart
            recorder.finish()  # their models, if the server did not answer before
            return
        data = load_training_data(cfgs[0], context.data_root or None, torch.device(device))
        recorder.log_dataset(data)
        for records in train([local_pretrained(cfg) for cfg in cfgs], device=device, data=data,
                             checkpoint_dir=workdir, resume=checkpoint is not None):
            models.keep_best(workdir, records)  # the weights of each member's lowest test error, beside the loop's
            metrics = recorder.epoch(records)
            save_state(workdir, recorder.last_epoch, *recorder.saved_state())
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(workdir))
            checkpoint = keep_only(tune.get_checkpoint(), checkpoint)  # report returns once it is stored
            recorder.checkpoint(checkpoint_uri(checkpoint, CHECKPOINT))
        recorder.finish()  # each member's final and best weights as LoggedModels, before the folder goes


@contextmanager
def scratch_folder(trial_id: str):
    """A fresh local folder for the trial's checkpoints, removed on the way out (first, when Tune stops the trial:
    it may end this process any moment); folders a killed attempt of the same trial left are removed first."""
    for stale in Path(tempfile.gettempdir()).glob(f"stawm-{trial_id}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"stawm-{trial_id}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ray_node() -> str:
    """The Ray node this trial runs on; "" when called outside Ray (a test, a debugger), where asking Ray's
    runtime context would start a local Ray instance in this process."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def trial_config(config: dict, context: TrialContext) -> Config:
    """The Config of a trial: the study's base config, the swept fields and `variant` on top, and its (first)
    member's seed."""
    swept = {k: v for k, v in config.items() if k not in ("variant", "seeds") and not k.startswith("__")}
    flat = {**context.base_config, **swept, **config.get("variant", {})}
    return Config.from_flat({**flat, "seed": member_seeds(config, context)[0]})


def member_seeds(config: dict, context: TrialContext | None = None) -> list[int]:
    """The seeds a trial trains, one member each: the one place a trial's seed is worked out.

    `seeds` (fused seeds), else the Repeater's index (ray.tune.search.Repeater(set_index=True): the repeat
    index is the seed), else a `variant`'s seed, else the config's (a `seed` grid value), else the base config's."""
    if "seeds" in config:
        return list(config["seeds"])
    if "__trial_index__" in config:
        return [config["__trial_index__"]]
    base = (context.base_config if context is not None else {}).get("seed", 0)
    return [config.get("variant", {}).get("seed", config.get("seed", base))]


def member_configs(config: dict, context: TrialContext) -> list[Config]:
    """The Configs a trial trains, one per member seed."""
    if context.fuse_seeds and "seeds" not in config:
        raise ValueError("--fuse-seeds: this study's search space has no `seeds`; only studies that take "
                         "their seed axis from runner.seed_space(args) can fuse seeds")
    cfg = trial_config(config, context)
    return [cfg.replace(seed=seed) for seed in member_seeds(config, context)]
