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
    ('optimal', 4096)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

from ..errors import SolveError, SpecError
from ..ir import Schedule, Spec
from ..options import check_search_options, option_error
from ..units import human_bytes
from ..validate import ResolvedConstraints, resolve_constraints
from .baselines import chen_sqrt, recompute_all, store_all
from .checkmate import checkmate, checkmate_lp
from .chen import chen_greedy
from .hybrid.engine import hybrid, simple_lower_bound
from . import known
from .impl_choice import cheapest_impls, no_recompute_compute_us, undominated_backward_impls
from .milp.engine import DEFAULT_TIME_LIMIT, _heuristics, minimum_budget, solve_joint
from .outcome import MethodOutcome, SearchContext
from .progress import ProgressCallback
from .revolve import revolve
from .simulator import Simulation, simulate

__all__ = ["METHODS", "SEARCHERS", "HEURISTICS", "SolveResult", "solve", "register_method"]

Method = Callable[..., Schedule]

#: name -> function. Plain methods: ``(network, constraints, *, spec_path, fingerprint) ->
#: Schedule``; searching methods (listed in :data:`SEARCHERS`): ``(network, constraints,
#: SearchContext) -> MethodOutcome``.
METHODS: dict[str, Method] = {
    "milp": solve_joint,
    "hybrid": hybrid,
    "checkmate": checkmate,
    "checkmate-lp": checkmate_lp,
    "chen-sqrt": chen_sqrt,
    "chen-greedy": chen_greedy,
    "revolve": revolve,
    "store-all": store_all,
    "recompute-all": recompute_all,
}
#: methods that search (time limit, objective, bound, gap): see :mod:`.outcome`
SEARCHERS = {"milp", "hybrid", "checkmate", "checkmate-lp"}
#: cheap plain methods, whose best schedule is the MILP's MIP start
HEURISTICS = ["store-all", "chen-sqrt", "chen-greedy", "revolve", "recompute-all"]
#: the heuristics fast on any graph size (Chen's greedy search and revolve replay many
#: candidate schedules: minutes on 1,000 ops)
CHEAP_HEURISTICS = ["store-all", "chen-sqrt", "recompute-all"]
#: ``auto`` runs the exact MILP up to this many forward ops, the hybrid engine above: the
#: joint MILP proves optimality within a minute up to about 14 forward ops on this
#: machine's 2 cores (benchmarks/results/scaling_60s.md), and a block of the hybrid
#: engine is that size anyway
AUTO_EXACT_MAX_OPS = 16


def choose_method(network, constraints: ResolvedConstraints, objective: str | None) -> tuple[str, str]:
    """The method ``auto`` runs, and why (the reason appears in the JSON output)."""
    n = len(network.forward_ops)
    if objective != "memory" and constraints.memory_budget is None and constraints.max_overhead is None:
        return "store-all", "no memory budget or overhead cap: keeping every tensor is the fastest schedule"
    if n <= AUTO_EXACT_MAX_OPS:
        return "milp", f"{n} forward ops (at most {AUTO_EXACT_MAX_OPS}): the exact joint MILP proves optimality quickly"
    return "hybrid", f"{n} forward ops (more than {AUTO_EXACT_MAX_OPS}): blocks solved exactly, joined by the chain DP"


def register_method(name: str, function: Method, *, searches: bool = False) -> None:
    """Make a search method available to :func:`solve` and the CLI (``--method name``).

    ``searches``: the function takes a :class:`~.outcome.SearchContext` and returns a
    :class:`~.outcome.MethodOutcome` (see :mod:`.outcome`).
    """
    METHODS[name] = function
    if searches:
        SEARCHERS.add(name)


@dataclass
class SolveResult:
    """Outcome of :func:`solve`.

    ``status`` is ``"optimal"`` (proved best), ``"feasible"`` (a schedule within every
    constraint, optimality not proved), ``"time_limit"`` (the best schedule found before the
    limit, with ``gap``; no schedule when the limit came before any), ``"interrupted"`` (the
    caller stopped the search: its best schedule so far, which ``success`` says fits) or
    ``"infeasible"`` (no schedule within the constraints; see ``min_feasible_budget``, exact when
    ``min_feasible_budget_exact``). ``schedule`` and ``simulation`` are set whenever a
    schedule exists, even an infeasible one, so callers can show how far off it is.
    ``lower_bound`` is in the objective's unit (microseconds of compute, or bytes of peak).
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
        """A schedule within every constraint (``interrupted`` has one when its search had)."""
        if self.status == "interrupted":
            return self.simulation is not None and self.simulation.ok
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
        if self.min_feasible_budget is not None:
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
    objective: str | None = None,
    progress: ProgressCallback | None = None,
    exact_min_budget: bool = True,
    spelling: dict | None = None,
    stop=None,
) -> SolveResult:
    """Find a schedule for ``spec`` with ``method`` under its constraints.

    ``memory_budget`` (bytes) and ``max_overhead`` (a fraction) override the spec's
    constraints. ``auto`` picks a method (:func:`choose_method`): ``store-all`` without any
    constraint, the exact ``milp`` on small networks, ``hybrid`` on larger ones;
    ``details["chosen"]`` and ``details["reason"]`` say which and why.

    Searching methods (``milp``, ``hybrid``, ``checkmate``, ``checkmate-lp``) take ``time_limit``
    (seconds, default 60), ``objective`` (``"compute"``: fastest within the budget;
    ``"memory"``: lowest peak within the cap, the default when only a cap is given),
    ``options`` (``gap``: relative gap, ``backend``: ``"highspy"`` or ``"scipy"``) and a
    ``progress`` callback.

    When no schedule fits the budget, ``min_feasible_budget`` says how much would:
    the method's own exact minimum for the MILPs, and for other methods the exact minimum
    over all schedules from the joint MILP (skipped with ``exact_min_budget=False``).

    Every option is checked by :func:`~monetdsl.options.check_search_options` (text with
    units is accepted too: ``memory_budget="6GiB"``, ``max_overhead="10%"``); a bad one,
    or an unknown key in ``options``, raises :class:`~monetdsl.errors.OptionError`, its
    message spelling each option as ``spelling`` says (the CLI passes its flags).

    ``stop`` (anything with ``is_set()``, such as a :class:`threading.Event`) ends a search
    early once set: the result then has status ``"interrupted"``, with the best schedule
    found so far when there is one (the CLI sets it on Ctrl-C).
    """
    checked = check_search_options(
        method=method, memory_budget=memory_budget, max_overhead=max_overhead, time_limit=time_limit,
        objective=objective, options=options, methods=METHODS, spelling=spelling, where="monetdsl.solve",
    )
    method, time_limit, objective, options = checked.method, checked.time_limit, checked.objective, checked.options
    constraints = resolve_constraints(
        spec.network,
        spec.constraints,
        memory_budget=checked.memory_budget,
        max_overhead=checked.max_overhead,
        path=spec.path,
        source=spec.source,
    )
    baseline_us = no_recompute_compute_us(spec.network, cheapest_impls(spec.network))
    auto = None
    if method == "auto":
        method, reason = choose_method(spec.network, constraints, objective)
        auto = {"chosen": method, "reason": reason}
    if objective == "memory" and method not in SEARCHERS:
        asked = (spelling or {}).get("objective", "objective='memory'")
        raise option_error(f"{asked} needs a method that searches ({', '.join(sorted(SEARCHERS))}), not {method}", "monetdsl.solve")
    if method in SEARCHERS:
        if objective is None:
            only_cap = constraints.memory_budget is None and constraints.max_overhead is not None
            objective = "memory" if only_cap else "compute"
        ctx = SearchContext(spec.path, spec.fingerprint, baseline_us, objective, time_limit, dict(options or {}), progress, stop)
        result = _solve_searching(spec, method, constraints, ctx, exact_min_budget)
    else:
        result = _solve_plain(spec, method, constraints, baseline_us, time_limit, progress, exact_min_budget, stop)
    if auto is not None:
        result.details.update(auto)
    if stop is not None and stop.is_set():
        _mark_interrupted(result)
    return result


def _mark_interrupted(result: SolveResult) -> None:
    """The search was stopped before it finished: what it has is its best so far, unproved."""
    fits = result.simulation is not None and result.simulation.ok
    result.details["status_before_interrupt"] = result.status
    result.status = "interrupted"
    result.min_feasible_budget_exact = False
    what = "the best schedule found so far" if fits else "no schedule within the constraints found so far"
    result.message = f"interrupted: {what}; {result.message}"


def _solve_plain(spec, method, constraints, baseline_us, time_limit, progress, exact_min_budget, stop=None) -> SolveResult:
    start = time.perf_counter()
    schedule, simulation = _run_method(method, spec, constraints, baseline_us)
    elapsed = time.perf_counter() - start
    if simulation.ok:
        # no constraint and no recompute at the cheapest implementations: nothing is faster
        status = "optimal" if constraints.memory_budget is None and constraints.max_overhead is None and simulation.overhead <= 1e-12 else "feasible"
        return SolveResult(status, f"{method}: {simulation.summary()}", method, schedule, simulation, elapsed)
    reasons = "; ".join(d.message for d in simulation.violations)
    message = f"no schedule satisfies the constraints ({reasons})"
    within_cap = constraints.max_overhead is None or simulation.overhead <= constraints.max_overhead + 1e-12
    smallest = simulation.peak_bytes if within_cap else None
    if smallest is not None and constraints.memory_budget is not None:
        message += f"; the smallest budget {method} can meet is {human_bytes(smallest)} ({smallest} B)"
    result = SolveResult("infeasible", message, method, schedule, simulation, elapsed, min_feasible_budget=smallest)
    if exact_min_budget and constraints.memory_budget is not None:
        left = (time_limit or DEFAULT_TIME_LIMIT) - elapsed
        _add_exact_minimum(spec, constraints, baseline_us, left, progress, result, own=(method, schedule, simulation), stop=stop)
    return result


def _add_exact_minimum(spec, constraints, baseline_us, time_left, progress, result: SolveResult, own=None, stop=None) -> None:
    """Replace a heuristic's smallest budget by the exact one over all schedules (joint MILP),
    within ``time_left`` seconds: when the MILP cannot finish, the least peak found (the
    method's own schedule among the MIP starts) and a proved lower bound, said as such.

    ``own``: the method's ``(name, schedule, simulation)``, a MIP start besides
    :data:`CHEAP_HEURISTICS`' schedules."""
    if time_left <= 0.1:
        result.details["exact_min_budget"] = "not computed: the time limit was spent"
        return
    ctx = SearchContext(spec.path, spec.fingerprint, baseline_us, "memory", time_left, {}, progress, stop)
    begin = time.perf_counter()
    cap_only = replace(constraints, memory_budget=None)
    starts = _heuristics(spec.network, cap_only, ctx, None, CHEAP_HEURISTICS)
    if own is not None:
        starts.append((own[0], own[1], simulate(spec.network, own[1], constraints=cap_only, baseline_us=baseline_us)))
    try:
        found = minimum_budget(spec.network, constraints, ctx, time_limit=max(0.1, time_left - (time.perf_counter() - begin)),
                               candidates=[c for c in starts if c[2].valid])
    except SpecError as exc:  # a spec the MILP refuses: keep the method's own figure
        result.details["exact_min_budget"] = exc.diagnostics[0].message
        return
    if found.bytes is None:
        return
    if found.schedule is not None:
        # minimum_budget reports replayed peaks only; check it here too, the referee's way
        cap_only = replace(constraints, memory_budget=None)
        replay = simulate(spec.network, found.schedule, constraints=cap_only, baseline_us=baseline_us)
        if not replay.ok or replay.peak_bytes != found.bytes:
            raise AssertionError(f"the minimum-budget search reported {found.bytes} B for a schedule that replays"
                                 f" {'invalid' if not replay.valid else f'at {replay.peak_bytes} B'}")
        known.remember(spec.fingerprint, found.schedule, found.bytes)
    if result.min_feasible_budget is not None:
        result.details["method_min_budget"] = result.min_feasible_budget
    result.min_feasible_budget = found.bytes
    result.min_feasible_budget_exact = found.exact
    if found.exact:
        result.message += f"; the smallest budget any schedule meets is exactly {human_bytes(found.bytes)} ({found.bytes} B)"
    else:
        result.message += f"; the smallest budget any schedule meets is at most {human_bytes(found.bytes)} ({found.bytes} B, best found)"
        if found.lower_bound is not None:
            result.message += f" and at least {human_bytes(found.lower_bound)} (proved)"
            result.details["min_budget_lower_bound"] = found.lower_bound
        if found.details.get("not_proved"):
            result.details["exact_min_budget"] = f"not proved within the time limit: {found.details['not_proved']}"


def _check_minimum(spec: Spec, method: str, constraints: ResolvedConstraints, baseline_us: float, result: SolveResult) -> None:
    """The minimum budget an infeasible search reports is the replayed peak of its schedule
    (within the overhead cap): a budget that works when passed back. Remembered for the
    later searches of this graph (:mod:`.known`), which are time-limited too and need not
    find that schedule again."""
    cap_only = replace(constraints, memory_budget=None)
    replay = simulate(spec.network, result.schedule, constraints=cap_only, baseline_us=baseline_us)
    if not replay.ok or replay.peak_bytes != result.min_feasible_budget:
        what = "; ".join(d.message for d in (replay.errors or replay.violations)[:3]) or f"it peaks at {replay.peak_bytes} B"
        raise AssertionError(f"method {method} reported the minimum budget {result.min_feasible_budget} B with a schedule"
                             f" that does not meet it: {what}")
    known.remember(spec.fingerprint, result.schedule, replay.peak_bytes)


def _status_words(status: str, gap: float | None, bound: float | None, objective: str) -> str:
    if status == "optimal":
        return "optimal"
    proof = ""
    if gap is not None:
        shown = "-" if bound is None else (human_bytes(bound) if objective == "memory" else f"{bound:.6g} us")
        proof = f", gap {gap:.2%} (lower bound {shown})"
    return ("time limit reached" if status == "time_limit" else "feasible") + proof


def _bound_from_the_network(spec: Spec, constraints: ResolvedConstraints, ctx: SearchContext, simulation: Simulation,
                            common: dict) -> None:
    """Give an unproved schedule a gap when its method stopped before a bound of its own
    (a MILP stopped before its root relaxation, a heuristic): the network's simple bound
    (:func:`.hybrid.engine.simple_lower_bound`) holds for every schedule, so the gap it
    gives is true, if loose."""
    value = float(simulation.peak_bytes) if ctx.objective == "memory" else simulation.compute_us
    bound = min(simple_lower_bound(spec.network, constraints, ctx), value)
    common["lower_bound"] = bound
    common["gap"] = max(0.0, value - bound) / max(abs(value), 1e-12)
    common["details"]["bound_source"] = "network"


def _solve_searching(spec: Spec, method: str, constraints: ResolvedConstraints, ctx: SearchContext, exact_min_budget: bool) -> SolveResult:
    start = time.perf_counter()
    narrowed = undominated_backward_impls(spec.network, constraints.allowed_impls)  # same optima, a smaller search
    searched = replace(constraints, allowed_impls={**constraints.allowed_impls, **narrowed})
    outcome: MethodOutcome = METHODS[method](spec.network, searched, ctx)
    elapsed = time.perf_counter() - start
    details = dict(outcome.details)
    details["objective"] = ctx.objective
    common = dict(lower_bound=outcome.lower_bound, gap=outcome.gap, details=details)
    if outcome.schedule is None:
        result = SolveResult(outcome.status, f"{method}: {outcome.message}", method, None, None, elapsed, **common)
        result.min_feasible_budget = outcome.min_feasible_budget
        result.min_feasible_budget_exact = outcome.min_feasible_budget_exact
        if outcome.status == "infeasible" and outcome.min_budget_schedule is not None:
            result.schedule = outcome.min_budget_schedule
            result.simulation = simulate(spec.network, result.schedule, constraints=constraints, baseline_us=ctx.baseline_us)
            _check_minimum(spec, method, constraints, ctx.baseline_us, result)
        return result
    simulation = simulate(spec.network, outcome.schedule, constraints=constraints, baseline_us=ctx.baseline_us)
    if not simulation.valid:
        problems = "; ".join(d.message for d in simulation.errors[:3])
        raise AssertionError(f"method {method} produced an invalid schedule: {problems}")
    planned = details.get("milp_peak_bytes"), details.get("milp_compute_us")
    if planned[0] is not None and (planned[0] != simulation.peak_bytes or abs(planned[1] - simulation.compute_us) > 1e-6 * max(1.0, simulation.compute_us)):
        details["accounting_mismatch"] = {"milp_peak_bytes": planned[0], "simulator_peak_bytes": simulation.peak_bytes}
    if simulation.ok:
        if outcome.status != "optimal" and outcome.lower_bound is None:
            _bound_from_the_network(spec, searched, ctx, simulation, common)
        words = _status_words(outcome.status, common["gap"], common["lower_bound"], ctx.objective)
        message = f"{method}: {words}; {simulation.summary()} [{elapsed:.2f} s]"
        if outcome.message:
            message += f" ({outcome.message})"
        if ctx.objective == "memory" and outcome.min_feasible_budget is not None:
            what = "exact" if outcome.min_feasible_budget_exact else "not proved minimal"
            message += f"; minimum feasible budget {human_bytes(simulation.peak_bytes)} ({simulation.peak_bytes} B, {what})"
        result = SolveResult(outcome.status, message, method, outcome.schedule, simulation, elapsed, **common)
        if ctx.objective == "memory":
            result.min_feasible_budget = simulation.peak_bytes
            result.min_feasible_budget_exact = outcome.min_feasible_budget_exact
            known.remember(spec.fingerprint, outcome.schedule, simulation.peak_bytes)
        return result
    # the schedule breaks a constraint in the simulator: no method of this kind fits
    reasons = "; ".join(d.message for d in simulation.violations)
    message = f"{method}: no schedule found within the constraints ({reasons})"
    result = SolveResult("infeasible", message, method, outcome.schedule, simulation, elapsed, **common)
    if exact_min_budget and constraints.memory_budget is not None:
        left = (ctx.time_limit or DEFAULT_TIME_LIMIT) - (time.perf_counter() - start)
        _add_exact_minimum(spec, constraints, ctx.baseline_us, left, ctx.progress, result, own=(method, outcome.schedule, simulation),
                           stop=ctx.stop)
    return result
