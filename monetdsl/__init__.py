"""monetdsl: train larger PyTorch models in less memory.

One optimisation decides which activations to keep, which to recompute in the backward
pass and when, and which implementation each operator uses. Specs and schedules are
``.monet`` text; the simulator in :mod:`monetdsl.search.simulator` referees every schedule.

Data flows one way: spec text -> IR (:mod:`monetdsl.ir`) -> search -> schedule -> runtime.
"""
from .errors import CapWarning, Diagnostic, EstimatedCostsWarning, MonetError, OptionError, OutputError, PlanningWarning, ScheduleError, SolveError, SpecError, SpecSyntaxError
from .grammar import (
    format_schedule,
    format_spec,
    load_schedule,
    load_spec,
    parse_schedule,
    parse_spec,
)
from .ir import Network, Schedule, Spec
from .search import Simulation, SolveResult, simulate, solve

__version__ = "0.1.0"


def trace(model, example_inputs, **options) -> Spec:
    """Trace one training step of a PyTorch model into a spec (the IR).

    A thin front for :func:`monetdsl.costs.trace` (imported on first use, so that
    importing monetdsl does not import torch). Options: ``loss``, ``name``, ``device``
    (roofline preset or profiling device), ``profile``, ``optimizer``, ``dtype``.
    """
    from .costs import trace as _trace

    return _trace(model, example_inputs, **options)


def optimize(model, example_inputs=None, **options):
    """A module that trains ``model`` with a schedule; see :func:`monetdsl.runtime.optimize`
    (options: ``budget``, ``max_overhead``, ``schedule``, ``method``, ``optimizer``, ``cache_dir``)."""
    from .runtime import optimize as _optimize

    return _optimize(model, example_inputs, **options)


def backend(**options):
    """A ``torch.compile`` backend that trains with schedules; see :func:`monetdsl.runtime.backend`."""
    from .runtime import backend as _backend

    return _backend(**options)


def measure(step, inputs=None, **options):
    """Measured peak memory of training steps (vs the plan); see :func:`monetdsl.runtime.measure`."""
    from .runtime import measure as _measure

    return _measure(step, inputs, **options)


def retain_freed_memory(**options):
    """Make glibc's malloc keep freed host memory in the process (faster, steadier CPU
    steps); see :func:`monetdsl.runtime.host_malloc.retain_freed_memory`."""
    from .runtime.host_malloc import retain_freed_memory as _retain

    return _retain(**options)


__all__ = [
    "__version__",
    "Diagnostic",
    "MonetError",
    "SpecError",
    "SpecSyntaxError",
    "ScheduleError",
    "SolveError",
    "OptionError",
    "OutputError",
    "PlanningWarning",
    "CapWarning",
    "EstimatedCostsWarning",
    "Network",
    "Spec",
    "Schedule",
    "parse_spec",
    "load_spec",
    "parse_schedule",
    "load_schedule",
    "format_spec",
    "format_schedule",
    "simulate",
    "Simulation",
    "solve",
    "SolveResult",
    "trace",
    "optimize",
    "backend",
    "measure",
    "retain_freed_memory",
]
