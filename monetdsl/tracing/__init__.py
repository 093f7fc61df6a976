"""From a PyTorch model to a ``.monet`` spec (``monetdsl trace``).

Import cost: this package imports torch; the rest of monetdsl does not need it.
"""
from .api import DTYPES, TraceResult, profile_trace, trace, trace_model
from .capture import CaptureError
from .costs import PRESETS, DevicePreset, Roofline

__all__ = ["trace", "trace_model", "profile_trace", "TraceResult", "CaptureError", "PRESETS", "DevicePreset", "Roofline", "DTYPES"]
