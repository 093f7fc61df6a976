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

Before that fallback, what the schedule measured over its plan is charged to what cut the
stretches, its recomputations: the excess (the measured step against the store-all
step's measured ratio to eager times the plan's overhead, in the plan's own us) shared
equally by the recomputations it ran, added to the recomputation time of every forward
implementation (a per-recomputation price for the Python the cut stretches pay, the same
for every op: the search then recomputes fewer, larger ops, or none, where the cuts cost
more than they save), and the search re-plans on those costs
(:func:`recomputation_charged`). At most :data:`RECHARGE_ROUNDS` re-plans: each is a search
and a timed comparison with eager's step, and one round prices every op's recomputation,
not only the ones measured, so a second round is needed only when the new schedule's cuts
cost more per recomputation than the first one's. Every verdict is stored, so a later
plan of the same graph on this machine goes through the same rounds without timing.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

from ..costs import MeasurementStore
from ..costs.signature import machine_signature
from ..errors import CapWarning, SolveError, warn_at_user
from ..grammar.printer import format_schedule
from ..planning import schedule_for
from .eager_reference import eager_reference, time_against_eager

__all__ = ["CAP_SLACK", "RECHARGE_ROUNDS", "CapCheck", "check_capped_schedule", "recomputation_charged",
           "recomputations", "schedule_holding_cap"]

#: re-plans on recomputation charged what it measured, before store-all (module docstring)
RECHARGE_ROUNDS = 2

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


def recomputations(schedule) -> int:
    """How many recomputations ``schedule`` runs (each a forward op run again)."""
    return sum(len(stage.recompute) for stage in schedule.stages)


def recomputation_charged(network, charge_us: float):
    """``network`` with ``charge_us`` added to every forward implementation's recomputation
    time: the price of the stretch a recomputation cuts (module docstring)."""
    if charge_us < 0 or not math.isfinite(charge_us):
        raise ValueError(f"a recomputation charge must be a finite number of us >= 0, not {charge_us!r}")
    return network.with_impls(lambda op, impl: replace(impl, recompute_time_us=impl.effective_recompute_time_us + charge_us))


def _excess_us(check: CapCheck, store_all_ratio: float, simulation) -> float:
    """What a schedule measured over its plan, in the plan's us: its measured ratio to eager
    against the store-all step's ratio times the plan's overhead, scaled to its compute."""
    planned = store_all_ratio * (1.0 + simulation.overhead)
    return (check.ratio / planned - 1.0) * simulation.compute_us


def schedule_holding_cap(model, inputs, trace, spec, constraints, found: tuple, cap: float, *, optimizer: str,
                         schedule_dir, cache_dir=None, progress=None, measure=None, store_all_ratio=None) -> tuple:
    """``found`` (the solved ``(schedule, simulation)`` for ``constraints``, whose cap the
    search got from the caller's ``cap`` against eager's step), or, when it recomputes and
    measures over ``cap`` (:class:`CapCheck`), the schedule re-planned with recomputation
    charged what it measured (module docstring; at most :data:`RECHARGE_ROUNDS` times),
    else the store-all schedule the cap was planned against, with a
    :class:`~monetdsl.errors.CapWarning`. With a budget as well, the schedule stays
    (store-all may not fit it) and the warning says what it measured.
    ``store_all_ratio``: the runtime's store-all step over eager's (default: the eager
    reference, stored by the cap's planning)."""
    schedule, simulation = found
    if not any(stage.recompute for stage in schedule.stages):
        return found
    store = MeasurementStore(cache_dir) if cache_dir is not None else MeasurementStore()

    def checked(schedule):
        return check_capped_schedule(model, inputs, trace, schedule, cap, optimizer=optimizer, store=store, measure=measure)

    check = checked(schedule)
    if check.holds:
        return found
    measured = (f"monetdsl: the schedule solved for max_overhead={cap:.1%} (planned {simulation.overhead:+.1%} over the"
                f" runtime's store-all step) measured x{check.ratio:.2f} of eager PyTorch's step on this machine")
    if constraints.budget is not None:
        warn_at_user(f"{measured}; it is kept, as the budget needs it", CapWarning)
        return found
    if store_all_ratio is None:
        store_all_ratio = eager_reference(model, inputs, trace, spec, optimizer=optimizer, store=store).runtime_over_eager
    charge = 0.0
    for _ in range(RECHARGE_ROUNDS):
        excess = _excess_us(check, store_all_ratio, simulation)
        if excess <= 0:
            break  # as planned, and still over the cap: the cap's planning, not a cut, is off
        charge += excess / recomputations(schedule)
        costs = f"{trace.cost_model}; every recomputation charged {charge:.3f} us for the stretch it cuts"
        charged = replace(spec, network=recomputation_charged(spec.network, charge))
        try:
            schedule, simulation = schedule_for(charged, constraints, schedule_dir, costs=costs, progress=progress)
        except SolveError:
            break  # no schedule within the time limit on the charged costs: store-all, below
        if not any(stage.recompute for stage in schedule.stages):
            warn_at_user(f"{measured}; re-planned with every recomputation charged {charge:.1f} us for the stretch it"
                         " cuts, no recomputation pays: the plan keeps every tensor", CapWarning)
            return schedule, simulation
        check = checked(schedule)
        if check.holds:
            return schedule, simulation
    again = f" (and re-planned with recomputation charged {charge:.1f} us, x{check.ratio:.2f})" if charge else ""
    warn_at_user(f"{measured}{again}, over the cap: the plan keeps every tensor instead", CapWarning)
    return schedule_for(spec, replace(constraints, max_overhead=None, method="store-all"), schedule_dir,
                        costs=trace.cost_model, progress=progress)
