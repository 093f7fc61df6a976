"""The joint MILP as a search method: model, MIP start, HiGHS, decode, replay, fall back.

:func:`solve_joint` is what ``--method milp`` (and, with every implementation pinned,
``--method checkmate``) runs:

1. build the model (:mod:`.model`); a budget no schedule can meet because of a step that
   always runs is caught here without a solve;
2. run the cheap heuristics and encode the best one that satisfies the constraints as the
   MIP start, so that HiGHS always holds an incumbent and a time limit never leaves the
   user with nothing when a heuristic fits;
3. solve with a time limit and a relative gap, reporting progress;
4. decode the incumbent into a schedule and compute the model's own accounting of it
   (:func:`.codec.evaluate`); :func:`~monetdsl.search.solve.solve` then replays it in the
   simulator, which is the referee; the two are compared and any difference is reported;
5. when the budget is infeasible, find the exact minimum feasible budget with the
   peak-memory objective (:func:`minimum_budget`).

With ``objective="memory"`` (``--min-memory``, or an overhead cap without a budget) the
search minimises the peak, then spends the remaining time on the fastest schedule at that
peak (a second solve warm-started from the first; ``options={"polish": False}`` skips it).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ...ir import Network, Schedule
from ...units import human_bytes
from ...validate import ResolvedConstraints
from ..outcome import MethodOutcome, SearchContext
from ..progress import ProgressInfo
from .. import known
from ..simulator import Simulation, chosen_impls, simulate
from ..stopping import StallStop, StallWatch, StopRule
from .codec import Accounting, canonical, decisions_from_solution, decode, encode, evaluate
from .highs import MilpRun, run_highs
from .model import MIB, BuildTimeout, JointModel, build_model

__all__ = ["DEFAULT_TIME_LIMIT", "DEFAULT_GAP", "solve_joint", "minimum_budget", "certify_minimum", "MinimumBudget", "not_proved_minimum",
           "least_peak_within", "without_budget"]

#: seconds a MILP search may take when the caller gives no limit
DEFAULT_TIME_LIMIT = 60.0
#: share of its time limit a search may spend building its model; past it the search stops
#: with the best schedule found (and for the minimum budget, a cheap proved bound). A
#: 400-node Checkmate graph took 10 s to build, 1,000 nodes about a minute; passing a
#: model that large to HiGHS and presolving it take a comparable time again, which the
#: limit has to leave room for
BUILD_SHARE = 0.5
#: share of the build time kept back, out of a run's time, for decoding HiGHS's incumbent
#: and replaying it (:func:`highs_seconds`), and for HiGHS's last pass between two
#: callbacks: a 400-node Checkmate graph built in 6-7 s took 0.5-1.0 s to decode and
#: 0.3-0.6 s more to replay and check; ResNet-50 under Checkmate's pins, built in 17.6 s,
#: 2.9 s to decode and 1.0 s to replay and write, and HiGHS ended 1.5 s past its limit;
#: UNet's model (built in 2.8 s, presolve on) ended 0.6-1.2 s past a 10-s limit
AFTER_SHARE = 0.6
#: HiGHS's presolve does not stop for a time limit or a callback, and takes one to three
#: times as long as building the model did (a 400-node Checkmate graph built in 10.4 s:
#: HiGHS's first callback 11.1 s after it started; UNet's model, built in 7.4 s: a run
#: limited to 12.0 s took 13.8 s; ResNet-50 under Checkmate's pins, 735,000 rows built in
#: 6.8 s: a run limited to about 18 s took 21.6 s); a run left less than this multiple of
#: the build time runs without it (:func:`presolve_fits`), where the callbacks stop it in time
PRESOLVE_ROOM = 4.0
#: a MIP run without presolve (:func:`presolve_fits`) still spends about the build time in
#: HiGHS's setup of the branch and bound before its first callback, which no limit stops
#: (ResNet-50 under Checkmate's pins, built in 14.6 s: 11-17 s, with the feasibility jump
#: and symmetry detection off; MobileNetV2's, built in 10.9 s, 16-17 s on a busy machine);
#: a run left less than this multiple of the build time is not started
#: (:func:`root_fits`), its best start is the answer
ROOT_ROOM = 1.5
#: Chen's greedy search and revolve run as heuristics up to this many forward ops
HEURISTICS_MAX_FORWARD_OPS = 250
#: relative optimality gap at which HiGHS stops (0.01 %)
DEFAULT_GAP = 1e-4
#: share of the time limit the eviction from store-all may take as a MIP start: on large
#: layered graphs no other heuristic fits a tight budget but recompute-all (a 400-node
#: Checkmate graph at 0.8x the store-all peak: HiGHS held recompute-all's 4.27x for 60 s)
EVICTION_SHARE = 0.15
#: the candidates' name for a schedule an earlier search of this graph reported (:mod:`..known`)
KNOWN = "earlier minimum-budget search"


@dataclass
class MinimumBudget:
    """The smallest peak any schedule reaches (within the overhead cap, if any)."""

    bytes: int | None
    exact: bool
    lower_bound: int | None
    schedule: Schedule | None
    seconds: float
    details: dict = field(default_factory=dict)


#: the heuristics that replay many candidate schedules each (seconds on ResNet-50 on a
#: busy machine): :func:`_heuristics` leaves them out once its ``until`` has passed
COSTLY_HEURISTICS = ("chen-greedy", "revolve")


def _heuristics(network: Network, constraints: ResolvedConstraints, ctx: SearchContext, pins, names=None,
                until: float | None = None) -> list[tuple[str, Schedule, Simulation]]:
    """Every cheap method's schedule (or those in ``names``) with its simulation (valid ones
    only), and the schedules behind the minimum budgets reported earlier for this graph
    (:mod:`..known`) that satisfy the pins. ``until`` (a ``time.perf_counter()`` instant):
    the :data:`COSTLY_HEURISTICS` are not started after it."""
    from ..solve import HEURISTICS, METHODS

    pinned = constraints
    if pins:
        allowed = dict(constraints.allowed_impls)
        allowed.update(pins)
        pinned = ResolvedConstraints(
            constraints.memory_budget, constraints.max_overhead, constraints.keep, constraints.never_recompute, allowed
        )
    found = []
    for name in HEURISTICS if names is None else names:
        if until is not None and name in COSTLY_HEURISTICS and time.perf_counter() > until:
            continue
        try:
            schedule = METHODS[name](network, pinned, spec_path=ctx.spec_path, fingerprint=ctx.fingerprint)
        except Exception:  # noqa: BLE001 - a heuristic's failure must not stop the MILP
            continue
        sim = simulate(network, schedule, constraints=constraints, baseline_us=ctx.baseline_us)
        if sim.valid:
            found.append((name, schedule, sim))
    for schedule in known.recall(ctx.fingerprint):
        sim = simulate(network, schedule, constraints=constraints, baseline_us=ctx.baseline_us)
        if not sim.valid:
            continue
        if pins:
            impls = chosen_impls(network, schedule)
            if any(impls.get(op) not in allowed for op, allowed in pins.items()):
                continue
        found.append((KNOWN, schedule, sim))
    return found


def _with_eviction(network: Network, constraints: ResolvedConstraints, ctx: SearchContext, pins, candidates: list,
                   time_limit: float) -> list:
    """``candidates`` and store-all with tensors evicted to the budget (or, with the memory
    objective, to the lowest budget within the cap; :func:`..eviction.evicted_start`) when
    that fits: the MIP start and fallback where the other heuristics are far off. Not
    with ``pins`` (the eviction keeps store-all's implementations) or
    ``options={"evict": False}``."""
    found = None if pins else evicted_candidate(network, constraints, ctx, candidates, time_limit)
    if found is None or not found.simulation.ok:
        return candidates
    return [*candidates, ("eviction", found.schedule, found.simulation)]


def evicted_candidate(network: Network, constraints: ResolvedConstraints, ctx: SearchContext, candidates: list,
                      time_limit: float):
    """The store-all among ``candidates`` evicted as the search asks
    (:func:`..eviction.evicted_start`, floored at the network's peak lower bound), whether
    or not it fits; None without a store-all candidate, with ``options={"evict": False}``
    or when there is nothing to evict to."""
    from ..eviction import evicted_start
    from ..hybrid.bounds import peak_lower_bound

    store = next(((s, sim) for name, s, sim in candidates if name == "store-all"), None)
    if store is None or not ctx.options.get("evict", True):
        return None
    return evicted_start(network, store, constraints, objective=ctx.objective, baseline_us=ctx.baseline_us, time_limit=time_limit,
                         floor=peak_lower_bound(network, constraints.allowed_impls), stop=ctx.stop)


def _objective_value(sim: Simulation, objective: str) -> float:
    return float(sim.peak_bytes) if objective == "memory" else sim.compute_us


def _start_for(model: JointModel, candidates) -> tuple[str, object, float] | None:
    """The best candidate schedule that lies in the model's space: (name, column vector, value).

    Candidates are tried best first and the first that lies in the space is the answer:
    encoding one into a large model takes seconds (ResNet-50 under Checkmate's pins,
    735,000 rows), and every one of them used to be encoded before HiGHS started."""
    for name, schedule, sim in sorted(candidates, key=lambda c: _objective_value(c[2], model.objective)):
        decisions, outside = encode(model, canonical(model, schedule))
        if outside:
            continue
        values = model.builder.complete(decisions)
        if model.builder.violations(values):
            continue
        return name, values, _objective_value(sim, model.objective)
    return None


def _units(model: JointModel):
    """Convert model objective values to user units (us, or bytes including fixed memory)."""
    if model.objective == "memory":
        return (lambda v: None if v is None else model.fixed_bytes + v * MIB), "bytes"
    return (lambda v: v), "us"


def _progress_adapter(ctx: SearchContext, model: JointModel, label: str, phase: str):
    if ctx.progress is None:
        return None
    convert, unit = _units(model)

    def report(elapsed, incumbent, bound, gap):
        ctx.progress(ProgressInfo(label, phase, elapsed, convert(incumbent), convert(bound), gap, unit))

    return report


def highs_seconds(model: JointModel, time_left: float) -> float:
    """The time limit of a HiGHS run (:func:`.highs.run_highs`, which counts passing the
    model over) when ``time_left`` remains for the run and what follows it: decoding its
    incumbent and replaying it take about a quarter of the time building the model took
    (:data:`AFTER_SHARE`), so that much is kept back."""
    return max(0.1, time_left - AFTER_SHARE * model.stats.get("build_seconds", 0.0))


def room_for_another(model: JointModel, seconds: float, least: float = 0.2) -> bool:
    """Whether ``seconds`` leave room for a second model the size of ``model`` (the
    minimum's proof, the fastest schedule at the least peak): building it, a HiGHS run
    as long again, and decoding (at least ``least`` seconds). Building checks its
    deadline only between stages: started with too little time, UNet's second model
    overran the limit by 1.3 s."""
    return seconds > max(least, (2.0 + AFTER_SHARE) * model.stats.get("build_seconds", 0.0))


def presolve_fits(model: JointModel, seconds: float) -> bool:
    """Whether a HiGHS run of ``seconds`` on ``model`` has room for its presolve
    (:data:`PRESOLVE_ROOM`)."""
    return seconds >= PRESOLVE_ROOM * model.stats.get("build_seconds", 0.0)


def root_fits(model: JointModel, seconds: float) -> bool:
    """Whether a HiGHS run of ``seconds`` on ``model`` gets past its setup, which no
    limit stops (:data:`ROOT_ROOM`)."""
    return seconds >= ROOT_ROOM * model.stats.get("build_seconds", 0.0)


def _run(model: JointModel, ctx: SearchContext, time_limit: float, start, label: str, phase: str, *, exact: bool = False,
         stalling: StallStop | None = None) -> MilpRun:
    """HiGHS on ``model`` within ``time_limit`` seconds, decoding included (without its
    presolve and other passes no limit stops when that would not fit,
    :func:`presolve_fits`; not at all when its setup would not, :func:`root_fits`: the run
    then ends at once with status ``time_limit``, no solution and a message saying why);
    with ``stalling``, its incumbents go to the stall watch, which ends the run once the
    search has stopped paying (:mod:`..stopping`)."""
    time_limit = highs_seconds(model, time_limit)
    if not root_fits(model, time_limit):
        rows, built = model.stats.get("rows", 0), model.stats.get("build_seconds", 0.0)
        return MilpRun("time_limit", None, None, None, None, 0.0, 0, ctx.options.get("backend", "highspy"),
                       f"HiGHS was not started: {time_limit:.1f} s were left, and on a model of {rows:,} rows (built in"
                       f" {built:.1f} s) its setup alone, which no limit stops, takes up to {ROOT_ROOM:g} times as long as the build",
                       started=False)
    gap = 0.0 if exact else ctx.options.get("gap", DEFAULT_GAP)
    abs_gap = 0.25 / MIB if model.objective == "memory" else 1e-6
    progress = _progress_adapter(ctx, model, label, phase)
    if stalling is not None:
        convert, _ = _units(model)
        report = progress

        def progress(elapsed, incumbent, bound, gap_now):
            stalling.watch.observe(convert(incumbent))
            if report is not None:
                report(elapsed, incumbent, bound, gap_now)

    return run_highs(
        model.builder,
        time_limit=time_limit,
        rel_gap=gap,
        abs_gap=abs_gap,
        start=start,
        progress=progress,
        backend=ctx.options.get("backend", "highspy"),
        stop=ctx.stop if stalling is None else stalling,
        uninterruptible=presolve_fits(model, time_limit),
    )


def _stalling(ctx: SearchContext) -> StallStop:
    """A stall watch for one HiGHS run of the joint MILP, its clock starting now."""
    return StallStop(StallWatch(StopRule.from_options(ctx.options)), ctx.stop)


def _decoded(model: JointModel, run: MilpRun, ctx: SearchContext) -> tuple[Schedule, Accounting]:
    decisions = decisions_from_solution(model, run.x)
    schedule = decode(model, decisions, spec_path=ctx.spec_path, fingerprint=ctx.fingerprint)
    return schedule, evaluate(model, decisions)


def minimum_budget(
    network: Network,
    constraints: ResolvedConstraints,
    ctx: SearchContext,
    *,
    pins: dict[str, tuple[str, ...]] | None = None,
    time_limit: float | None = None,
    label: str = "milp",
    candidates=None,
) -> MinimumBudget:
    """The exact minimum feasible budget (minimum peak within the overhead cap).

    ``exact`` is True when HiGHS proves the minimum to within half a byte; otherwise
    ``bytes`` is the best peak found and ``lower_bound`` what HiGHS proved.
    """
    begin = time.perf_counter()
    limit = time_limit if time_limit is not None else (ctx.time_limit or DEFAULT_TIME_LIMIT)
    cons = ResolvedConstraints(None, constraints.max_overhead, constraints.keep, constraints.never_recompute, constraints.allowed_impls)
    if candidates is None:
        candidates = _heuristics(network, cons, ctx, pins, heuristic_names(network))
    candidates = [c for c in candidates if c[2].ok or (cons.max_overhead is None or c[2].overhead <= cons.max_overhead + 1e-12)]
    try:
        model = build_model(network, cons, pins=pins, objective="memory", max_overhead=cons.max_overhead, baseline_us=ctx.baseline_us,
                            deadline=begin + BUILD_SHARE * limit)
    except BuildTimeout as exc:
        return _best_found(network, cons, candidates, ctx, pins, begin, str(exc))
    if model.builder.conflicts:
        return MinimumBudget(None, True, None, None, time.perf_counter() - begin, {"conflicts": model.builder.conflicts})
    start = _start_for(model, candidates)
    run = _run(model, ctx, max(0.1, limit - (time.perf_counter() - begin)), None if start is None else start[1], label, "minimum budget", exact=True)
    seconds = time.perf_counter() - begin
    details = {"solver_status": run.status, "nodes": run.nodes, "backend": run.backend}
    if run.status == "infeasible":
        return MinimumBudget(None, True, None, None, seconds, details)
    lower = None if run.bound is None else int(math.ceil(model.fixed_bytes + run.bound * MIB - 1e-6))
    best = least_peak_within(network, cons, candidates, ctx.baseline_us)
    sim = None
    if run.x is not None:
        schedule, _ = _decoded(model, run, ctx)
        sim = simulate(network, schedule, constraints=cons, baseline_us=ctx.baseline_us)
        if not sim.ok:  # the reported peak is always a replayed one: never the model's own figure
            details["decoded_rejected"] = "; ".join(d.message for d in (sim.errors or sim.violations)[:3])
            sim = None
    if sim is None or (best is not None and best[2].peak_bytes < sim.peak_bytes):
        # no usable incumbent (time ran out first, or scipy without a start found a worse one)
        if best is None:
            return MinimumBudget(None, False, lower, None, seconds, details)
        return MinimumBudget(best[2].peak_bytes, False, lower, best[1], seconds, details)
    peak = sim.peak_bytes
    exact = _proved(model, run, peak)
    remaining = limit - (time.perf_counter() - begin)
    if run.status == "optimal" and not exact and room_for_another(model, remaining):
        exact, better = certify_minimum(network, cons, ctx, peak, pins=pins, time_limit=remaining)
        if better is not None:
            schedule, peak = better
            exact = _proved(model, run, peak)
    return MinimumBudget(peak, exact, lower, schedule, time.perf_counter() - begin, details)


def _best_found(network, cons, candidates, ctx, pins, begin: float, why: str) -> MinimumBudget:
    """No time for the exact search: the least peak among ``candidates`` (best found, not
    proved) and the cheap bound every schedule meets (:func:`~..hybrid.bounds.peak_lower_bound`)."""
    from ..hybrid.bounds import peak_lower_bound

    allowed = dict(cons.allowed_impls)
    allowed.update(pins or {})
    lower = peak_lower_bound(network, allowed)
    best = least_peak_within(network, cons, candidates, ctx.baseline_us)
    details = {"solver_status": "time_limit", "not_proved": why}
    if best is None:
        return MinimumBudget(None, False, lower, None, time.perf_counter() - begin, details)
    return MinimumBudget(best[2].peak_bytes, False, lower, best[1], time.perf_counter() - begin, details)


def without_budget(constraints: ResolvedConstraints) -> ResolvedConstraints:
    """``constraints`` with no memory budget (the overhead cap, keeps and pins stay)."""
    return ResolvedConstraints(None, constraints.max_overhead, constraints.keep, constraints.never_recompute, constraints.allowed_impls)


def least_peak_within(network: Network, constraints: ResolvedConstraints, candidates, baseline_us: float):
    """The candidate ``(name, schedule, simulation)`` of least replayed peak that meets every
    constraint but the budget (replayed again under them), or None."""
    cons = without_budget(constraints)
    for name, schedule, sim in sorted(candidates, key=lambda c: (c[2].peak_bytes, c[2].compute_us)):
        replay = simulate(network, schedule, constraints=cons, baseline_us=baseline_us)
        if replay.ok:
            return name, schedule, replay
    return None


def _proved(model: JointModel, run: MilpRun, peak: int) -> bool:
    """Peaks are whole bytes: a proved bound within one byte of the peak proves it minimal."""
    return run.status == "optimal" and run.bound is not None and peak - (model.fixed_bytes + run.bound * MIB) < 1.0


def certify_minimum(
    network: Network, constraints: ResolvedConstraints, ctx: SearchContext, peak: int, *, pins=None, time_limit: float
) -> tuple[bool, tuple[Schedule, int] | None]:
    """Prove that no schedule peaks below ``peak``: the budget ``peak - 1`` is infeasible.

    HiGHS declares optimality within its own tolerances, which on byte-sized objectives can
    leave a bound a few bytes short of the incumbent. This settles it: returns ``(True,
    None)`` when ``peak - 1`` is proved infeasible, ``(False, (schedule, its peak))`` if a
    lower peak exists after all (the peak replayed by the simulator), ``(False, None)`` when
    time ran out.
    """
    begin = time.perf_counter()
    cons = ResolvedConstraints(peak - 1, constraints.max_overhead, constraints.keep, constraints.never_recompute, constraints.allowed_impls)
    try:
        model = build_model(network, cons, pins=pins, objective="compute", memory_budget=peak - 1, max_overhead=cons.max_overhead,
                            baseline_us=ctx.baseline_us, deadline=begin + time_limit)
    except BuildTimeout:
        return False, None
    if model.builder.conflicts:
        return True, None
    run = _run(model, ctx, max(0.1, time_limit - (time.perf_counter() - begin)), None, "milp", "proving the minimum")
    if run.status == "infeasible":
        return True, None
    if run.x is not None:
        schedule, _ = _decoded(model, run, ctx)
        sim = simulate(network, schedule, constraints=without_budget(constraints), baseline_us=ctx.baseline_us)
        if sim.ok and sim.peak_bytes < peak:
            return False, (schedule, sim.peak_bytes)
    return False, None


def solve_joint(
    network: Network,
    constraints: ResolvedConstraints,
    ctx: SearchContext,
    *,
    pins: dict[str, tuple[str, ...]] | None = None,
    label: str = "milp",
) -> MethodOutcome:
    """Run the MILP search; see the module docstring for the steps."""
    begin = time.perf_counter()
    limit = ctx.time_limit or DEFAULT_TIME_LIMIT
    objective = ctx.objective
    budget = constraints.memory_budget
    try:
        model = build_model(
            network,
            constraints,
            pins=pins,
            objective=objective,
            memory_budget=budget,
            max_overhead=constraints.max_overhead,
            baseline_us=ctx.baseline_us,
            deadline=begin + BUILD_SHARE * limit,
        )
    except BuildTimeout as exc:
        return _unbuilt(network, constraints, ctx, pins, str(exc), limit - (time.perf_counter() - begin))
    details: dict = {"model": model.stats}
    candidates = _heuristics(network, constraints, ctx, pins, heuristic_names(network))
    left = limit - (time.perf_counter() - begin)
    candidates = _with_eviction(network, constraints, ctx, pins, candidates, min(EVICTION_SHARE * limit, 0.5 * left))
    fitting = [c for c in candidates if c[2].ok]
    if model.builder.conflicts:
        return _infeasible(network, constraints, ctx, pins, label, begin, details, candidates)
    start = _start_for(model, fitting)
    if start is not None:
        details["start"] = start[0]
    run = _run(model, ctx, max(0.1, limit - (time.perf_counter() - begin)), None if start is None else start[1], label, "search")
    details.update(solver_status=run.status, nodes=run.nodes, backend=run.backend, solver_seconds=round(run.seconds, 3))
    if not run.started:
        details["solver_not_started"] = run.message
    convert, unit = _units(model)
    if run.status == "infeasible":
        return _infeasible(network, constraints, ctx, pins, label, begin, details, candidates)
    if run.status == "error":  # e.g. HiGHS reports a numerical failure: say so, keep any heuristic
        details["solver_message"] = run.message
        if fitting:
            name, schedule, sim = min(fitting, key=lambda c: _objective_value(c[2], objective))
            return MethodOutcome(schedule, "feasible", f"HiGHS failed ({run.message}); best heuristic: {name}", details=details)
        return MethodOutcome(None, "time_limit", f"HiGHS failed ({run.message}) and no heuristic schedule fits", details=details)
    if run.x is None:
        # the limit ended the search before any incumbent: fall back to a heuristic
        bound = convert(run.bound)
        if fitting:
            name, schedule, sim = min(fitting, key=lambda c: _objective_value(c[2], objective))
            value = _objective_value(sim, objective)
            gap = None if bound is None else max(0.0, value - bound) / max(value, 1e-12)
            message = (
                f"the time limit ({limit:g} s) ended the MILP search before it found a schedule; this is the best"
                f" heuristic schedule ({name})"
            ) if run.started else f"{run.message}; this is the best heuristic schedule ({name})"
            return MethodOutcome(schedule, "time_limit", message, bound, gap, details={**details, "fallback": name})
        message = f"the time limit ({limit:g} s) ended the MILP search before it found a schedule, and no heuristic schedule fits"
        if not run.started:
            message = f"{run.message}, and no heuristic schedule fits"
        if bound is not None:
            message += f"; every schedule needs at least {_fmt(bound, unit)}" if objective == "memory" else f"; lower bound {_fmt(bound, unit)}"
        return MethodOutcome(None, "time_limit", message, bound, None, details=details)
    schedule, accounting = _decoded(model, run, ctx)
    retries = 0
    while budget is not None and accounting.peak_bytes > budget and retries < 3:
        # HiGHS accepted the point within its tolerances but it is over the budget by a
        # few bytes: exclude it by tightening the budget by the excess and solve again
        retries += 1
        tighter = budget - (accounting.peak_bytes - budget) * retries
        cons = ResolvedConstraints(tighter, constraints.max_overhead, constraints.keep, constraints.never_recompute, constraints.allowed_impls)
        try:
            model = build_model(network, cons, pins=pins, objective=objective, memory_budget=tighter, max_overhead=cons.max_overhead,
                                baseline_us=ctx.baseline_us, deadline=begin + limit)
        except BuildTimeout:
            return MethodOutcome(None, "time_limit", "a schedule HiGHS found was over the budget by a few bytes and the time"
                                 " limit came before the retry", details=details)
        remaining = max(limit - (time.perf_counter() - begin), 0.1)
        run = _run(model, ctx, remaining, None, label, "search")
        details["tolerance_retries"] = retries
        if run.status == "infeasible":
            return _infeasible(network, constraints, ctx, pins, label, begin, details, candidates)
        if run.x is None:
            message = "a schedule HiGHS found was over the budget by a few bytes and the retry found none in time"
            return MethodOutcome(None, "time_limit", message, details=details)
        schedule, accounting = _decoded(model, run, ctx)
    details["milp_peak_bytes"] = accounting.peak_bytes
    details["milp_compute_us"] = float(accounting.compute_us)
    status = "optimal" if run.status == "optimal" else "time_limit"
    bound = convert(run.bound)
    value = accounting.peak_bytes if objective == "memory" else accounting.compute_us
    if status == "time_limit" and fitting:
        # without a MIP start (scipy) the incumbent can be worse than a heuristic: keep the better
        name, h_schedule, h_sim = min(fitting, key=lambda c: _objective_value(c[2], objective))
        if _objective_value(h_sim, objective) < value:
            schedule, value = h_schedule, _objective_value(h_sim, objective)
            details["fallback"] = name
            for key in ("milp_peak_bytes", "milp_compute_us"):
                details.pop(key)
    gap = 0.0 if status == "optimal" else (None if bound is None else max(0.0, value - bound) / max(abs(value), 1e-12))
    outcome = MethodOutcome(schedule, status, "", bound, gap, details=details)
    if objective == "memory":
        # the schedule's replayed peak (the simulator is the referee): HiGHS may return a
        # point whose model value sits a few bytes above the schedule it decodes to (a MIP
        # start at the optimum came back 16 B "worse" on transformer_block under Checkmate's
        # pins), which would leave the minimum unproved for nothing
        replay = simulate(network, schedule, constraints=without_budget(constraints), baseline_us=ctx.baseline_us)
        peak = replay.peak_bytes if replay.ok else int(value)
        lowest = min(fitting, key=lambda c: (c[2].peak_bytes, c[2].compute_us), default=None)
        if lowest is not None and lowest[2].peak_bytes < peak:  # the start came back worse: keep the start
            outcome.schedule, peak = lowest[1], lowest[2].peak_bytes
            details["fallback"] = lowest[0]
            for key in ("milp_peak_bytes", "milp_compute_us"):
                details.pop(key, None)
        exact = _proved(model, run, peak)
        remaining = limit - (time.perf_counter() - begin)
        if status == "optimal" and not exact and room_for_another(model, remaining):
            exact, better = certify_minimum(network, constraints, ctx, peak, pins=pins, time_limit=remaining)
            if better is not None:  # tolerance hid a lower peak: take it (minimal when the bound says so)
                outcome.schedule, peak = better
                exact = _proved(model, run, peak)
                if not exact:
                    outcome.status = "time_limit"
        outcome.min_feasible_budget = peak
        outcome.min_feasible_budget_exact = exact
        remaining = limit - (time.perf_counter() - begin)
        details["proof_seconds"] = round(time.perf_counter() - begin, 3)
        if room_for_another(model, remaining, 0.5) and ctx.options.get("polish", True) and not ctx.stopped:
            _polish(network, constraints, ctx, pins, label, outcome, peak, remaining)
    return outcome


def _polish(network, constraints, ctx, pins, label, outcome, peak, remaining) -> None:
    """Second phase of the memory objective: the fastest schedule at the minimum peak."""
    cons = ResolvedConstraints(peak, constraints.max_overhead, constraints.keep, constraints.never_recompute, constraints.allowed_impls)
    begin = time.perf_counter()
    try:
        model = build_model(network, cons, pins=pins, objective="compute", memory_budget=peak, max_overhead=cons.max_overhead,
                            baseline_us=ctx.baseline_us, deadline=begin + remaining)
    except BuildTimeout:
        return
    remaining -= time.perf_counter() - begin
    if model.builder.conflicts or remaining <= 0.1:
        return
    first = simulate(network, outcome.schedule, constraints=cons, baseline_us=ctx.baseline_us)
    start = _start_for(model, [("phase 1", outcome.schedule, first)])
    stalling = _stalling(ctx)  # the peak is settled: this phase only trims compute, while it pays
    run = _run(model, ctx, remaining, None if start is None else start[1], label, "fastest at that peak", stalling=stalling)
    outcome.details["polish_status"] = run.status
    if stalling.reason is not None and run.status != "optimal":
        outcome.details["polish_stopped"] = stalling.reason
    if run.x is None:
        return
    schedule, accounting = _decoded(model, run, ctx)
    if accounting.compute_us < first.compute_us - 1e-9 and accounting.peak_bytes <= peak:
        outcome.schedule = schedule
        outcome.details["milp_peak_bytes"] = accounting.peak_bytes
        outcome.details["milp_compute_us"] = float(accounting.compute_us)


def heuristic_names(network: Network) -> list[str]:
    """The heuristics worth running as MIP starts and for comparison: all of them up to
    :data:`HEURISTICS_MAX_FORWARD_OPS` forward ops; above, Chen's greedy search and revolve
    (each replays many candidate schedules, minutes on 1,000 ops) are left out."""
    from ..solve import HEURISTICS

    if len(network.forward_ops) <= HEURISTICS_MAX_FORWARD_OPS:
        return list(HEURISTICS)
    return [n for n in HEURISTICS if n not in ("chen-greedy", "revolve")]


def _unbuilt(network, constraints, ctx, pins, why: str, time_left: float) -> MethodOutcome:
    """The time limit came before the model was built: the best heuristic that fits, or
    none, with the least peak found as a budget that works (not proved minimal). The
    eviction gets at most half of ``time_left`` (building checks its deadline only between
    stages: a 1,000-node graph's went 2 s past it at load 10)."""
    begin = time.perf_counter()
    candidates = _heuristics(network, constraints, ctx, pins, heuristic_names(network))
    left = time_left - (time.perf_counter() - begin)
    seconds = min(EVICTION_SHARE * (ctx.time_limit or DEFAULT_TIME_LIMIT), 0.5 * left)
    candidates = _with_eviction(network, constraints, ctx, pins, candidates, seconds) if seconds > 0 else candidates
    details = {"model": "not built", "not_proved": why}
    fitting = [c for c in candidates if c[2].ok]
    if fitting:
        name, schedule, sim = min(fitting, key=lambda c: _objective_value(c[2], ctx.objective))
        message = f"the time limit came before the MILP was built ({why}); this is the best heuristic schedule ({name})"
        outcome = MethodOutcome(schedule, "time_limit", message, details={**details, "fallback": name})
        if ctx.objective == "memory":
            outcome.min_feasible_budget = sim.peak_bytes
        return outcome
    outcome = MethodOutcome(None, "time_limit", f"the time limit came before the MILP was built ({why}) and no heuristic"
                            " schedule fits", details=details)
    best = least_peak_within(network, constraints, candidates, ctx.baseline_us)
    if best is not None:
        outcome.min_feasible_budget, outcome.min_budget_schedule = best[2].peak_bytes, best[1]
        outcome.message += not_proved_minimum(best[2].peak_bytes, None)
    return outcome


def _infeasible(network, constraints, ctx, pins, label, begin, details, candidates) -> MethodOutcome:
    limit = max(0.1, (ctx.time_limit or DEFAULT_TIME_LIMIT) - (time.perf_counter() - begin))
    found = minimum_budget(network, constraints, ctx, pins=pins, time_limit=limit, label=label, candidates=candidates)
    details["minimum_budget"] = found.details
    if found.lower_bound is not None:
        details["min_budget_lower_bound"] = found.bytes if found.exact else found.lower_bound
    if found.bytes is None:
        message = "no schedule satisfies the constraints at any budget"
        if constraints.max_overhead is not None:
            message += f" within the overhead cap {constraints.max_overhead:.2%}"
        return MethodOutcome(None, "infeasible", message, details=details)
    budget = constraints.memory_budget
    message = (
        f"no schedule fits the budget {human_bytes(budget)} ({budget} B)" if budget is not None else "no schedule fits"
    )
    if constraints.max_overhead is not None:
        message += f" within the overhead cap {constraints.max_overhead:.2%}"
    if found.exact:
        message += f"; the minimum feasible budget is exactly {human_bytes(found.bytes)} ({found.bytes} B)"
    else:
        message += not_proved_minimum(found.bytes, found.lower_bound)
    outcome = MethodOutcome(None, "infeasible", message, details=details)
    outcome.min_feasible_budget = found.bytes
    outcome.min_feasible_budget_exact = found.exact
    outcome.min_budget_schedule = found.schedule
    return outcome


def not_proved_minimum(best: int, lower: int | None) -> str:
    """The words for a minimum budget the search could not prove: the best replayed peak
    (a budget that works) and the proved lower bound."""
    words = (f"; the minimum feasible budget was not proved before the search stopped: the best schedule found peaks at"
             f" {human_bytes(best)} ({best} B; pass it as the budget, e.g. '{best}B')")
    if lower is not None:
        words += f", and every schedule needs at least {human_bytes(lower)} ({lower} B, proved)"
    return words


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return human_bytes(int(round(value))) if unit == "bytes" else f"{value:.6g} us"

