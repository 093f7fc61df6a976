"""Checkmate (Jain et al., MLSys 2020) on our IR: the exact MILP and its LP rounding.

Checkmate optimises rematerialisation over a graph with one implementation per operator.
On our IR that is the joint MILP with every implementation pinned to the one the
no-recompute baseline uses (:func:`~monetdsl.search.impl_choice.cheapest_impls`, which
never picks an in-place implementation): same frontier-advancing stage structure (the
forward pass, then one stage per backward op with its recomputations first), same exact
memory accounting, no implementation choice. Comparing ``milp`` with ``checkmate`` at equal
budget therefore isolates what implementation choice buys.

Two deliberate differences from the paper's model: memory is our simulator's (workspace
included, which Checkmate ignores), and the forward pass cannot free and recompute a
tensor inside itself (our schedule language has no such step).

``checkmate-lp`` is Checkmate's approximation: solve the LP relaxation with the budget
scaled to 90 % (their device for landing under the budget after rounding) and at the full
budget, round the carry decisions by a sweep of thresholds and by randomised rounding,
complete each rounding in closed form (:func:`~monetdsl.search.carry_plan.schedule_from_carry`),
replay every candidate in the simulator and keep the best. The LP at the full budget is a
lower bound on Checkmate's optimum, reported with the gap.
"""
from __future__ import annotations

import random
import time

from ..ir import Network
from ..validate import ResolvedConstraints
from .carry_plan import schedule_from_carry
from .impl_choice import cheapest_impls
from .milp.engine import BUILD_SHARE, DEFAULT_TIME_LIMIT, highs_seconds, minimum_budget, presolve_fits, solve_joint
from .milp.highs import run_highs
from .milp.model import MIB, BuildTimeout, build_model
from .outcome import MethodOutcome, SearchContext
from .simulator import simulate

__all__ = ["checkmate", "checkmate_lp", "checkmate_pins"]

#: thresholds of the deterministic rounding sweep
THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
#: randomised roundings per LP solution (seeded: results are reproducible)
RANDOM_DRAWS = 32
#: HiGHS's algorithm for the relaxation: its interior point method (with crossover) solved
#: VGG-16's (41 forward ops, memory objective at a 10 % cap) in 7 s where its default
#: choice, the dual simplex, took 23 s (58 s on a busier machine, past a 60-s limit)
LP_SOLVER = "ipm"


def checkmate_pins(network: Network, constraints: ResolvedConstraints | None) -> dict[str, tuple[str, ...]]:
    """One implementation per op: the cheapest no-recompute one (honouring the spec's pins)."""
    allowed = constraints.allowed_impls if constraints is not None else {}
    return {op: (impl,) for op, impl in cheapest_impls(network, allowed).items()}


def checkmate(network: Network, constraints: ResolvedConstraints, ctx: SearchContext) -> MethodOutcome:
    """Checkmate's exact MILP (no implementation choice)."""
    return solve_joint(network, constraints, ctx, pins=checkmate_pins(network, constraints), label="checkmate")


def checkmate_lp(network: Network, constraints: ResolvedConstraints, ctx: SearchContext) -> MethodOutcome:
    """Checkmate's LP relaxation with deterministic and randomised rounding."""
    begin = time.perf_counter()
    deadline = begin + (ctx.time_limit or DEFAULT_TIME_LIMIT)
    pins = checkmate_pins(network, constraints)
    impls = {op: names[0] for op, names in pins.items()}
    budget = constraints.memory_budget
    fixed = network.fixed_bytes
    objective = ctx.objective
    factors = (0.9, 1.0) if budget is not None and objective == "compute" else (1.0,)
    rng = random.Random(0)
    candidates = {}
    details: dict = {"lp": []}
    lower = None
    for factor in factors:
        scaled = None if budget is None else fixed + int((budget - fixed) * factor)
        try:
            model = build_model(
                network, constraints, pins=pins, objective=objective, memory_budget=scaled,
                max_overhead=constraints.max_overhead, baseline_us=ctx.baseline_us,
                deadline=min(deadline, begin + BUILD_SHARE * (ctx.time_limit or DEFAULT_TIME_LIMIT)),
            )
        except BuildTimeout:
            details["lp"].append({"budget_factor": factor, "status": "time limit while building the model"})
            break
        if model.builder.conflicts:
            details["lp"].append({"budget_factor": factor, "status": "infeasible"})
            continue
        left = highs_seconds(model, deadline - time.perf_counter())
        if left <= 0.1:
            details["lp"].append({"budget_factor": factor, "status": "no time left", "rows": model.stats.get("rows"),
                                  "nonzeros": model.stats.get("nonzeros")})
            break
        run = run_highs(model.builder, time_limit=left, relax=True, backend=ctx.options.get("backend", "highspy"),
                        stop=ctx.stop, lp_solver=LP_SOLVER, uninterruptible=presolve_fits(model, left))
        details["lp"].append({"budget_factor": factor, "status": run.status, "seconds": round(run.seconds, 3),
                              "rows": model.stats.get("rows"), "nonzeros": model.stats.get("nonzeros")})
        if run.x is None:
            continue
        if factor == 1.0 and run.status == "optimal":
            lower = run.objective if objective == "compute" else fixed + run.objective * MIB
        carry_values = {key: expr.value(run.x) for key, expr in model.carry.items()}
        rules = [("threshold", th) for th in THRESHOLDS]
        rules += [("random", {key: rng.random() for key in carry_values}) for _ in range(RANDOM_DRAWS)]
        for rule in rules:
            if candidates and time.perf_counter() > deadline:  # the roundings made so far are replayed below
                details["roundings_cut_by_time_limit"] = True
                break
            carry = [set() for _ in range(model.num_stages + 1)]
            for (t, x), value in carry_values.items():
                if _rounded(rule, (t, x), value):
                    carry[t].add(x)
            key = tuple(frozenset(c) for c in carry)
            if key not in candidates:
                candidates[key] = schedule_from_carry(
                    network, impls, carry, never_recompute=set(constraints.never_recompute),
                    spec_path=ctx.spec_path, fingerprint=ctx.fingerprint,
                )
    if lower is None and budget is not None and details["lp"] and details["lp"][-1]["status"] == "infeasible":
        found = minimum_budget(network, constraints, ctx, pins=pins, label="checkmate-lp",
                               time_limit=max(0.1, deadline - time.perf_counter()))
        outcome = MethodOutcome(None, "infeasible", "Checkmate's LP relaxation is infeasible at this budget", details=details)
        outcome.min_feasible_budget, outcome.min_feasible_budget_exact = found.bytes, found.exact
        return outcome
    sims = []
    for schedule in candidates.values():
        if sims and time.perf_counter() > deadline:
            break
        sim = simulate(network, schedule, constraints=constraints, baseline_us=ctx.baseline_us)
        if sim.valid:
            sims.append((schedule, sim))
    details["roundings"] = len(candidates)
    if not sims:
        return MethodOutcome(None, "time_limit", _why_nothing(details), lower, details=details)
    ok = [s for s in sims if s[1].ok]
    if objective == "memory":
        pool = ok or sims
        schedule, sim = min(pool, key=lambda s: (s[1].peak_bytes, s[1].compute_us))
        value = sim.peak_bytes
    else:
        pool = ok or sims
        key = (lambda s: (s[1].compute_us, s[1].peak_bytes)) if ok else (lambda s: (s[1].peak_bytes, s[1].compute_us))
        schedule, sim = min(pool, key=key)
        value = sim.compute_us
    gap = None if lower is None or not ok else max(0.0, value - lower) / max(value, 1e-12)
    return MethodOutcome(schedule, "feasible", "", lower, gap, details=details)


def _why_nothing(details: dict) -> str:
    """Why no rounding was replayed: the LP was not solved in time (its size, which is what
    decides: ResNet-50's relaxation has 735,000 rows and 2.2 million nonzeros, and HiGHS's
    interior point method made 4 iterations in 50 s on a busy 2-core machine), or no
    rounding of its solution gave a valid schedule."""
    last = details["lp"][-1] if details["lp"] else {}
    if last.get("status") == "time limit while building the model":
        return "the time limit came before Checkmate's LP was built"
    if details.get("roundings", 0) == 0 and last.get("status") in ("time_limit", "no time left"):
        size = f" ({last['rows']:,} rows, {last['nonzeros']:,} nonzeros)" if last.get("rows") else ""
        return f"the time limit came before Checkmate's LP relaxation{size} was solved; nothing to round"
    return "no rounding of the LP solution gave a valid schedule"


def _rounded(rule, key, value: float) -> bool:
    """Deterministic: carry when the LP value reaches the threshold; randomised: with
    probability equal to the LP value (one uniform draw per decision)."""
    kind, arg = rule
    if kind == "threshold":
        return value >= arg - 1e-9
    return arg[key] < value
