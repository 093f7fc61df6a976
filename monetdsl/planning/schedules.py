"""A schedule for a traced spec: the file the caller named, or a solved and cached one.

A schedule file is refused, with a clear message, when its fingerprint is not this graph's,
and replayed by the simulator before it is used. A solved schedule is kept by the graph's
fingerprint, the cost model, the constraints and the implementations the runtime pinned
(:mod:`.schedule_cache`: in memory and, with a cache directory, as ``.monet`` files), so
the search runs once per model, input shapes, constraints and cost model.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import Diagnostic, ScheduleError, SolveError
from ..grammar import load_schedule
from ..ir import Schedule, Spec
from ..search.simulator import Simulation, simulate
from ..search.solve import solve
from ..validate import resolve_constraints
from . import schedule_cache
from .constraints import Constraints

__all__ = ["schedule_for", "schedule_from_file", "fingerprint_of", "cache_key", "short_hash", "clear_caches"]


def clear_caches() -> None:
    """Forget the schedules kept in memory (the cache directory's files stay)."""
    schedule_cache.forget()


def short_hash(text: str) -> str:
    """Eight hex digits of ``text``'s SHA-256: how cache entries name long descriptions."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def cache_key(spec: Spec, constraints: Constraints, costs: str) -> schedule_cache.ScheduleKey:
    """What a schedule solved for ``spec`` under ``constraints`` on ``costs`` (the cost
    model's description) is kept under."""
    pins = short_hash(repr(spec.constraints.impls)) if spec.constraints.impls else ""
    return schedule_cache.ScheduleKey(spec.fingerprint, short_hash(costs), constraints.budget, constraints.max_overhead,
                                      constraints.method, pins)


def schedule_for(spec: Spec, constraints: Constraints, cache_dir: str | Path | None = None, costs: str = "",
                 progress=None) -> tuple[Schedule, Simulation]:
    """A schedule for ``spec``: the file the caller named, or a solved (cached) one.

    Solved schedules are cached by the graph's fingerprint, the constraints and ``costs``
    (the cost model's description): a schedule solved on the roofline is not reused when
    the caller asked for timed costs, while one solved on this machine's timings is reused
    by the next run on this machine (which reads the same timings back from the
    measurement store). ``progress``: the search's progress callback
    (:mod:`monetdsl.search.progress`)."""
    if constraints.schedule is not None:
        return schedule_from_file(spec, constraints.schedule)
    key = cache_key(spec, constraints, costs)
    directory = None if cache_dir is None else Path(cache_dir)
    cached = schedule_cache.recall(spec, key, directory)
    if cached is not None:
        return cached
    result = solve(spec, constraints.method, memory_budget=constraints.budget, max_overhead=constraints.max_overhead,
                   time_limit=constraints.time_limit, progress=progress)
    if not result.success:
        known = {"min_feasible_budget_exact": result.min_feasible_budget_exact} if result.min_feasible_budget is not None else {}
        if result.details.get("min_budget_lower_bound") is not None:
            known["min_budget_lower_bound"] = result.details["min_budget_lower_bound"]
        raise SolveError(f"{spec.network.name}: {result.message}", min_feasible_budget=result.min_feasible_budget, details=known)
    found = (result.schedule, result.simulation)
    schedule_cache.keep(spec, key, found, directory)
    return found


def schedule_from_file(spec: Spec, source: str | Schedule) -> tuple[Schedule, Simulation]:
    """The schedule ``source`` (a ``.monet`` file or a Schedule) names, with its replay for
    ``spec``; :class:`~monetdsl.errors.ScheduleError` when it was made for another graph or
    does not replay validly."""
    schedule = source if isinstance(source, Schedule) else load_schedule(source)
    path = schedule.path
    if schedule.fingerprint != spec.fingerprint:
        raise ScheduleError(Diagnostic(
            f"this schedule was made for another graph (fingerprint {schedule.fingerprint}); the model traces to"
            f" {spec.fingerprint}. Solve again for this model and these inputs (monetdsl.optimize with a budget,"
            f" or monetdsl solve on the spec of `monetdsl trace ... --loss output`: the training loop computes the"
            f" loss, so the graph ends at the model's output)", path, schedule.line))
    constraints = resolve_constraints(spec.network, spec.constraints, path=spec.path, source=spec.source)
    simulation = simulate(spec.network, schedule, constraints=constraints, fingerprint=spec.fingerprint)
    if not simulation.valid:
        raise ScheduleError(simulation.errors)
    return schedule, simulation


def fingerprint_of(schedule: str | Schedule) -> str | None:
    """The fingerprint a schedule (object or file) names; None when the file cannot be read
    (:func:`schedule_from_file` then says why)."""
    if isinstance(schedule, Schedule):
        return schedule.fingerprint
    try:
        return load_schedule(schedule).fingerprint
    except Exception:  # noqa: BLE001 - reported where the schedule is used
        return None
