"""``--method hybrid``: decomposition, block menus, chain DP, composition, refinement.

1. **Decompose** the network into a chain of blocks at cheap cuts (:mod:`.decompose`) and
   cut out each block's sub-network (:mod:`.subnet`); identical blocks share a fingerprint.
   When the kinds of block need more time for their first menus than the menus may take
   and the eviction from store-all (step 5) fits, the blocks are skipped: steps 2-4 would
   not finish, and on such graphs (long edges across every cut) they do worse anyway.
2. **Menus**: each distinct block is solved by the exact joint MILP at a grid of budgets
   (:mod:`.menus`), within a share of the time limit, in parallel processes.
3. **Chain DP** (:mod:`.chain_dp`) over the blocks, with memory in whole units.
4. **Compose** the DP's plan into a schedule of the whole network (:mod:`.chain`,
   :mod:`.compose`) and replay it in the simulator. The DP's accounting is an upper bound
   up to rounding, so the plan usually fits with room to spare: the engine searches the
   DP's internal budget (a bisection on the memory axis of the one table it filled) for
   the fastest plan whose *replayed* peak fits the budget. A plan whose replay exceeds the
   budget is never returned as feasible.
5. Compare with the cheap heuristics (store-all, Chen, revolve, recompute-all, and
   store-all with tensors evicted around its peak, :mod:`..eviction`) and keep
   the best, so the result is never worse than any of them; then improve it by local
   search on its carry plan (:mod:`..local_search`): moves across block boundaries that
   the chain DP cannot express (a residual block keeping its batch-norm output instead of
   its output, re-derived by a cheap add and ReLU).
6. **Refine**: when the whole network's MILP is small enough, warm-start it from the best
   schedule (a highspy MIP start) and let HiGHS improve it in the remaining time; its dual
   bound is reported. Otherwise the bound is :mod:`.bounds`' (every op once, fastest
   implementation), on plain networks with a budget raised by the recomputation the
   budget forces at the step store-all exceeds it most
   (:func:`..eviction.compute_lower_bound_within`). The refinement stops when HiGHS proves its gap, or earlier by
   :mod:`..stopping`'s rule (no improvement of the engine's best for a share of the time
   spent so far, or a best within its tolerance of the simple lower bound, which also
   ends the menus' completion and skips the local search); ``details["stopped"]`` and the
   message say why the search ended.

Without a time limit from the caller, the engine's limit is a share sized to the network
(:mod:`.time_share`), which its phases divide as above.

With the memory objective (``--min-memory``) the engine looks for the smallest internal
budget whose plan replays within the overhead cap, and reports the best peak found and a
lower bound; it is exact only when the refinement MILP proves it. On a network the
refinement MILP fits and that has a batch-sliced segment, that MILP gets the first
:data:`EXACT_FIRST_SHARE` of the time, on its own (:func:`hybrid`): blocks cannot see that a batch-sliced segment's recomputation
frees the whole network's cap, and on VGG-16 with its first block sliced (37 ops, 10 %
cap, 60 s) the pipeline ended at 4.7-5.2 GiB, its refinement given 8 s, while the MILP
alone reached 4.3 GiB. The pipeline then runs in the rest, without the pass restricted to
the first implementations (the MILP searched every implementation, and on the busy
machine that pass overran its share by 30 s), and the lower peak is kept.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from ...errors import SpecError
from ...ir import Network, Schedule
from ...units import human_bytes
from ...slicing import is_segment
from ...validate import ResolvedConstraints
from ..milp.engine import DEFAULT_TIME_LIMIT, _heuristics, evicted_candidate, _start_for, heuristic_names, least_peak_within, minimum_budget, not_proved_minimum, solve_joint, without_budget
from ..milp.codec import decisions_from_solution, decode
from ..milp.highs import run_highs
from ..milp.model import MIB, build_model
from ..eviction import compute_lower_bound_within
from ..local_search import improve
from ..outcome import MethodOutcome, SearchContext
from ..progress import ProgressInfo
from ..stopping import EXACT_MIN_STALL_SECONDS, LOCAL_MIN_STALL_SECONDS, StallWatch, StopRule
from ..simulator import Simulation, simulate
from .bounds import compute_lower_bound, peak_lower_bound
from .chain import ChainModel
from .chain_dp import evaluate_plan, reconstruct, solve_chain
from .decompose import DEFAULT_TARGET_OPS, Decomposition, decompose, decompose_at
from .menus import DEFAULT_CACHE, MIN_SECONDS_PER_KIND, BlockMenu, MenuCache, build_menus, extend_menus, pareto
from .subnet import BlockNet, SubnetError, block_network
from .time_share import sized_time_limit

__all__ = ["hybrid", "HybridRun", "run_hybrid", "simple_lower_bound", "menus_out_of_reach", "block_kinds", "REFINE_MAX_FORWARD_OPS"]

#: the refinement runs the whole network's MILP only up to this many forward ops (above,
#: building the model alone takes longer than the search is worth; see docs/milp.md §11)
REFINE_MAX_FORWARD_OPS = 40
#: share of the time limit spent on the first block menus (targeted solves and the
#: refinement share the rest)
MENU_SHARE = 0.35
#: the menus may take up to this share when the first share left grid points unsolved:
#: a chain DP over half-built menus lands far from what complete ones give (on the GPT
#: runtime spec 48 % of eager's activation peak instead of 30 %, benchmarks/RESULTS-runtime.md),
#: while the phases after the menus rarely use all of their time
MENU_SHARE_MAX = 0.6
#: the chain DP's kernel: numpy (vectorised over memory) fills the same table as the numba
#: loops 1.3-1.4x faster on 70-90 blocks and as fast on 7-16 (benchmarks/results/hybrid_dp.md);
#: ``options={"dp_backend": "numba"}`` selects the compiled loops
DP_BACKEND = "numpy"
#: share of the remaining time the local search gets when the refinement MILP follows
POLISH_SHARE = 0.3
#: schedules the local search starts from (the best distinct ones found)
POLISH_STARTS = 3
#: share of the time left that the least-peak search gets when nothing found fits the
#: budget (the compute-objective refinement gets the rest, started from its schedule when it fits)
FLOOR_SHARE = 0.5
#: share of the time limit the eviction from store-all may take (its exact cover takes
#: 4-7 s on a 1,000-node graph on the loaded 2-core machine; HiGHS's best so far after)
EVICTION_SHARE = 0.25
#: share of the time limit after which the costly heuristics (Chen's greedy search,
#: revolve) are not started: with the replays of the others they took about 3 s of
#: ResNet-50's restricted search, a quarter of a 20-s limit, at load 9 on 2 cores
HEURISTICS_SHARE = 0.05
#: bytes of DP table the engine allows itself (L x L x slots float64)
TABLE_BYTES = 160 * 2**20
#: with the stall rule on, the menus' first share is sized to the network (seconds per
#: forward op, and at least this many seconds) rather than to the time limit; the rest of
#: the grid is solved while the composed schedule keeps improving
FIRST_MENU_SECONDS_PER_OP = 0.1
FIRST_MENU_SECONDS = 2.0
#: the menus' completion stops after this many block MILP solves per kind of block
#: without a better composed plan (and at least the stall share of the solves so far): the
#: stall rule counted in work. Composed plans improve in steps, when the one option a
#: binding block lacked arrives (VGG-16: 8 quiet solves of 26 over 5 kinds ended its
#: menus at 7.12 GiB, against 5.34 GiB with the grid complete)
MIN_STALL_SOLVES_PER_KIND = 2
#: ... and it does not stop at all while the best is more than this share above the simple
#: lower bound: only the menus' time (``MENU_SHARE_MAX``) ends it then
FAR_FROM_BOUND = 0.10
#: with the memory objective, on a network the refinement MILP fits and that has a
#: batch-sliced segment, the share of the time the whole network's MILP gets first
#: (``options={"exact_first": share}`` sets it for any network, 0 skips it)
EXACT_FIRST_SHARE = 0.6


@dataclass
class HybridRun:
    """Everything one hybrid solve found (what :func:`hybrid` reports, and more)."""

    schedule: Schedule | None
    simulation: Simulation | None
    origin: str
    details: dict = field(default_factory=dict)
    lower_bound: float | None = None
    gap: float | None = None
    status: str = "feasible"
    message: str = ""
    min_feasible_budget: int | None = None
    min_feasible_budget_exact: bool = False
    min_budget_schedule: Schedule | None = None
    #: the menus of the blocks, by block index (a later search of the same network with
    #: more implementations allowed starts from their options)
    block_menus: list[BlockMenu] = field(default_factory=list)
    block_sizes: tuple[int, ...] = ()


def _block_nets(network: Network, constraints: ResolvedConstraints, parts: Decomposition) -> tuple[Decomposition, list[BlockNet]]:
    """Sub-networks of every block; a block that cannot stand alone is merged with a neighbour."""
    ends = [parts.blocks[0].size]
    for b in parts.blocks[1:]:
        ends.append(ends[-1] + b.size)
    while True:
        nets = []
        failed = None
        for block in parts.blocks:
            try:
                nets.append(block_network(network, block, constraints))
            except SubnetError:
                failed = block.index
                break
        if failed is None:
            return parts, nets
        if len(ends) == 1:
            raise SpecError("the hybrid engine cannot cut this network into blocks; use --method milp or a heuristic")
        drop = failed if failed < len(ends) - 1 else failed - 1
        del ends[drop]
        parts = decompose_at(network, ends)


def _slots(L: int) -> int:
    return int(max(256, min(2048, TABLE_BYTES // (8 * max(L, 1) ** 2))))


class _Search:
    """The calibrated search over the DP's memory axis."""

    def __init__(self, network, chain: ChainModel, ctx: SearchContext, constraints: ResolvedConstraints, span: int):
        self.network = network
        self.chain = chain
        self.ctx = ctx
        self.constraints = constraints
        self.slots = _slots(chain.L)
        self.unit = ChainModel.unit_for(span, self.slots)
        self.problem = chain.problem(self.unit, self.slots)
        t = time.perf_counter()
        self.table = solve_chain(self.problem, ctx.options.get("dp_backend", DP_BACKEND))
        self.dp_seconds = time.perf_counter() - t
        self.probes: dict[int, tuple[Schedule, Simulation, float, int] | None] = {}

    def probe(self, m: int):
        """(schedule, simulation, DP compute, DP memory units) of the plan at ``m``, or None."""
        m = max(0, min(m, self.slots))
        if m in self.probes:
            return self.probes[m]
        plan = reconstruct(self.problem, self.table, m)
        if plan is None:
            self.probes[m] = None
            return None
        cost, need = evaluate_plan(self.problem, plan)
        schedule = self.chain.schedule(plan, spec_path=self.ctx.spec_path, fingerprint=self.ctx.fingerprint)
        sim = simulate(self.network, schedule, constraints=self.constraints, baseline_us=self.ctx.baseline_us)
        if not sim.valid:
            problems = "; ".join(d.message for d in sim.errors[:3])
            raise AssertionError(f"the hybrid engine composed an invalid schedule: {problems}")
        self.probes[m] = (schedule, sim, cost, need)
        return self.probes[m]

    def best_fitting(self, budget: int, cap_us: float | None) -> int | None:
        """The probed ``m`` whose replay fits ``budget`` (and the cap) with the least compute;
        among equals the largest (its plan leaves the blocks the most room)."""
        fitting = [
            (r[1].compute_us, -m) for m, r in self.probes.items()
            if r is not None and r[1].peak_bytes <= budget and (cap_us is None or r[1].compute_us <= cap_us)
        ]
        return -min(fitting)[1] if fitting else None

    def smallest_feasible(self) -> int | None:
        """The least ``m`` at which the DP has a plan."""
        row = self.table[0, self.chain.L - 1]
        finite = [m for m in range(self.slots + 1) if math.isfinite(row[m])]
        return finite[0] if finite else None

    def internal_budget(self, budget: int) -> int:
        return (budget - self.chain.fixed - self.chain.reserve) // self.unit

    def fastest_within(self, budget: int, deadline: float) -> list[tuple[Schedule, Simulation]]:
        """Probe the memory axis for plans whose replay fits ``budget``; every fitting one."""
        lo_ok = None
        start = max(0, min(self.internal_budget(budget), self.slots))
        first = self.probe(start)
        fits = lambda r: r is not None and r[1].peak_bytes <= budget  # noqa: E731
        hi_bad = None
        if fits(first):
            lo_ok = start
            hi_bad = self.slots + 1
        else:
            hi_bad = start
            lo = self.smallest_feasible()
            if lo is None or lo >= start:
                return [(r[0], r[1]) for r in self.probes.values() if fits(r)]
            lo_ok = None
            # step down until a plan fits
            step = max(1, (start - lo) // 8)
            m = start - step
            while m >= lo and time.perf_counter() < deadline and not self.ctx.stopped:
                r = self.probe(m)
                if fits(r):
                    lo_ok = m
                    break
                hi_bad = m
                m -= step
            if lo_ok is None:
                r = self.probe(lo)
                if fits(r):
                    lo_ok = lo
        if lo_ok is not None:
            # bisection for the largest fitting m (more memory: a faster plan)
            while hi_bad - lo_ok > 1 and time.perf_counter() < deadline and not self.ctx.stopped:
                mid = (lo_ok + hi_bad) // 2
                if fits(self.probe(mid)):
                    lo_ok = mid
                else:
                    hi_bad = mid
        return [(r[0], r[1]) for r in self.probes.values() if fits(r)]

    def plans(self, objective: str, budget: int | None, cap_us: float | None, deadline: float) -> list[tuple[Schedule, Simulation]]:
        """The plans the objective asks for, replayed: near the least peak (memory), the
        fastest within ``budget``, or the fastest of all (no budget)."""
        if objective == "memory":
            return self.least_peak(cap_us, deadline)
        if budget is not None:
            return self.fastest_within(budget, deadline)
        return [(r[0], r[1]) for r in [self.probe(self.slots)] if r is not None]

    def binding_blocks(self, objective: str, budget: int | None, cap_us: float | None) -> set[int]:
        """The blocks that bind the plan the objective picks: those whose option or
        re-runs change when the DP has one memory unit less (the lowest ``m`` within the
        cap for the memory objective, the fastest fitting probe for a budget). Options
        for these blocks at budgets between their options are what would let the plan go
        lower or faster; empty when there is no such pair of plans."""
        row = self.table[0, self.chain.L - 1]
        if objective == "memory":
            within = [m for m in range(self.slots + 1) if math.isfinite(row[m]) and (cap_us is None or row[m] <= cap_us + 1e-9)]
            m = within[0] if within else None
        else:
            m = self.best_fitting(budget, cap_us) if budget is not None else None
        if m is None or m < 1:
            return set()
        here, below = reconstruct(self.problem, self.table, m), reconstruct(self.problem, self.table, m - 1)
        if here is None or below is None:
            return set()
        a, b = self.chain.unroll(here), self.chain.unroll(below)
        changed = {j for j, (x, y) in enumerate(zip(a.options, b.options)) if x != y}
        changed |= {k for _, k, _ in set(a.reruns) ^ set(b.reruns)}
        return changed

    def least_peak(self, cap_us: float | None, deadline: float) -> list[tuple[Schedule, Simulation]]:
        """Plans near the DP's minimum memory (within the compute cap), replayed."""
        row = self.table[0, self.chain.L - 1]
        ok = [m for m in range(self.slots + 1) if math.isfinite(row[m]) and (cap_us is None or row[m] <= cap_us + 1e-9)]
        if not ok:
            return []
        lo = ok[0]
        for m in sorted(set([lo, lo + 1, lo + 2, lo + 4, lo + 8, lo + 16])):
            if time.perf_counter() > deadline or self.ctx.stopped:
                break
            self.probe(m)
        return [(r[0], r[1]) for r in self.probes.values() if r is not None]


def run_hybrid(network: Network, constraints: ResolvedConstraints, ctx: SearchContext, *, cache: MenuCache | None = None,
               prior: HybridRun | None = None, may_skip_blocks: bool = True, reach_limit: float | None = None) -> HybridRun:
    """The whole pipeline (see the module docstring); :func:`hybrid` wraps it as a method.

    ``prior``: a run of the same network under the same or narrower implementation pins:
    its block options join these menus and its schedule the candidates, so this run ends
    no worse than it (under the same budget and cap). ``may_skip_blocks``: whether the
    blocks may be skipped when their menus are out of reach and the eviction fits (a
    run whose menus seed a later one's keeps them). ``reach_limit``: the seconds that
    reach is judged by, when not this run's limit: a full search after the restricted
    one judges by the whole search's limit, not by what the restricted one left it (on a
    busy machine that one overran its share, and GoogLeNet's full search, left 30 s,
    skipped its 37 kinds of block and ended 27 % above the same search on a quiet one)."""
    begin = time.perf_counter()
    limit = ctx.time_limit or DEFAULT_TIME_LIMIT
    deadline = begin + 0.97 * limit  # the composition and the replay after the deadline fit in the rest
    options = ctx.options
    details: dict = {}
    objective = ctx.objective
    budget = constraints.memory_budget
    cap_us = _cap_us(constraints, ctx)
    watch = StallWatch(StopRule.from_options(options), begin)
    if watch.rule.tolerance > 0:
        watch.bound = simple_lower_bound(network, constraints, ctx, cheap=True)

    def report(phase: str, best: float | None = None, bound: float | None = None):
        watch.observe(best)
        if ctx.progress is not None:
            unit = "bytes" if objective == "memory" else "us"
            gap = None if best is None or bound is None else max(0.0, best - bound) / max(best, 1e-12)
            ctx.progress(ProgressInfo("hybrid", phase, time.perf_counter() - begin, best, bound, gap, unit))

    # 1. blocks ---------------------------------------------------------------------------
    target = int(options.get("target_ops", DEFAULT_TARGET_OPS))
    parts = decompose(network, target_ops=target)
    parts, nets = _block_nets(network, constraints, parts)
    kinds: dict[str, BlockNet] = {}
    for bn in nets:
        kinds.setdefault(bn.fingerprint, bn)
    details["blocks"] = len(parts.blocks)
    details["block_kinds"] = len(kinds)
    details["block_sizes"] = [b.size for b in parts.blocks]
    report("decomposed")
    # 2. menus ----------------------------------------------------------------------------
    cache = cache if cache is not None else DEFAULT_CACHE
    workers = int(options.get("workers", 1))  # >1: spawned processes (the caller needs a __main__ guard)
    stalling = watch.rule.stall_share != float("inf") and "menu_seconds" not in options
    menu_budget = float(options.get("menu_seconds", limit * MENU_SHARE))
    if stalling:  # a first share sized to the network; the rest while it pays (_complete_menus)
        menu_budget = min(menu_budget, max(FIRST_MENU_SECONDS, FIRST_MENU_SECONDS_PER_OP * len(network.forward_ops)))
    # the heuristics first: they set the DP's memory span, which composing during the
    # menus' completion needs; the menus' time is counted from when they start
    heuristics = _heuristics(network, constraints, ctx, None, heuristic_names(network), until=begin + HEURISTICS_SHARE * limit)
    details["heuristics"] = {name: {"peak": sim.peak_bytes, "compute": sim.compute_us} for name, _, sim in heuristics}
    store_peak = max((sim.peak_bytes for _, _, sim in heuristics), default=network.fixed_bytes)
    evicted = _evicted_store_all(network, constraints, ctx, heuristics, EVICTION_SHARE * limit, details)
    if evicted is not None:
        # a candidate, not yet the watched best: the block menus' completion stops when the
        # composed plans stop improving among themselves, not when they trail this start
        heuristics.append(evicted)
        if may_skip_blocks and menus_out_of_reach(len(kinds), reach_limit or limit):
            details["blocks_skipped"] = (f"{len(kinds)} kinds of block need {len(kinds) * MIN_SECONDS_PER_KIND:.0f} s or more"
                                         " for their menus; the eviction's schedule fits the constraints")
            return _without_blocks(network, constraints, ctx, heuristics, prior, details, deadline, watch, begin)
    fixed = network.fixed_bytes
    if objective == "memory" or budget is None:
        span = max(1, store_peak - fixed)
    else:
        span = max(1, min(int((budget - fixed) * 1.5), store_peak - fixed + (budget - fixed)))
    found: list[tuple[Schedule, Simulation]] = []
    t = time.perf_counter()
    details["setup_seconds"] = round(t - begin, 3)  # the heuristics, the eviction, the blocks: before any menu
    builds_before = cache.builds
    seeds = _prior_options(nets, prior, tuple(b.size for b in parts.blocks), details) if prior is not None else {}
    menus = build_menus(list(kinds.values()), time_budget=menu_budget, cache=cache, workers=workers, grid=int(options.get("grid", 2)),
                        seeds=seeds, stop=ctx.stop, until=_wall(min(deadline, t + MENU_SHARE_MAX * limit)))
    if seeds:  # menus found in the cache were built without them
        menus = _with_options(menus, seeds)

    def composed_value(menus) -> tuple[float | None, set[str]]:
        """The best value the chain DP composes from ``menus`` now (its plans join
        ``found``), and the kinds of the blocks that bind its plan (:meth:`_Search.binding_blocks`)."""
        if any(not menus[fp].options for fp in kinds):
            return None, set()
        search = _Search(network, ChainModel(network, parts, nets, menus), ctx, constraints, span)
        new = search.plans(objective, budget, cap_us, min(deadline, time.perf_counter() + max(1.0, 0.1 * (deadline - time.perf_counter()))))
        found.extend(new)
        binding = {nets[j].fingerprint for j in search.binding_blocks(objective, budget, cap_us)}
        return min((_value(sim, objective) for _, sim in new if sim.ok), default=None), binding

    if "menu_seconds" not in options and not ctx.stopped:
        menus = _complete_menus(kinds, menus, t + MENU_SHARE_MAX * limit, cache, workers, details,
                                (watch, composed_value) if stalling else None, stop=ctx.stop)
    details["menu_seconds"] = round(time.perf_counter() - t, 3)
    details["menus_built"] = cache.builds - builds_before
    empty = [bn.block.index for bn in nets if not menus[bn.fingerprint].options]
    if empty:
        raise SpecError(f"the hybrid engine found no way to run block {empty[0]} on its own; use --method milp or a heuristic")
    report("menus built")
    # 3-4. chain DP and composition, then targeted block solves and again ---------------
    refine_reserve = 0.3 if _fits_refinement(network, options) else 0.0
    rounds: list[dict] = []
    asked: set = set()
    max_rounds = int(options.get("rounds", 3))
    while True:
        chain = ChainModel(network, parts, nets, menus)
        search = _Search(network, chain, ctx, constraints, span)
        remaining = _left(ctx, deadline)
        # the first plan is always replayed; more probes only before the deadline
        new = search.plans(objective, budget, cap_us, min(deadline, time.perf_counter() + max(1.0, 0.5 * remaining * (1 - refine_reserve))))
        found += new
        best_m = search.best_fitting(budget, cap_us) if objective == "compute" and budget is not None else None
        rounds.append({
            "options": sum(len(o) for o in chain.options), "dp_seconds": round(search.dp_seconds, 3),
            "slots": search.slots, "unit_bytes": search.unit, "probes": len(search.probes),
            "best": None if best_m is None else search.probes[best_m][1].compute_us,
        })
        report("chain DP", None if best_m is None else search.probes[best_m][1].compute_us)
        if best_m is None or len(rounds) > max_rounds or ctx.stopped:
            break
        remaining = _left(ctx, deadline)
        if remaining * (1 - refine_reserve) < 1.0:
            break
        plan = reconstruct(search.problem, search.table, best_m)
        # the plan's room at the real budget (the DP's accounting is an upper bound, so
        # these fit), and at the calibrated m (which may fit too, and is faster)
        m_real = max(0, search.internal_budget(budget))
        requests = chain.targets(search.problem, plan, best_m, search.unit)
        if m_real < best_m:
            for fp, (bn, items) in chain.targets(search.problem, plan, m_real, search.unit).items():
                entry = requests.setdefault(fp, (bn, []))
                entry[1][:0] = [i for i in items if i not in entry[1]]
        fresh_requests = {}
        for fp, (bn, items) in requests.items():
            todo = [i for i in items if (fp, i) not in asked]
            asked.update((fp, i) for i in todo)
            if todo:
                fresh_requests[fp] = (bn, todo)
        rounds[-1]["requests"] = {fp[:8]: [list(i) for i in items] for fp, (_, items) in fresh_requests.items()}
        if not fresh_requests:
            break
        menus = extend_menus(fresh_requests, menus, time_budget=0.5 * remaining * (1 - refine_reserve), cache=cache, workers=workers,
                             stop=ctx.stop, until=_wall(deadline))
    if objective == "compute" and budget is not None and not any(sim.ok for _, sim in found):
        # nothing the DP composed fits: its least-peak plans say how much would, and start
        # the minimum-budget search (_finish, _no_schedule)
        found += search.least_peak(cap_us, deadline)
    details["dp"] = {"backend": options.get("dp_backend", DP_BACKEND), "rounds": rounds}
    details["menu_milp_solves"] = sum(menus[f].milp_solves for f in kinds)
    details["menu_options"] = sum(len(menus[f].options) for f in kinds)
    details["dp"]["last_probes"] = [
        {"m": m, "dp_compute": r[2], "dp_peak": chain.predicted_peak(r[3], search.unit), "peak": r[1].peak_bytes, "compute": r[1].compute_us}
        for m, r in sorted(search.probes.items()) if r is not None
    ]
    details["reserve_bytes"] = chain.reserve
    candidates = [("hybrid", s, sim) for s, sim in found] + [(name, s, sim) for name, s, sim in heuristics]
    candidates += _prior_candidate(network, constraints, ctx, prior)
    run = _pick(candidates, objective, budget, cap_us)
    report("composed", None if run is None else _value(run[2], objective))
    # 5. local search on the carry plan (moves across block boundaries the DP cannot make)
    enough = watch.good_enough()
    if run is not None and options.get("polish", True) and enough is not None:
        details["local_search"] = [{"skipped": enough}]
    elif run is not None and options.get("polish", True):
        starts = _starts(candidates, objective, budget, cap_us, POLISH_STARTS)
        details["local_search"] = []
        for k, start in enumerate(starts):
            share = (_left(ctx, deadline)) * (POLISH_SHARE if _fits_refinement(network, options) else 1.0) / (len(starts) - k)
            if share <= 0.2:
                break
            polished = improve(network, start[1], constraints, baseline_us=ctx.baseline_us, time_limit=share, objective=objective,
                               max_kicks=options.get("kicks"), stop=ctx.stop,
                               rule=StopRule.from_options(options, LOCAL_MIN_STALL_SECONDS))
            details["local_search"].append(_polish_record(start, polished, objective))
            if _value(polished.simulation, objective) < _value(run[2], objective) - 1e-9:
                run = (start[0] + "+local", polished.schedule, polished.simulation)
                candidates.append(run)
            watch.observe(_value(run[2], objective))
        report("local search", _value(run[2], objective))
    # 5-6. refinement, bounds --------------------------------------------------------------
    result = _finish(network, constraints, ctx, run, candidates, details, deadline, watch)
    details["seconds"] = round(time.perf_counter() - begin, 3)
    result.block_menus = [menus[bn.fingerprint] for bn in nets]
    result.block_sizes = tuple(b.size for b in parts.blocks)
    return result


def menus_out_of_reach(kinds: int, limit: float) -> bool:
    """Whether ``kinds`` kinds of block need more time for their first menus than the
    menus may take of ``limit`` seconds (then the blocks are skipped when the eviction's
    schedule fits)."""
    return kinds * MIN_SECONDS_PER_KIND > MENU_SHARE_MAX * limit


def block_kinds(network: Network, constraints: ResolvedConstraints, options: dict) -> int:
    """How many kinds of block (distinct sub-networks) the engine cuts ``network`` into."""
    parts = decompose(network, target_ops=int(options.get("target_ops", DEFAULT_TARGET_OPS)))
    return len({bn.fingerprint for bn in _block_nets(network, constraints, parts)[1]})


def _cap_us(constraints: ResolvedConstraints, ctx: SearchContext) -> float | None:
    """The compute the overhead cap allows, or None without a cap."""
    return None if constraints.max_overhead is None else (1 + constraints.max_overhead + 1e-12) * ctx.baseline_us


def _prior_candidate(network, constraints, ctx, prior: HybridRun | None) -> list:
    """``prior``'s schedule as a candidate (none without one)."""
    if prior is None or prior.schedule is None:
        return []
    return [("restricted " + prior.origin, prior.schedule,
             simulate(network, prior.schedule, constraints=constraints, baseline_us=ctx.baseline_us))]


def _polish_record(start, polished, objective: str) -> dict:
    """What one local search did (an entry of ``details["local_search"]``)."""
    return {"start": start[0], "from": _value(start[2], objective), "to": _value(polished.simulation, objective),
            "moves": len(polished.moves), "evaluations": polished.evaluations, "seconds": round(polished.seconds, 3),
            "stalled": polished.stalled}


def _without_blocks(network, constraints, ctx, heuristics, prior, details, deadline, watch: StallWatch, begin: float) -> HybridRun:
    """The search when the block menus are out of reach (too many kinds of block for the
    time) and the eviction's schedule fits: the best candidate, polished by the local
    search while it pays (the stall rule), then bounds as usual."""
    objective = ctx.objective
    budget, cap_us = constraints.memory_budget, _cap_us(constraints, ctx)
    candidates = list(heuristics) + _prior_candidate(network, constraints, ctx, prior)
    run = _pick(candidates, objective, budget, cap_us)
    details["local_search"] = []
    if run is not None:
        watch.observe(_value(run[2], objective))
    if run is not None and ctx.options.get("polish", True) and _left(ctx, deadline) > 0.2 and watch.good_enough() is None:
        polished = improve(network, run[1], constraints, baseline_us=ctx.baseline_us, time_limit=_left(ctx, deadline),
                           objective=objective, max_kicks=ctx.options.get("kicks"), stop=ctx.stop,
                           rule=StopRule.from_options(ctx.options, LOCAL_MIN_STALL_SECONDS))
        details["local_search"].append(_polish_record(run, polished, objective))
        if _value(polished.simulation, objective) < _value(run[2], objective) - 1e-9:
            run = (run[0] + "+local", polished.schedule, polished.simulation)
            candidates.append(run)
        watch.observe(_value(run[2], objective))
    result = _finish(network, constraints, ctx, run, candidates, details, deadline, watch)
    details["seconds"] = round(time.perf_counter() - begin, 3)
    return result


def _evicted_store_all(network, constraints, ctx, heuristics, time_limit: float, details: dict):
    """Store-all with the cheapest tensors around its peak evicted until it fits the
    budget (:mod:`..eviction`, HiGHS's cover), as a candidate ``(name, schedule,
    simulation)``, or None; with the memory objective, the lowest budget it fits within
    the overhead cap.

    Where long edges cross every cut the chain DP's checkpoints hold many tensors each, and
    this start is far better than the composed plans (1.3-1.4 % against 13 % on 1,000-node
    layered graphs at 0.8x the store-all peak, the optimum on 100-node ones; UNet's
    skips within 5 % of PyTorch's time: 6.39 GiB against 6.82 GiB); elsewhere it is one
    more start for the local search. For a budget with the compute objective, and for a
    cap with the memory objective."""
    found = evicted_candidate(network, constraints, ctx, heuristics, time_limit)
    if found is None:
        return None
    details["eviction"] = {"fits": found.simulation.ok, "peak": found.simulation.peak_bytes, "compute": found.simulation.compute_us,
                           "evicted": found.evicted, "restored": found.restored, "seconds": round(found.seconds, 3)}
    return ("eviction", found.schedule, found.simulation) if found.simulation.ok else None


def _prior_options(nets: list[BlockNet], prior: HybridRun, sizes: tuple[int, ...], details: dict) -> dict:
    """``prior``'s block options by this run's block fingerprints, when both runs cut the
    network the same way (the sub-networks are then the same, only the pins may differ,
    and the prior's are no wider, so its options are options here)."""
    if prior.block_sizes != sizes or len(prior.block_menus) != len(nets):
        details["prior_options"] = "the blocks differ"
        return {}
    seeds: dict = {}
    for bn, old in zip(nets, prior.block_menus):
        seeds.setdefault(bn.fingerprint, []).extend(old.options)
    details["prior_options"] = sum(len(o) for o in seeds.values())
    return seeds


def _with_options(menus: dict, seeds: dict) -> dict:
    """``menus`` with the ``seeds`` options added (the Pareto set of both)."""
    merged = dict(menus)
    for fp, extra in seeds.items():
        menu = merged[fp]
        merged[fp] = BlockMenu(menu.fingerprint, pareto(menu.options + extra), menu.milp_solves, menu.seconds, menu.proved,
                               menu.notes, menu.pending)
    return merged


def _complete_menus(kinds: dict, menus: dict, until: float, cache: MenuCache, workers: int, details: dict,
                    paying=None, stop=None) -> dict:
    """Solve the grid points the menus' first share did not reach, until ``until``.

    The points are the ones :func:`~.menus.build_menu` planned (budgets between each
    block's minimum and its fastest peak, keep caps), so this finishes the menus rather
    than widening them; targeted solves still follow the chain DP's plans.

    ``paying``: ``(watch, composed_value)``: the points are solved in slices, each followed
    by the chain DP on the menus so far (``composed_value(menus)``: the best value it
    composes, and the kinds of the blocks that bind its plan, whose points the next slice
    takes first: with 25 kinds of block, ResNet-50's menus on a busy machine ran out of
    time with 158 of 195 points left when taken in turn), and the completion stops when
    ``watch`` finds the best good enough, or when
    the composed value has stopped improving while the best is within
    :data:`FAR_FROM_BOUND` of the lower bound. The stall is counted in block MILP solves, not seconds
    (:func:`_menu_slice`): a busy machine solves fewer points a second, and a rule in
    seconds ended its menus after fewer points (ResNet-50 at a 9.3 % cap 6.3-6.5 GiB at
    load 5-7 against 5.90 GiB quiet); counted in solves, only ``until`` depends on speed."""
    pending = {fp: (bn, list(menus[fp].pending)) for fp, bn in kinds.items() if menus[fp].pending}
    details["menu_points_pending"] = sum(len(items) for _, items in pending.values())
    solves = lambda: sum(menus[fp].milp_solves for fp in kinds)  # noqa: E731 - the work clock
    if paying is not None:
        watch, composed_value = paying
        work = StallWatch(replace(watch.rule, min_stall_seconds=MIN_STALL_SOLVES_PER_KIND * len(kinds)), begin=0, clock=solves,
                          unit="block MILP solves")
        value, binding = composed_value(menus)
        watch.observe(value)
        work.observe(value)
    while pending and until - time.perf_counter() >= 1.0:
        enough = watch.good_enough() if paying is not None else None
        if enough is not None:
            details["menus_stopped"] = enough
            break
        left = until - time.perf_counter()
        if paying is None:
            menus = extend_menus(pending, menus, time_budget=left, cache=cache, workers=workers, stop=stop, until=_wall(until))
            break
        piece = _menu_slice(pending, max(len(pending), math.ceil(work.rule.stall_share * solves())), first=binding)
        menus = extend_menus(piece, menus, time_budget=left, cache=cache, workers=workers, stop=stop, until=_wall(until))
        if stop is not None and stop.is_set():
            break
        value, binding = composed_value(menus)
        watch.observe(value)
        work.observe(value)
        pending = {fp: (bn, list(menus[fp].pending)) for fp, bn in kinds.items() if menus[fp].pending}
        far = watch.bound is None or watch.best is None or watch.best > (1 + FAR_FROM_BOUND) * watch.bound
        why = None if far else work.reason()
        if why is not None:
            details["menus_stopped"] = why
            break
    details["menu_points_left"] = sum(len(menus[fp].pending) for fp in kinds)
    return menus


def _menu_slice(pending: dict, count: int, first=frozenset()) -> dict:
    """``count`` of the ``pending`` grid points as ``extend_menus`` requests: every point
    of the kinds in ``first`` before any other, and within each group taken in turn from
    each block kind (in the network's order, each kind's points in its menu's order)."""
    queues = {fp: list(items) for fp, (_, items) in pending.items()}
    taken: dict = {fp: [] for fp in queues}
    for group in ([fp for fp in queues if fp in first], [fp for fp in queues if fp not in first]):
        while count > 0 and any(queues[fp] for fp in group):
            for fp in group:
                if queues[fp] and count > 0:
                    taken[fp].append(queues[fp].pop(0))
                    count -= 1
    return {fp: (pending[fp][0], items) for fp, items in taken.items() if items}


def _value(sim: Simulation, objective: str) -> float:
    return float(sim.peak_bytes) if objective == "memory" else sim.compute_us


def _pick(candidates, objective: str, budget: int | None, cap_us: float | None):
    """The best candidate within the constraints, or None."""
    ok = [c for c in candidates if c[2].ok]
    if not ok:
        return None
    if objective == "memory":
        return min(ok, key=lambda c: (c[2].peak_bytes, c[2].compute_us, c[0] != "hybrid"))
    return min(ok, key=lambda c: (c[2].compute_us, c[2].peak_bytes, c[0] != "hybrid"))


def _starts(candidates, objective: str, budget, cap_us, count: int):
    """The best ``count`` fitting candidates with distinct values (the local search's starts)."""
    ok = [c for c in candidates if c[2].ok]
    ok.sort(key=lambda c: (_value(c[2], objective), c[0] != "hybrid"))
    starts, seen = [], set()
    for c in ok:
        v = round(_value(c[2], objective), 6)
        if v not in seen:
            seen.add(v)
            starts.append(c)
        if len(starts) == count:
            break
    return starts


def _fits_refinement(network: Network, options: dict) -> bool:
    if not options.get("refine", True):
        return False
    return len(network.forward_ops) <= int(options.get("refine_max_ops", REFINE_MAX_FORWARD_OPS))


class _StopRequest:
    """What the refinement MILP asks (``is_set()``, from HiGHS's callbacks, LP iterations
    included): stop when the caller asked to, or when ``watch`` says the search has
    stopped paying (the reason goes to ``info["stopped"]``)."""

    def __init__(self, ctx: SearchContext, watch: StallWatch, info: dict):
        self.ctx, self.watch, self.info = ctx, watch, info

    def is_set(self) -> bool:
        if self.ctx.stopped:
            return True
        why = self.watch.reason()
        if why is not None:
            self.info["stopped"] = why
        return why is not None


def _wall(instant: float) -> float:
    """The ``time.perf_counter()`` instant ``instant`` on the wall clock (``time.time()``),
    which the menus' worker processes share."""
    return time.time() + (instant - time.perf_counter())


def _left(ctx: SearchContext, deadline: float) -> float:
    """Seconds left before ``deadline``; none once the caller asked the search to stop."""
    return 0.0 if ctx.stopped else deadline - time.perf_counter()


def _finish(network, constraints, ctx, run, candidates, details, deadline, watch: StallWatch) -> HybridRun:
    objective = ctx.objective
    lower = simple_lower_bound(network, constraints, ctx)
    details["simple_lower_bound"] = lower
    floor = model = None
    refine = _fits_refinement(network, ctx.options)
    enough = None if run is None else watch.good_enough()
    if enough is not None:
        details["good_enough"] = enough
        refine = False
    if run is None and objective == "compute" and constraints.memory_budget is not None and refine and _left(ctx, deadline) > 0.5:
        run, floor, model = _least_peak_first(network, constraints, ctx, candidates, deadline, details)
        refine = not model.builder.conflicts and not (floor.exact and (floor.bytes is None or floor.bytes > constraints.memory_budget))
    refined = None
    if refine and _left(ctx, deadline) > 0.5:
        refined = _refine(network, constraints, ctx, run, deadline, details, watch, model=model)
    if run is None and refined is None:
        return _no_schedule(network, constraints, ctx, candidates, details, deadline, lower, floor)
    status = "feasible"
    if refined is not None and refined.get("schedule") is not None:
        sim = simulate(network, refined["schedule"], constraints=constraints, baseline_us=ctx.baseline_us)
        if sim.ok and (run is None or _value(sim, objective) < _value(run[2], objective) - 1e-9):
            run = ("hybrid+milp", refined["schedule"], sim)
    if refined is not None and refined.get("bound") is not None:
        lower = max(lower, refined["bound"])
        if refined.get("status") == "optimal":
            status = "optimal"
    if run is None:  # the refinement ran but found nothing either
        return _no_schedule(network, constraints, ctx, candidates, details, deadline, lower, floor)
    origin, schedule, sim = run
    value = _value(sim, objective)
    gap = max(0.0, value - lower) / max(value, 1e-12)
    if status == "optimal":
        gap = min(gap, details.get("refine", {}).get("gap", gap) or 0.0)
    message = f"best schedule from {origin}"
    if objective == "memory" and status != "optimal" and sim.peak_bytes <= lower:
        # the peak is that of a step every schedule runs (on VGG-16 a backward step of the
        # first layers, whose two gradients are 2.1 GiB each): no overhead left under the
        # cap can lower it
        status, gap = "optimal", 0.0
        message += "; the peak equals the lower bound, so it is minimal"
    details["origin"] = origin
    details["stopped"] = _why_stopped(status, details.get("refine"), deadline, details.get("good_enough"))
    message += f"; stopped: {details['stopped']}"
    hr = HybridRun(schedule, sim, origin, details, lower, gap, status, message)
    if objective == "memory":
        exact = status == "optimal"
        hr.min_feasible_budget = sim.peak_bytes
        hr.min_feasible_budget_exact = exact
        if not exact:
            hr.message += f"; not proved minimal (every schedule needs at least {human_bytes(int(lower))})"
    return hr


def _why_stopped(status: str, refine: dict | None, deadline: float, good_enough: str | None = None) -> str:
    """Why the search ended, in words (``details["stopped"]``)."""
    if status == "optimal":
        return "proved optimal"
    if good_enough is not None:
        return good_enough
    if refine is not None and refine.get("stopped"):
        return refine["stopped"]
    if time.perf_counter() >= deadline:
        return "time limit"
    if refine is None:
        return "every phase done (the network is too large for the refinement MILP)"
    return f"refinement MILP ended ({refine.get('status')})"


def simple_lower_bound(network: Network, constraints: ResolvedConstraints, ctx: SearchContext, cheap: bool = False) -> float:
    """A lower bound every schedule obeys, cheap on any graph: the least peak of the most
    demanding step (memory objective), or every op once at its fastest, raised on plain
    networks by the recomputation the budget forces (compute; not with ``cheap``: that
    takes a search of its own)."""
    allowed = constraints.allowed_impls
    if ctx.objective == "memory":
        return float(peak_lower_bound(network, allowed))
    lower = compute_lower_bound(network, allowed)
    if cheap:
        return lower
    within = compute_lower_bound_within(network, constraints, baseline_us=ctx.baseline_us)
    return lower if within is None else max(lower, within)


def _refinement_model(network, constraints, ctx):
    budget = constraints.memory_budget
    return build_model(
        network, constraints, objective=ctx.objective, memory_budget=budget if ctx.objective == "compute" else None,
        max_overhead=constraints.max_overhead, baseline_us=ctx.baseline_us,
    )


def _least_peak_first(network, constraints, ctx, candidates, deadline, details):
    """Nothing found so far fits the budget: look for the least peak first (the whole
    network's MILP with the memory objective, started from the least-peak candidates).

    A compute-objective MILP at a tight budget starts without an incumbent and can spend
    all its time finding none (a 25-op ResNet at its reported minimum budget did, for
    60 s); the memory objective always holds one, and its schedule either fits the budget
    (the result, and the refinement's MIP start) or says how far off the budget is. Gets
    half the time left, all of it when the budget is below a step every schedule runs.
    Returns ``(run or None, the minimum-budget search, the refinement's model)``."""
    model = _refinement_model(network, constraints, ctx)
    share = 1.0 if model.builder.conflicts else FLOOR_SHARE
    left = _left(ctx, deadline)
    floor = minimum_budget(network, without_budget(constraints), ctx, time_limit=max(0.5, share * left), label="hybrid", candidates=list(candidates))
    info = {"peak": floor.bytes, "exact": floor.exact, "lower_bound": floor.lower_bound, "seconds": round(floor.seconds, 3)}
    details["least_peak_first"] = info
    run = None
    if floor.schedule is not None:
        sim = simulate(network, floor.schedule, constraints=constraints, baseline_us=ctx.baseline_us)
        info["fits"] = sim.ok
        if sim.ok:
            run = ("milp least peak", floor.schedule, sim)
            candidates.append(run)
    return run, floor, model


def _refine(network, constraints, ctx, run, deadline, details, watch: StallWatch, model=None) -> dict | None:
    """The whole network's MILP, warm-started from the best schedule so far, until it
    proves its result, the deadline, or ``watch`` says the search has stopped paying."""
    objective = ctx.objective
    t = time.perf_counter()
    if model is None:
        model = _refinement_model(network, constraints, ctx)
    info: dict = {"model": model.stats}
    details["refine"] = info
    if model.builder.conflicts:
        info["status"] = "infeasible"
        return None
    start = _start_for(model, [run]) if run is not None else None
    left = _left(ctx, deadline)
    if left <= 0.2:
        info["status"] = "no time"
        return None
    gap = 0.0 if objective == "memory" else ctx.options.get("gap", 1e-4)
    in_bytes = (lambda v: None if v is None else model.fixed_bytes + v * MIB) if objective == "memory" else (lambda v: v)

    # the MILP's own stall clock, from now: the phases before it cannot make its moves
    own = StallWatch(StopRule.from_options(ctx.options, EXACT_MIN_STALL_SECONDS), bound=watch.bound)
    own.observe(None if run is None else _value(run[2], objective))

    def observe(elapsed, incumbent, bound, _gap) -> None:  # HiGHS reports many times a second
        watch.observe(in_bytes(incumbent))
        own.observe(in_bytes(incumbent))
        if ctx.progress is not None:
            best, low = watch.best, in_bytes(bound)
            gap_now = None if best is None or low is None else max(0.0, best - low) / max(best, 1e-12)
            ctx.progress(ProgressInfo("hybrid", "refinement MILP", time.perf_counter() - watch.begin, best, low, gap_now,
                                      "bytes" if objective == "memory" else "us"))

    stop = _StopRequest(ctx, own, info)

    milp = run_highs(
        model.builder, time_limit=left, rel_gap=gap, abs_gap=0.25 / MIB if objective == "memory" else 1e-6,
        start=None if start is None else start[1], backend="highspy", progress=observe, stop=stop,
    )
    info.update(status=milp.status, seconds=round(time.perf_counter() - t, 3), warm_start=start is not None, nodes=milp.nodes)
    bound = milp.bound
    if bound is not None and objective == "memory":
        bound = model.fixed_bytes + bound * MIB
    result = {"status": milp.status, "bound": bound}
    if milp.x is not None:
        decisions = decisions_from_solution(model, milp.x)
        result["schedule"] = decode(model, decisions, spec_path=ctx.spec_path, fingerprint=ctx.fingerprint)
    if milp.gap is not None:
        info["gap"] = milp.gap
    if milp.status == "optimal":
        info["gap"] = 0.0
    return result


def _no_schedule(network, constraints, ctx, candidates, details, deadline, lower, floor=None) -> HybridRun:
    """Nothing fits: say how much memory would, honestly (``floor``: the minimum-budget
    search already run, or None to run one in the time left)."""
    budget = constraints.memory_budget
    cap = constraints.max_overhead
    best = least_peak_within(network, constraints, candidates, ctx.baseline_us)  # every constraint but the budget
    peak_lb = peak_lower_bound(network, constraints.allowed_impls)
    hr = HybridRun(None, None, "none", details, None, None, "infeasible")
    exact = False
    known = best[2].peak_bytes if best is not None else None
    known_schedule = best[1] if best is not None else None
    found = floor
    if found is None and _fits_refinement(network, ctx.options) and _left(ctx, deadline) > 0.5:
        found = minimum_budget(network, without_budget(constraints), ctx, time_limit=max(0.5, _left(ctx, deadline)), label="hybrid",
                               candidates=list(candidates))
    if found is not None:
        if found.bytes is not None and (known is None or found.bytes <= known):
            known, exact, known_schedule = found.bytes, found.exact, found.schedule
        if found.lower_bound is not None:
            peak_lb = max(peak_lb, found.lower_bound)
    proved = budget is not None and budget < peak_lb
    what = f"no schedule fits the budget {human_bytes(budget)} ({budget} B)" if budget is not None else "no schedule fits"
    if cap is not None:
        what += f" within the overhead cap {cap:.2%}"
    if proved:
        what += f" (proved: every schedule needs at least {human_bytes(peak_lb)})"
    if known is not None and exact:
        what += f"; the minimum feasible budget is exactly {human_bytes(known)} ({known} B)"
    elif known is not None:
        what += not_proved_minimum(known, None if proved else peak_lb)
    hr.message = what
    hr.min_feasible_budget = known
    hr.min_feasible_budget_exact = exact
    hr.min_budget_schedule = known_schedule
    details["min_budget_lower_bound"] = peak_lb
    return hr


def _exact_first(network: Network, constraints: ResolvedConstraints, ctx: SearchContext) -> MethodOutcome | None:
    """The whole network's MILP within :data:`EXACT_FIRST_SHARE` of the time, with the
    memory objective on a network the refinement fits; None otherwise or when it finds no
    schedule."""
    given = ctx.options.get("exact_first")
    if given is None and not any(is_segment(op) for op in network.forward_ops):
        return None  # block menus see every op's choices themselves; the MILP first would cost small plans its share
    share = float(EXACT_FIRST_SHARE if given is None else given)
    if ctx.objective != "memory" or share <= 0 or not _fits_refinement(network, ctx.options):
        return None
    begin = time.perf_counter()
    outcome = solve_joint(network, constraints, replace(ctx, time_limit=share * (ctx.time_limit or DEFAULT_TIME_LIMIT)),
                          label="hybrid")
    if outcome.schedule is None:
        return None
    record = {"status": outcome.status, "seconds": round(time.perf_counter() - begin, 3)}
    outcome.details = {**outcome.details, "exact_first": record, "origin": "milp (whole network, first)",
                       "stopped": "proved optimal" if outcome.status == "optimal" else "time limit"}
    return outcome


def _lower_peak(network: Network, constraints: ResolvedConstraints, ctx: SearchContext, exact: MethodOutcome,
                hr: HybridRun) -> HybridRun:
    """``hr``, or the exact MILP's schedule when it peaks lower (both replayed)."""
    sim = simulate(network, exact.schedule, constraints=constraints, baseline_us=ctx.baseline_us)
    record = {**exact.details["exact_first"], "peak": sim.peak_bytes, "compute": sim.compute_us}
    mine = hr.simulation
    if sim.ok and (mine is None or not mine.ok or (sim.peak_bytes, sim.compute_us) < (mine.peak_bytes, mine.compute_us)):
        lower = max(hr.lower_bound or 0.0, exact.lower_bound or 0.0)
        gap = max(0.0, sim.peak_bytes - lower) / max(sim.peak_bytes, 1)
        message = f"best schedule from the whole network's MILP (run first); {hr.message.partition('; ')[2]}"
        hr = HybridRun(exact.schedule, sim, "milp (whole network, first)", {**hr.details, "origin": "milp (whole network, first)"},
                       lower, gap, "feasible", message)
        hr.min_feasible_budget, hr.min_feasible_budget_exact = sim.peak_bytes, False
    hr.details["exact_first"] = record
    return hr


def hybrid(network: Network, constraints: ResolvedConstraints, ctx: SearchContext) -> MethodOutcome:
    """The hybrid engine as a searching method (``--method hybrid``)."""
    target = int(ctx.options.get("target_ops", DEFAULT_TARGET_OPS))
    if len(decompose(network, target_ops=target).blocks) == 1:
        # nothing to join: the one block is the whole network, which the MILP solves exactly
        outcome = solve_joint(network, constraints, ctx, label="hybrid")
        outcome.details = {**outcome.details, "blocks": 1, "block_kinds": 1, "origin": "milp (the network is one block)",
                           "stopped": "proved optimal" if outcome.status == "optimal" else outcome.status.replace("_", " ")}
        return outcome
    from .portfolio import restricted_first  # the portfolio runs this module's pipeline

    limit, sized = sized_time_limit(network, ctx.time_limit, ctx.options, refines=_fits_refinement(network, ctx.options))
    ctx = replace(ctx, time_limit=limit)
    exact = _exact_first(network, constraints, ctx)
    if exact is not None and exact.status == "optimal":
        return exact
    if exact is not None:  # the MILP searched every implementation: the rest goes to the pipeline itself
        left = max(0.5, limit - exact.details["exact_first"]["seconds"])
        ctx = replace(ctx, time_limit=left, options={**ctx.options, "restricted_share": 0})
    hr = restricted_first(network, constraints, ctx, short=sized is not None)
    if exact is not None:
        hr = _lower_peak(network, constraints, ctx, exact, hr)
    details = dict(hr.details)
    if sized is not None:
        details["time_limit"] = limit
        if details.get("stopped") == "time limit":  # say which limit: the caller gave none
            details["stopped"] = sized
            hr.message = hr.message.replace("stopped: time limit", f"stopped: {sized}")
    if hr.schedule is None:
        outcome = MethodOutcome(None, hr.status, hr.message, details=details)
        outcome.min_feasible_budget = hr.min_feasible_budget
        outcome.min_feasible_budget_exact = hr.min_feasible_budget_exact
        outcome.min_budget_schedule = hr.min_budget_schedule
        return outcome
    outcome = MethodOutcome(hr.schedule, hr.status, hr.message, hr.lower_bound, hr.gap, details=details)
    outcome.min_feasible_budget = hr.min_feasible_budget
    outcome.min_feasible_budget_exact = hr.min_feasible_budget_exact
    return outcome
