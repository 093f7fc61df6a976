"""From a PyTorch model to a ``.monet`` spec of its graph (``monetdsl trace`` adds the costs:
:func:`monetdsl.costs.trace_model`).

Import cost: this package imports torch; the rest of monetdsl does not need it.
"""
from .api import DTYPES, TraceResult, trace_graph, with_costs, with_segments
from .capture import CaptureError
from .costs import PRESETS, DevicePreset, Roofline

__all__ = ["trace_graph", "with_costs", "with_segments", "TraceResult", "CaptureError", "PRESETS", "DevicePreset", "Roofline", "DTYPES"]
