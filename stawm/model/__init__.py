"""The model (torch only): the Hebb-Rosenblatt memory, glimpses, the networks, the heads, STAWM itself,
and the Appendix A stability conditions checked on it."""

from .memory import HebbRosenblatt
from .stawm import STAWM, Output

__all__ = ["HebbRosenblatt", "Output", "STAWM"]
