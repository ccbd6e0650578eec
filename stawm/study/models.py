"""Each trial's weights as MLflow 3 LoggedModels: a study's best model is found by its test error and loaded with
`mlflow.pytorch.load_model`, not dug out of a Tune checkpoint by hand.

Every member of a trial (one per seed; fused seeds make several, each with its own run) gets, linked to its run
(source_run_id, and a run output at that epoch):
- its final model: the weights of its last epoch (a member that stopped on its own: the epoch it stopped after);
- its best model: the weights of its lowest test error (the first epoch to reach it), when that is another epoch.
  The loop keeps only the newest weights, so the trial keeps these itself: `keep_best` writes BEST_WEIGHTS beside
  the loop's checkpoint whenever a member's test error improves, and Tune carries it in every checkpoint folder,
  so a trial restored in a fresh process still has them.
A diverged member logs its best model only: its last epoch has no evaluation (no test error to rank it by) and its
weights are those that made the loss, gradients or memory non-finite (a plain run's go on to NaN; a fused member's
are frozen at the step it diverged), while its best epoch's were measured; its run's MODELS_SKIPPED tag says so.
The recorder logs a member's models when the trial ends or when the member stops (`RunRecorder.finish`,
`_close_stopped`); a trial Tune stops (a scheduler) logs none, since it may be killed any moment, and its
CHECKPOINT tag still names its weights.

Each model is named after its run ("glimpse_size=8 seed=1 final"), tagged with its kind and epoch
(schema.MODEL_KIND, MODEL_EPOCH) and the trial's STUDY, PRESET, SEED, TRIAL_ID (and MEMBER), holds the flat
Config as params, and that epoch's metrics, so that `search_logged_models(order_by=metrics.test_error)` ranks a
study's models (README: "The trained models").

Metrics, without doubling the run's history: MLflow 3 stores a model's metric only through the run's `log_batch`
(a Metric with a model_id), which writes it to the run too. So the epoch's points are read back from the run's
history and logged again with the model's id and their own timestamps: the SQL store (the only kind the studies
accept, directly or behind `mlflow server`) keys a run's metric by (key, timestamp, step, value, is_nan) and skips
a point it holds, so the run keeps each epoch once. MLflow's own `log_model(step=...)` does the same.

The model is the flavor's `save_model` with pickle: the STAWM module itself comes back (its config, its memory's
rates), which needs `stawm` importable where it loads; MLflow 3's default format, "pt2", needs an input example
and an export of the forward pass. Its requirements are the flavor's defaults pinned to what is installed: inferring
them would run the model in a subprocess. Logging is idempotent (a call retried after an outage finds the model
it created and completes it), for the recorder's `server.wait_call`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus, Metric, Run
from mlflow.models import Model

from .. import schema
from ..config import Config
from ..model import STAWM
from ..train import CHECKPOINT
from ..train.checkpoints import member_weights, read_checkpoint
from .tune_checkpoints import BEST_WEIGHTS

BEST_FORMAT = "stawm-best-1"
NAMES = {schema.MODEL_FINAL: "final", schema.MODEL_BEST: "best"}  # a model's name: its run's, then this word
BAD_NAME_CHARACTERS = "/:.%\"'"  # what MLflow refuses in a model's name: "lr=0.001 seed=1" is "lr=0_001 seed=1"


# --- the best weights, kept beside the loop's checkpoint ---------------------------------------------


def keep_best(folder: Path, records: list[dict | None]) -> None:
    """After an epoch whose checkpoint is in `folder`: copy into BEST_WEIGHTS the weights of each member whose test
    error beat its best so far (written atomically; nothing is written when none did)."""
    best = read_best(folder)
    better = [k for k, record in enumerate(records) if record is not None and improves(record, best.get(k))]
    if not better:
        return
    weights = read_checkpoint(folder / CHECKPOINT)["members"]["weights"]  # (K, ...) each
    for k in better:  # a clone: a slice saved alone would carry every member's storage
        best[k] = {"epoch": records[k]["epoch"], schema.TEST_ERROR: records[k][schema.TEST_ERROR],
                   "weights": {name: t[k].clone() for name, t in weights.items()}}
    tmp = folder / (BEST_WEIGHTS + ".tmp")
    torch.save({"format": BEST_FORMAT, "members": best}, tmp)
    os.replace(tmp, folder / BEST_WEIGHTS)


def improves(record: dict, best: dict | None) -> bool:
    """Whether the record's test error is measured and lower than the best one so far (a tie keeps the earlier)."""
    error = record.get(schema.TEST_ERROR, math.nan)
    return math.isfinite(error) and (best is None or error < best[schema.TEST_ERROR])


def read_best(folder: Path) -> dict[int, dict]:
    """Member index -> its best epoch, test error and weights so far; a member with none measured yet (a drawing
    model, a checkpoint written before the best weights were kept) is not in it."""
    path = folder / BEST_WEIGHTS
    if not path.exists():
        return {}
    state = torch.load(path, map_location="cpu", weights_only=True)  # on the CPU, wherever the trial trained
    if not isinstance(state, dict) or state.get("format") != BEST_FORMAT:
        raise ValueError(f"{path} is not a file of best weights of format {BEST_FORMAT!r}")
    return state["members"]


# --- which models a member has -------------------------------------------------------------------


def member_models(folder: Path, member: int, final_epoch: int, diverged: bool) -> tuple[list[tuple], list[str]]:
    """The models of member `member` of the checkpoint in `folder`, as (kind, epoch, weights), and why any is left
    out. final_epoch: its last epoch; diverged: its last epoch diverged (no final model: see the docstring)."""
    chosen, skipped = [], []
    if diverged:
        skipped.append(f"{NAMES[schema.MODEL_FINAL]}: diverged at epoch {final_epoch} (not evaluated)")
    else:
        chosen.append((schema.MODEL_FINAL, final_epoch, member_weights(folder / CHECKPOINT, member)))
    best = read_best(folder).get(member)
    if best is not None and best["epoch"] != final_epoch:
        chosen.append((schema.MODEL_BEST, best["epoch"], best["weights"]))
    return chosen, skipped


# --- logging them --------------------------------------------------------------------------------


def log_member_models(client: MlflowClient, run_id: str, cfg: Config, folder: Path, member: int, final_epoch: int,
                      diverged: bool) -> list[str]:
    """Log the models of a member (`member_models`) into its run, once its epochs are logged; their ids."""
    run = client.get_run(run_id)
    chosen, skipped = member_models(folder, member, final_epoch, diverged)
    if skipped:
        client.set_tag(run_id, schema.MODELS_SKIPPED, "; ".join(skipped))
    return [log_model(client, run, cfg, kind, epoch, weights) for kind, epoch, weights in chosen]


def log_model(client: MlflowClient, run: Run, cfg: Config, kind: str, epoch: int, weights: dict) -> str:
    """One model of a member's run: `weights` (of `epoch`) with that epoch's metrics; its id. A model the run has
    already for this kind and epoch is completed if a failed call left it pending, never logged twice."""
    model = find_model(client, run, kind, epoch) or client.create_logged_model(
        run.info.experiment_id, name=model_name(run.info.run_name, kind), source_run_id=run.info.run_id,
        tags=model_tags(run, kind, epoch), params={k: str(v) for k, v in cfg.to_flat().items()})
    if model.status == LoggedModelStatus.READY:
        return model.model_id
    if model.model_id not in {output.model_id for output in (run.outputs.model_outputs if run.outputs else [])}:
        client.log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, step=epoch)])
    client.log_batch(run.info.run_id, metrics=epoch_metrics(client, run, epoch, model.model_id))
    upload(client, model, run.info.run_id, cfg, weights)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def find_model(client: MlflowClient, run: Run, kind: str, epoch: int) -> LoggedModel | None:
    """The run's model of this kind and epoch, if an earlier call created it."""
    tags = {schema.MODEL_KIND: kind, schema.MODEL_EPOCH: str(epoch)}
    found = client.search_logged_models([run.info.experiment_id], filter_string=" AND ".join(
        [f"source_run_id = '{run.info.run_id}'", *(f"tags.`{k}` = '{v}'" for k, v in tags.items())]))
    return found[0] if found else None


def model_name(run_name: str, kind: str) -> str:
    """Its run's name and kind ("glimpse_size=8 seed=1 best"), with what MLflow refuses in a name made "_"."""
    return "".join("_" if c in BAD_NAME_CHARACTERS else c for c in f"{run_name} {NAMES[kind]}")


def model_tags(run: Run, kind: str, epoch: int) -> dict[str, str]:
    """Which epoch's weights it holds, and the run's tags that say whose they are."""
    whose = {key: run.data.tags[key] for key in (schema.STUDY, schema.PRESET, schema.SEED, schema.TRIAL_ID,
                                                 schema.MEMBER) if key in run.data.tags}
    return {**whose, schema.MODEL_KIND: kind, schema.MODEL_EPOCH: str(epoch)}


def epoch_metrics(client: MlflowClient, run: Run, epoch: int, model_id: str) -> list[Metric]:
    """The run's points at step `epoch`, as the run holds them (timestamps too: the store skips them for the run),
    for the model. Not a non-finite one (a diverged epoch's loss; the store keeps infinity as the largest float):
    a model's metric would keep NaN as 0. Nor MLflow's system metrics, whose steps are not epochs."""
    keys = [key for key in run.data.metrics if not key.startswith(schema.SYSTEM_METRICS_PREFIX)]
    return [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id)
            for key in keys for m in client.get_metric_history(run.info.run_id, key)
            if m.step == epoch and math.isfinite(m.value) and abs(m.value) < sys.float_info.max]


def upload(client: MlflowClient, model: LoggedModel, run_id: str, cfg: Config, weights: dict) -> None:
    """The weights as a STAWM module in eval mode (a loaded model predicts as its test error was measured), saved
    by the pytorch flavor into the model's artifacts."""
    import mlflow.pytorch  # ~1.5 s of imports: in the processes that log a model, not every one importing this

    net = STAWM(cfg)
    net.load_state_dict(weights)
    net.eval()
    # what Model.log writes into the MLmodel file: the model's id and run, so that models:/ID resolves to it
    meta = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                 model_id=model.model_id)
    with tempfile.TemporaryDirectory(prefix="stawm-model-") as folder, quiet("mlflow.pytorch"):
        path = Path(folder) / "model"
        mlflow.pytorch.save_model(net, path, mlflow_model=meta, serialization_format="pickle",
                                  pip_requirements=mlflow.pytorch.get_default_pip_requirements())
        client.log_model_artifacts(model.model_id, str(path))


@contextmanager
def quiet(logger: str):
    """Only errors from `logger` meanwhile: the flavor warns on every pickled model that unpickling runs code,
    which for a trial's own weights would be one more line per model in every trial's log."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
