"""A traced spec with its costs: the trace, then the costing stage.

:func:`trace_model` is what ``monetdsl trace`` and ``monetdsl.trace`` run: the graph
(:func:`monetdsl.tracing.trace_graph`, roofline times), every implementation's workspace
estimated on FakeTensors (:mod:`.estimated_workspace`), or with ``profile=True`` every
op and implementation measured on the device (:mod:`.measure`), the estimates made only
for the steps whose workspace the allocator could not measure.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..ir import Spec
from ..tracing.api import TraceResult, trace_graph, with_costs
from .kept_workspaces import estimated_workspaces
from .measure import AGREEMENT, CostReport, apply_entries, measure_costs
from .store import MeasurementStore

__all__ = ["trace_model", "trace", "profile_trace", "measured_report", "with_estimated_workspaces", "profiled_cost_model",
           "device_description", "MEASURE_REPEATS"]

#: timed runs per step at most (after one warm-up; two when they agree,
#: :data:`~.measure.AGREEMENT`, one when it agrees with the warm-up): the median is steady
#: by then on small ops, and planning time matters
MEASURE_REPEATS = 3


def device_description(device: str) -> str:
    """The device costs are measured on, as specs and caches name it."""
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def profiled_cost_model(device: str, repeats: int = MEASURE_REPEATS) -> str:
    """The cost-model line of a spec measured on ``device`` (the same on every run of one
    machine: the runtime keys its caches on it)."""
    return (f"measured on {device_description(device)} (median of up to {repeats} runs after a warm-up run, two when"
            f" they agree within {AGREEMENT:.0%}, the warm-up and one when those agree, per op and implementation;"
            " workspaces from the allocator's peak)")


def with_estimated_workspaces(trace: TraceResult, store: MeasurementStore | None = None) -> TraceResult:
    """``trace`` with every implementation's workspace: the temporaries its runtime step
    allocates, run on FakeTensors of the traced shapes; a step that cannot run on
    FakeTensors keeps workspace 0 and a note says so. With ``store``, the estimates of a
    graph estimated before are read back from it (:mod:`.kept_workspaces`). ``trace`` is
    untouched."""
    start = time.perf_counter()
    report = estimated_workspaces(trace.built, store)
    result = with_costs(trace, report.network, trace.cost_model, report.notes)
    result.built.workspace = report
    result.total_seconds += time.perf_counter() - start
    return result


def profile_trace(trace: TraceResult, device: str, repeats: int = MEASURE_REPEATS,
                  store: MeasurementStore | None = None) -> TraceResult:
    """``trace`` with every op and implementation measured on ``device`` (``cpu`` or
    ``cuda``): times and allocator-measured workspaces, kept in ``store`` (default: the
    user's cache directory). ``trace`` is untouched; steps that cannot be run keep their
    estimates, with a note."""
    start = time.perf_counter()
    trace, report = measured_report(trace, device, store if store is not None else MeasurementStore(), repeats)
    result = with_costs(trace, report.network, profiled_cost_model(device, repeats), report.notes)
    result.total_seconds += time.perf_counter() - start
    return result


def measured_report(trace: TraceResult, device: str, store: MeasurementStore | None,
                    repeats: int = MEASURE_REPEATS) -> tuple[TraceResult, CostReport]:
    """``trace``'s ops measured on ``device`` (:func:`~.measure.measure_costs`), as the
    trace the measurements apply to and the report.

    A measured workspace replaces the FakeTensor estimate, so the estimates (seconds on a
    large graph: every step run on FakeTensors) are made only when some step's workspace
    could not be measured (no allocator to watch, a step that failed to run), and only
    when ``trace`` does not carry them already; the returned trace then carries them and
    the report's network is the estimates with the measurements over them."""
    report = measure_costs(trace.built, device, store, repeats)
    if report.unmeasured_workspaces() and trace.built.workspace is None:
        trace = with_estimated_workspaces(trace, store)
        report.network = apply_entries(trace.built.network, report.entries)
    return trace, report


def trace_model(model, example_inputs, *, repeats: int = MEASURE_REPEATS, store: MeasurementStore | None = None,
                estimate_workspaces: bool = True, **options) -> TraceResult:
    """Trace one training step of ``model`` and describe it as a spec with its costs.

    ``options`` are :func:`~monetdsl.tracing.trace_graph`'s (``loss``, ``name``,
    ``device``, ``profile``, ``optimizer``, ``dtype``). With ``profile=True`` every op and
    implementation is measured on ``device`` (``repeats`` runs each, kept in ``store``),
    and the FakeTensor workspace estimates are made only for what the allocator could not
    measure (:func:`measured_report`). Given a ``store``, the workspace estimates are kept
    there too. ``estimate_workspaces=False`` leaves them out (every workspace 0): for a
    caller that measures the costs itself and estimates only what it could not measure."""
    traced = trace_graph(model, example_inputs, **options)
    if options.get("profile"):
        return profile_trace(traced, options.get("device", "P100"), repeats, store)
    return with_estimated_workspaces(traced, store) if estimate_workspaces else traced


def trace(model, example_inputs, **options) -> Spec:
    """Trace ``model`` on ``example_inputs`` and return the spec (IR); see :func:`trace_model`."""
    return trace_model(model, example_inputs, **options).spec
