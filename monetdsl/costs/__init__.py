"""The costing stage: between tracing and search, what each op costs on a device.

Two sources: the roofline presets of :mod:`monetdsl.tracing.costs` (a machine you do not
have: ``trace --device P100``), or :func:`measure_costs`, each op and implementation run
on the device the model trains on, its time and its allocator-measured memory, kept on
disk by op signature (:class:`MeasurementStore`) so nothing is measured twice.
"""
from .locations import user_cache_dir
from .measure import CostReport, Measured, apply_entries, measure_costs, run_measured
from .probes import AllocatorProbe, CudaProbe, device_probe
from .signature import machine_signature, op_signature
from .store import MeasurementStore
from .traced import MEASURE_REPEATS, measured_report, profile_trace, profiled_cost_model, trace, trace_model, with_estimated_workspaces

__all__ = ["user_cache_dir", "CostReport", "Measured", "apply_entries", "measure_costs", "run_measured", "AllocatorProbe",
           "CudaProbe", "device_probe", "machine_signature", "op_signature", "MeasurementStore",
           "MEASURE_REPEATS", "measured_report", "profile_trace", "profiled_cost_model", "trace", "trace_model", "with_estimated_workspaces"]
