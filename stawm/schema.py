"""The MLflow schema: every tag, param, metric and artifact name the runner writes and the results
library reads, and the one way a param string becomes a value again.

Both sides import these names; neither spells one by hand, so renaming a tag here renames it
everywhere (tests/test_schema.py fails if a literal creeps back in). This module imports nothing
from the project, nor torch, Ray or MLflow: the analysis side reads it on a machine without them.

The layout of a study in MLflow:
- experiment = the study's name;
- the experiment tagged EXPERIMENT_KIND = EXPERIMENT_KIND_TRAINING and shared_view(BY_CONFIG_VIEW) = a UI view of
  seeds grouped by CONFIG;
- one parent run per study, named after it: ROLE = ROLE_STUDY, STUDY, GIT_COMMIT, GIT_DIRTY, SOURCE_NAME,
  SOURCE_TYPE, NOTE (the command line, credentials redacted), the driver's versions (env_tag(...), ENV_LOCK);
  params SEEDS, SWEPT and the study's flags;
  the plan made before its first trial: params PLAN_PARAMS, artifacts PLAN_TEXT_ARTIFACT and PLAN_ARTIFACT;
- one child run per Tune trial (and per member of a trial of fused seeds): PARENT_RUN_ID, ROLE =
  ROLE_TRIAL, STUDY, PRESET, SEED, CONFIG, TRIAL_ID (+ MEMBER), GIT_COMMIT, GIT_DIRTY, SOURCE_NAME, SOURCE_TYPE,
  HOST, NODE, DEVICE, GPU, the environment (env_tag(...), ENV_LOCK; on a GPU ENV_DEVICE_NAME, ENV_CUDA, ENV_DRIVER),
  CHECKPOINT, the Appendix A verdict (STABILITY_TAGS), STOPPED_EARLY when a scheduler stopped
  it, STOP_REASON, STOP_EPOCH, STOP_MAX_ABS_W (and FINAL_ERROR) when it stopped on its own; a run name made of
  its swept values ("glimpse_size=8 seed=1"); the dataset as a run input (name, source,
  digest; DATASET_CONTEXT); params = the flat Config; metrics per epoch (step = epoch) under the
  training loop's record keys, BEST_TEST_ERROR beside them; artifacts CONFIG_ARTIFACT and STABILITY_ARTIFACT;
  its final and best epochs' weights as LoggedModels (source_run_id = the run; MODEL_KIND, MODEL_EPOCH, below).
"""

from __future__ import annotations

import ast

# --- tags -----------------------------------------------------------------------------------------

PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own: nests a trial's run under its study's
ROLE = "stawm.role"
ROLE_STUDY = "study"
ROLE_TRIAL = "trial"
STUDY = "stawm.study"
PRESET = "stawm.preset"
SEED = "stawm.seed"
TRIAL_ID = "stawm.trial_id"  # the Ray Tune trial id: a retried or restored trial continues its run
MEMBER = "stawm.member"  # index of a fused seed inside its trial
GIT_COMMIT = "mlflow.source.git.commit"  # MLflow's own: the UI shows it as the run's source version
GIT_DIRTY = "stawm.git_dirty"  # "true" when the tree had uncommitted changes; absent when nothing could tell
SOURCE_NAME = "mlflow.source.name"  # MLflow's own: the study script that made the run
SOURCE_TYPE = "mlflow.source.type"
SOURCE_TYPE_LOCAL = "LOCAL"  # a script run on this machine or a Ray cluster (MLflow's SourceType.LOCAL)
NOTE = "mlflow.note.content"  # MLflow's own: the parent run's description, the exact command line
CHECKPOINT = "stawm.checkpoint"  # URI of the trial's newest checkpoint (fused seeds: the stack's; MEMBER says which)
HOST = "stawm.host"
NODE = "stawm.node"  # the Ray node id the trial ran on (one machine can hold several: a fake cluster, containers)
DEVICE = "stawm.device"  # what the trial trained on: cpu or cuda (--device auto decides inside the trial)
GPU = "stawm.gpu"
STOPPED_EARLY = "stawm.stopped_early"
STOP_REASON = "stawm.stop_reason"  # why it stopped on its own before its last epoch: the record's stop_reason
STOP_EPOCH = "stawm.stop_epoch"  # the epoch after which it stopped
STOP_MAX_ABS_W = "stawm.stop_max_abs_w"  # that epoch's largest |W| entry (0 for a stuck run: its memory never written)
FINAL_ERROR = "stawm.final_error"  # set when the final test error was not measured at the configured last epoch
FINAL_ERROR_LAST_MEASURED = "last measured"  # a stuck run's: measured after the epoch it stopped, standing for the rest
EXPERIMENT_KIND = "mlflow.experimentKind"  # experiment tag MLflow 3's UI reads to choose the experiment's first view
EXPERIMENT_KIND_TRAINING = "custom_model_development"  # model training runs (not GenAI traces)
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # MLflow's own: + a key, an experiment tag holding a saved UI view
BY_CONFIG_VIEW = "stawm-by-config"  # the view of a study's runs with seeds grouped by CONFIG (tracking.experiment)
DATASET_CONTEXT = "mlflow.data.context"  # tag of a run's dataset input: what the run used it for
DATASET_CONTEXT_TRAINING = "training"  # "true" when a scheduler stopped the trial before its last epoch

STABILITY_OK = "stability.ok"  # "true" unless a flagging Appendix A condition failed (stawm.conditions)
STABILITY_FLAGS = "stability.flags"  # the failed conditions' names, comma-separated ("" if none)
STABILITY_STATIC_OK = "stability.static_ok"  # passed before training
STABILITY_DIVERGED = "stability.diverged"  # an outcome, not a condition: loss, gradients or W went non-finite
STABILITY_TAGS = (STABILITY_OK, STABILITY_FLAGS, STABILITY_STATIC_OK, STABILITY_DIVERGED)

CONFIG = "stawm.config"  # a trial's configuration: its run name without the seed; the UI groups seeds by it

# what computed a run (stawm.study.environment): versions on every run, the device's on a trial's (each attempt's)
ENV_PREFIX = "stawm.env."  # + a package's name (env_tag): its installed version; + "python": Python's
ENV_LOCK = "stawm.env.lock_sha256"  # first 16 hex digits of requirements/lock.txt's SHA-256 (absent: no lock file)
ENV_DEVICE_NAME = "stawm.env.device_name"  # the CUDA card (absent on a CPU)
ENV_CUDA = "stawm.env.cuda"  # the CUDA version torch was built for
ENV_DRIVER = "stawm.env.nvidia_driver"  # the NVIDIA driver's version (NVML)
SYSTEM_METRICS_PREFIX = "system/"  # MLflow's system metrics (--system-metrics): not a training metric


def shared_view(key: str) -> str:
    """The experiment tag holding MLflow's UI view `key` (a URL's viewStateShareKey)."""
    return SHARED_VIEW_PREFIX + key


def env_tag(package: str) -> str:
    """The tag holding `package`'s installed version (or python's): stawm.env.torch."""
    return ENV_PREFIX + package


# --- params of the parent run ---------------------------------------------------------------------

SEEDS = "seeds"  # seeds per configuration (the parent's param: as first launched)
SEEDS_NOW = "stawm.seeds"  # parent tag: seeds per configuration now, once --resume added seeds (a param cannot change)
# parent tag: the seed ranges added, each with its Ray experiment ("3-4:NAME-seeds3-4")
SEEDS_ADDED = "stawm.seeds_added"
SWEPT = "swept"  # config fields the study varies (seed excluded), comma-separated

# the plan (stawm.study.plan), logged before the first trial; a resumed study keeps its first launch's
PLAN_TRIALS = "plan.trials"  # Tune trials planned: configurations x seeds (fused: configurations), every stage
PLAN_DONE = "plan.done"  # of those, the ones FINISHED already when the launch began (a resumed study)
PLAN_EPOCH_S = "plan.epoch_s"  # seconds of training steps per epoch expected (plan.json says from where)
PLAN_CONCURRENCY = "plan.concurrency"  # trials expected to run at once
PLAN_WALL_S = "plan.wall_s"  # seconds expected from the parent run to the study's closing summary
PLAN_DEVICE_HOURS = "plan.device_hours"  # GPU-hours, or CPU-core-hours when trials get no GPU (plan.json: device)
PLAN_PARAMS = (PLAN_TRIALS, PLAN_DONE, PLAN_EPOCH_S, PLAN_CONCURRENCY, PLAN_WALL_S, PLAN_DEVICE_HOURS)

# --- metrics (step = epoch, 1-based) ----------------------------------------------------------------

TEST_ERROR = "test_error"  # a fraction
VAL_ERROR = "val_error"
BEST_TEST_ERROR = "best_test_error"  # running minimum of TEST_ERROR
TRAIN_LOSS = "train_loss"  # logged every epoch: the last logged epoch of a run is its last TRAIN_LOSS step
TEST_RECON_LOSS = "test_recon_loss"
VAL_RECON_LOSS = "val_recon_loss"
ERROR_METRICS = (TEST_ERROR, VAL_ERROR)
RATE_METRICS = ("delta", "eta", "theta")  # the memory rates at the end of each epoch (learned when learnable)

# --- artifacts --------------------------------------------------------------------------------------

CONFIG_ARTIFACT = "config.json"  # the flat Config
STABILITY_ARTIFACT = "stability.json"  # the Appendix A report
PLAN_TEXT_ARTIFACT = "plan.txt"  # the parent run's: the plan's block as the study printed it
PLAN_ARTIFACT = "plan.json"  # the parent run's: every figure of the plan and where it comes from
REPORT_ARTIFACT_DIR = "report"  # the parent run's: stawm-report's files, written at the study's end (parent_report)

# --- logged models ----------------------------------------------------------------------------------
# Each member's weights as MLflow 3 LoggedModels (stawm.study.models): the final epoch's, and the best epoch's by
# TEST_ERROR when that is another one. The model's tags besides STUDY, PRESET, SEED, TRIAL_ID (+ MEMBER):

MODEL_KIND = "stawm.model_kind"  # which epoch's weights the model holds: MODEL_FINAL or MODEL_BEST
MODEL_FINAL = "final_epoch"  # the member's last epoch (one that stopped on its own: the epoch it stopped after)
MODEL_BEST = "best_epoch"  # its lowest TEST_ERROR (the first epoch to reach it), when that is not its last epoch
MODEL_EPOCH = "stawm.model_epoch"  # the epoch whose weights it holds (its metrics are that epoch's)
MODELS_SKIPPED = "stawm.models_skipped"  # the run's tag: the models not logged and why ("final: diverged ...")

# --- values -----------------------------------------------------------------------------------------

TRUE, FALSE = "true", "false"


def tag_bool(flag: bool) -> str:
    """How a boolean tag is written."""
    return TRUE if flag else FALSE


def read_tag_bool(tags: dict, key: str, default: bool) -> bool:
    """A boolean tag read back; `default` when the run has not written it (yet)."""
    value = tags.get(key)
    return default if value is None else value.strip().lower() == TRUE


def tag_filter(tags: dict[str, str]) -> str:
    """An MLflow search filter matching every tag exactly."""
    return " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())


class ParamError(ValueError):
    """A param string (from MLflow or a command line) that is not a valid value of its kind."""


def parse_value(name: str, value, kind: type):
    """A param's value as `kind` (int, float, bool, str, or tuple of ints), from MLflow's string or a plain value.

    Strings are what MLflow gives back for every param and what flags hold: "[64, 128]", "(128,)",
    "64,128", "True", "1", "0.001", "8". None stays None (a run that did not log the field).
    Raises ParamError naming the param.
    """
    if value is None:
        return None
    try:
        if kind is tuple:
            if isinstance(value, str):
                text = value.strip()
                parsed = ast.literal_eval(text) if text.startswith(("(", "[")) else text.replace(",", " ").split()
                value = parsed if isinstance(parsed, (list, tuple)) else [parsed]
            return tuple(_whole(v) for v in value)
        if kind is bool:
            if isinstance(value, str):
                if value.strip().lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.strip().lower() in ("true", "1")
            return bool(value)
        if kind is int:
            return _whole(value)
        return kind(value)
    except (TypeError, ValueError, SyntaxError):
        raise ParamError(f"{name}={value!r} is not a valid {kind.__name__}") from None


def _whole(value) -> int:
    """An int from an int, a whole float or their text ("8", "8.0"); 8.5 is an error, not 8."""
    number = float(value) if isinstance(value, (str, float)) else value
    if isinstance(number, float) and not number.is_integer():
        raise ValueError(value)
    return int(number)


def parse_pairs(pairs: list[str], flag: str = "--set") -> dict[str, str]:
    """FIELD=VALUE strings (a repeatable flag) -> {field: value}; the values stay strings, for
    `parse_value` to type-check against the field, so a bad one is reported naming its field."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ParamError(f"{flag} {pair!r} is not FIELD=VALUE")
        result[key.strip()] = value.strip()
    return result
