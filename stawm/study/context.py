"""What a trial needs that its study does not search: one frozen `TrialContext`.

Ray Tune's way to hand a trainable something that is not a search value is `tune.with_parameters`: the
context travels once through Ray's object store to every worker, and `param_space` holds only what the study
sweeps (Config fields, a `variant` of several fields, the seed axis). The context is built once by
`runner.start_study` and read by the trial, its runs (`tracking.open_trial_run`) and its device
(`gpu_share.trial_device`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrialContext:
    study: str  # the study's name: its MLflow experiment, and the STUDY tag of every run
    experiment_id: str  # the study's MLflow experiment
    parent_run_id: str  # the study's parent run: every trial's run is its child
    tracking_uri: str  # trials on other nodes do not see the driver's environment, so it travels here
    base_config: dict = field(default_factory=dict)  # the flat Config every trial starts from (read only)
    swept: tuple[str, ...] = ()  # the Config fields the study varies: a run is named after their values
    outage_budget_s: float = 1800.0  # seconds a trial rides out a tracking server that does not answer
    git_commit: str = "unknown"  # the driver's checkout ($STAWM_GIT_COMMIT in a Ray job, which has no .git)
    git_dirty: bool | None = None  # whether that checkout had uncommitted changes (None: unknown)
    source: str = "unknown"  # the study script, as MLflow shows a run's source
    data_root: str = ""  # dataset folder, absolute ("" = the default): Tune moves each trial into its own folder
    device: str = "auto"  # auto | cpu | cuda; auto: CUDA when the trial has a GPU share and sees a GPU
    gpu_fraction: float = 0.0  # share of a GPU per trial; below 1 the trial caps its CUDA memory to it
    gpu_overhead_mb: float = 0.0  # CUDA memory a trial's process holds outside torch's allocator (probed)
    fuse_seeds: bool = False  # --fuse-seeds: each trial trains the seeds of its `seeds` list as one fused model
    system_metrics: str = "auto"  # --system-metrics: on | off | auto (on when the trial trains on a GPU)
