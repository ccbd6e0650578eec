"""STAWM: the Short Term Attentive Working Memory model, and the harness that studies it."""

from .config import PRESETS, Config, ConfigError, preset
from .memory import HebbRosenblatt
from .model import STAWM, Output

__all__ = ["Config", "ConfigError", "HebbRosenblatt", "Output", "PRESETS", "STAWM", "preset"]
