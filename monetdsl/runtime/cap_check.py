"""A capped schedule that recomputes is timed against eager's step before it is used.

The search charges each op its own time. Some of the runtime's speed is not an op's: runs
of stored ops go through autograd's engine in one call (:mod:`.stretches`), and a schedule
that recomputes cuts those runs, so its backward pays Python per op where the plan charged
the engine's price. On an unrolled GRU (32 time steps, about 360 tiny ops) schedules
planned at x1.05-1.10 of eager's step measured x2-x9. A cap is a promise about eager's
step, so a capped schedule that recomputes is timed next to eager's (interleaved pairs,
:func:`~.eager_reference.time_against_eager`) once per schedule and machine (kept in the
measurement store); when it measures over the cap, by more than :data:`CAP_SLACK` for the
noise of a few pairs, the plan falls back to the store-all schedule the cap was planned
against (itself measured within the cap, or the model would train as eager PyTorch) and a
:class:`~monetdsl.errors.CapWarning` says so.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from ..costs import MeasurementStore
from ..costs.signature import machine_signature
from ..errors import CapWarning, warn_at_user
from ..grammar.printer import format_schedule
from ..planning import schedule_for
from .eager_reference import time_against_eager

__all__ = ["CAP_SLACK", "CapCheck", "check_capped_schedule", "schedule_holding_cap"]

#: a schedule holds its cap when it measures at most (1 + cap) x this x eager's step: the
#: median ratio of a few interleaved pairs moves by a few percent on a shared machine
CAP_SLACK = 1.05


@dataclass(frozen=True)
class CapCheck:
    """A capped schedule's measured step over eager's, against the cap asked for."""

    ratio: float
    cap: float

    @property
    def holds(self) -> bool:
        return self.ratio <= (1.0 + self.cap) * CAP_SLACK


def _key(trace, schedule, device: str) -> str:
    digest = hashlib.sha256(format_schedule(schedule).encode()).hexdigest()[:24]
    clock = "wall time" if device == "cuda" else "process CPU time"
    return f"capped schedule against eager in {clock}; graph {trace.spec.fingerprint}; schedule {digest}; {machine_signature(device)}"


def check_capped_schedule(model, inputs, trace, schedule, cap: float, *, optimizer: str,
                          store: MeasurementStore, measure=None) -> CapCheck:
    """``schedule``'s step over eager's (stored, else measured now with ``measure``,
    default :func:`~.eager_reference.time_against_eager`, and kept) against ``cap``."""
    measure = measure if measure is not None else time_against_eager
    device = "cuda" if any(getattr(t, "is_cuda", False) for t in inputs) else "cpu"
    key = _key(trace, schedule, device)
    found = store.get(key)
    if found is not None and isinstance(found.get("ratio"), (int, float)) and found["ratio"] > 0:
        return CapCheck(float(found["ratio"]), cap)
    reference = measure(model, inputs, trace, schedule, optimizer=optimizer)
    store.put(key, {"ratio": reference.runtime_over_eager, "eager_us": reference.eager_us, "runtime_us": reference.runtime_us})
    return CapCheck(reference.runtime_over_eager, cap)


def schedule_holding_cap(model, inputs, trace, spec, constraints, found: tuple, cap: float, *, optimizer: str,
                         schedule_dir, cache_dir=None, progress=None, measure=None) -> tuple:
    """``found`` (the solved ``(schedule, simulation)`` for ``constraints``, whose cap the
    search got from the caller's ``cap`` against eager's step), or, when it recomputes and
    measures over ``cap`` (:class:`CapCheck`), the store-all schedule the cap was planned
    against, with a :class:`~monetdsl.errors.CapWarning`. With a budget as well, the
    schedule stays (store-all may not fit it) and the warning says what it measured."""
    schedule, simulation = found
    if not any(stage.recompute for stage in schedule.stages):
        return found
    store = MeasurementStore(cache_dir) if cache_dir is not None else MeasurementStore()
    check = check_capped_schedule(model, inputs, trace, schedule, cap, optimizer=optimizer, store=store, measure=measure)
    if check.holds:
        return found
    measured = (f"monetdsl: the schedule solved for max_overhead={cap:.1%} (planned {simulation.overhead:+.1%} over the"
                f" runtime's store-all step) measured x{check.ratio:.2f} of eager PyTorch's step on this machine")
    if constraints.budget is not None:
        warn_at_user(f"{measured}; it is kept, as the budget needs it", CapWarning)
        return found
    warn_at_user(f"{measured}, over the cap: the plan keeps every tensor instead", CapWarning)
    return schedule_for(spec, replace(constraints, max_overhead=None, method="store-all"), schedule_dir,
                        costs=trace.cost_model, progress=progress)
