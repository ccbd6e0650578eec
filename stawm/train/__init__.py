"""Training (torch and the model; no Ray, no MLflow): the data, one loop for K >= 1 members, its two step
implementations (one model; K fused), its checkpoints, and the `stawm-train` command (`cli`)."""

from .checkpoints import CHECKPOINT, CheckpointError
from .fused import FusionError
from .loop import final_metrics, train
from .step import COMPILE_MODES, PRECISIONS

__all__ = ["CHECKPOINT", "COMPILE_MODES", "CheckpointError", "FusionError", "PRECISIONS", "final_metrics", "train"]
