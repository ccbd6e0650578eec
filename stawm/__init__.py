"""STAWM: the Short Term Attentive Working Memory model, and the harness that studies it."""

from .config import PRESETS, Config, ConfigError, preset

__all__ = ["Config", "ConfigError", "HebbRosenblatt", "Output", "PRESETS", "STAWM", "preset"]


def __getattr__(name: str):
    # The model classes import torch; loading them on first use keeps `stawm.config` (read by the
    # analysis library and the study drivers) free of that cost.
    if name in ("HebbRosenblatt", "STAWM", "Output"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'stawm' has no attribute {name!r}")
