"""One entry point for every search method, and the result object they all return.

:func:`solve` validates its inputs in one place, runs the requested method, replays the
schedule in the simulator (a method's own accounting is never trusted alone), checks the
constraints and returns a :class:`SolveResult` with a status and a message, in the manner
of ``scipy.optimize.milp``.

    >>> from monetdsl.grammar.parser import parse_spec
    >>> spec = parse_spec('''
    ... network n
    ...   tensor x f32[256] input
    ...   op a (x) -> y f32[256] time 1us
    ...     backward reads (grad(y), x) -> grad(x) time 2us
    ...   output y
    ... ''')
    >>> result = solve(spec, method="store-all")
    >>> result.status, result.simulation.peak_bytes
    ('feasible', 4096)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import SolveError, SpecError
from ..ir import Schedule, Spec
from ..units import human_bytes
from ..validate import ResolvedConstraints, resolve_constraints
from .baselines import chen_sqrt, recompute_all, store_all
from .impl_choice import cheapest_impls, no_recompute_compute_us
from .simulator import Simulation, simulate

__all__ = ["METHODS", "SolveResult", "solve", "register_method"]

Method = Callable[..., Schedule]

#: name -> function(network, constraints, *, spec_path, fingerprint) -> Schedule
METHODS: dict[str, Method] = {
    "store-all": store_all,
    "recompute-all": recompute_all,
    "chen-sqrt": chen_sqrt,
}
#: methods ``auto`` tries, fastest schedules first
AUTO_CANDIDATES = ["store-all", "chen-sqrt", "recompute-all"]


def register_method(name: str, function: Method, *, auto: bool = False) -> None:
    """Make a search method available to :func:`solve` and the CLI (``--method name``)."""
    METHODS[name] = function
    if auto and name not in AUTO_CANDIDATES:
        AUTO_CANDIDATES.append(name)


@dataclass
class SolveResult:
    """Outcome of :func:`solve`.

    ``status`` is ``"optimal"`` (proved best), ``"feasible"`` (a schedule within every
    constraint, optimality not proved), ``"time_limit"`` (the best schedule found before the
    limit, with ``gap``) or ``"infeasible"`` (no schedule within the constraints; see
    ``min_feasible_budget``). ``schedule`` and ``simulation`` are set whenever a schedule
    exists, even an infeasible one, so callers can show how far off it is.
    """

    status: str
    message: str
    method: str
    schedule: Schedule | None = None
    simulation: Simulation | None = None
    solve_seconds: float = 0.0
    lower_bound: float | None = None
    gap: float | None = None
    min_feasible_budget: int | None = None
    min_feasible_budget_exact: bool = False
    details: dict = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return self.status in ("optimal", "feasible", "time_limit") and self.schedule is not None

    def as_json(self) -> dict:
        sim = self.simulation
        data = {
            "status": self.status,
            "method": self.method,
            "message": self.message,
            "peak_bytes": sim.peak_bytes if sim else None,
            "compute": sim.compute_us if sim else None,
            "baseline_compute": sim.baseline_us if sim else None,
            "overhead": sim.overhead if sim else None,
            "solve_seconds": round(self.solve_seconds, 6),
        }
        if self.lower_bound is not None:
            data["lower_bound"] = self.lower_bound
        if self.gap is not None:
            data["gap"] = self.gap
        if self.status == "infeasible" and self.min_feasible_budget is not None:
            data["min_feasible_budget"] = self.min_feasible_budget
            data["min_feasible_budget_exact"] = self.min_feasible_budget_exact
        if self.details:
            data["details"] = self.details
        return data


def _run_method(name: str, spec: Spec, constraints: ResolvedConstraints, baseline_us: float) -> tuple[Schedule, Simulation]:
    schedule = METHODS[name](spec.network, constraints, spec_path=spec.path, fingerprint=spec.fingerprint)
    simulation = simulate(spec.network, schedule, constraints=constraints, baseline_us=baseline_us)
    if not simulation.valid:
        problems = "; ".join(d.message for d in simulation.errors[:3])
        raise SolveError(f"method {name} cannot schedule this network: {problems}", details={"method": name})
    return schedule, simulation


def solve(
    spec: Spec,
    method: str = "auto",
    *,
    memory_budget: int | None = None,
    max_overhead: float | None = None,
    time_limit: float | None = None,
    options: dict | None = None,
) -> SolveResult:
    """Find a schedule for ``spec`` with ``method`` under its constraints.

    ``memory_budget`` (bytes) and ``max_overhead`` (a fraction) override the spec's
    constraints. ``auto`` runs the built-in methods and returns the fastest schedule within
    the budget and the overhead cap (with only a cap: the one with the lowest peak).
    """
    if method != "auto" and method not in METHODS:
        raise SpecError(f"unknown method {method!r}; choose one of: auto, {', '.join(METHODS)}")
    if memory_budget is not None and memory_budget <= 0:
        raise SpecError("the memory budget must be positive")
    if max_overhead is not None and max_overhead < 0:
        raise SpecError("the overhead cap cannot be negative")
    if time_limit is not None and time_limit <= 0:
        raise SpecError("the time limit must be positive")
    constraints = resolve_constraints(
        spec.network,
        spec.constraints,
        memory_budget=memory_budget,
        max_overhead=max_overhead,
        path=spec.path,
        source=spec.source,
    )
    baseline_us = no_recompute_compute_us(spec.network, cheapest_impls(spec.network))
    start = time.perf_counter()
    names = AUTO_CANDIDATES if method == "auto" else [method]
    runs = [(name, *_run_method(name, spec, constraints, baseline_us)) for name in names]
    elapsed = time.perf_counter() - start
    fitting = [run for run in runs if run[2].ok]
    only_cap = constraints.memory_budget is None and constraints.max_overhead is not None
    if fitting:
        key = (lambda r: (r[2].peak_bytes, r[2].compute_us)) if only_cap else (lambda r: (r[2].compute_us, r[2].peak_bytes))
        name, schedule, simulation = min(fitting, key=key)
        result = SolveResult("feasible", f"{name}: {simulation.summary()}", method, schedule, simulation, elapsed)
        if method == "auto":
            result.details = {"chosen": name, "reason": _reason(constraints, only_cap)}
        return result
    name, schedule, simulation = min(runs, key=lambda r: (r[2].peak_bytes, r[2].compute_us))
    within_cap = [r for r in runs if constraints.max_overhead is None or r[2].overhead <= constraints.max_overhead + 1e-12]
    smallest = min((r[2].peak_bytes for r in within_cap), default=None)
    reasons = "; ".join(d.message for d in simulation.violations)
    message = f"no schedule satisfies the constraints ({reasons})"
    if smallest is not None and constraints.memory_budget is not None:
        message += f"; the smallest budget the {'methods' if method == 'auto' else 'method'} tried can meet is {human_bytes(smallest)} ({smallest} B)"
    result = SolveResult("infeasible", message, method, schedule, simulation, elapsed, min_feasible_budget=smallest)
    if method == "auto":
        result.details = {"tried": [r[0] for r in runs]}
    return result


def _reason(constraints: ResolvedConstraints, only_cap: bool) -> str:
    if only_cap:
        return "lowest peak within the overhead cap among the built-in methods"
    if constraints.memory_budget is not None:
        return "fastest schedule within the memory budget among the built-in methods"
    return "fastest schedule among the built-in methods (no budget given)"
