"""Block menus: a Pareto set of ways to run one block, each from the exact engine.

An *option* of a block is a complete schedule of its sub-network (:mod:`.subnet`):
implementations, what the forward pass keeps, what each backward stage recomputes. The
chain DP (:mod:`.chain_dp`) combines one option per block; what it needs to know of an
option is measured by replaying the option's schedule in the simulator on the
sub-network:

* ``saved``: bytes the block keeps from its forward pass to its backward pass (besides
  its outputs, which the next block's checkpoint accounts for): what the block holds
  across the block boundary while later blocks run;
* ``fwd_peak`` / ``bwd_peak``: the highest memory inside the block's forward pass and
  inside its backward stages (the block's inputs included, fixed memory excluded);
* times: the forward pass, a re-run of the forward (recompute times of the ops needed),
  and the backward stages (recomputations included);
* ``fresh``: the option keeps nothing from the forward but tensors that cannot be
  recomputed (saved statistics, dropout seeds): its backward can start from the block's
  inputs alone, right after the inputs have been recomputed.

Options come from the joint MILP of :mod:`..milp` restricted to the block, at a grid of
peak budgets between the block's minimum (itself a MILP) and the peak of its fastest
schedule, with and without a cap on what the forward keeps (``fresh`` is the cap 0), plus
the cheap heuristics of :mod:`..baselines` as a floor. Dominated options are dropped.
Menus depend only on the block's :attr:`~.subnet.BlockNet.fingerprint`, so identical
blocks are solved once, and :class:`MenuCache` keeps them for later solves in the
process. Menus of different kinds are built in parallel processes when asked.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
import multiprocessing

from ...graph import index, storage_root
from ...ir import Network, Schedule
from ..baselines import recompute_all, store_all
from ..chen import chen_greedy
from ..impl_choice import cheapest_impls, no_recompute_compute_us
from ..milp.codec import decisions_from_solution, decode
from ..milp.engine import _start_for
from ..milp.highs import run_highs
from ..milp.model import MIB, build_model
from ..revolve import revolve
from ..simulator import chosen_impls, simulate
from .compose import forward_closure, sticky_tensors
from .subnet import SINK, SOURCE, SOURCE_VIEWS, BlockNet

__all__ = ["MIN_SECONDS_PER_KIND", "LEAST_PEAK_REQUEST", "Option", "BlockMenu", "MenuCache", "build_menu", "build_menus", "extend_menu", "extend_menus", "evaluate_option", "option_schedule", "pareto"]

#: keep caps (fractions of what the block's fastest option keeps) of the menu grid
SAVED_FRACTIONS = (0.75, 0.5, 0.35, 0.2, 0.1)
#: the least time a block kind's first menu gets, whatever the share (one small MILP
#: and the heuristics): with many kinds the first menus take at least this many seconds each
MIN_SECONDS_PER_KIND = 0.5
#: relative gap of the menu MILPs: an option 0.1 % slower than optimal is as good
MENU_GAP = 1e-3
#: the pending request to solve a block's least peak again: its first solve ran out of
#: time unproved (on a busy machine VGG-16's first block kept 6.48 GiB, its least peak is
#: 4.31 GiB), and every grid budget lies above what it found
LEAST_PEAK_REQUEST = ("least peak", None, False)


@dataclass(frozen=True)
class Option:
    """One way to run a block (local names of its sub-network); see the module docstring."""

    impls: tuple[tuple[str, str], ...]
    keep: frozenset[str]
    recomputes: tuple[tuple[str, ...], ...]  # per backward op of the block, in order
    saved: int
    fwd_peak: int
    fwd_time: float
    bwd_peak: int
    bwd_time: float
    reforward_ops: tuple[str, ...]
    reforward_time: float
    sticky: frozenset[str]
    sticky_bytes: int
    none_peak: int  # forward pass keeping only the sticky tensors (the "discard" forward)
    none_reforward_ops: tuple[str, ...]
    none_reforward_time: float
    fresh: bool
    origin: str

    @property
    def impl_map(self) -> dict[str, str]:
        return dict(self.impls)

    def key(self) -> tuple:
        return (self.impls, self.keep, self.recomputes)


@dataclass
class BlockMenu:
    """The options of one block kind, and what building them cost."""

    fingerprint: str
    options: list[Option]
    milp_solves: int = 0
    seconds: float = 0.0
    proved: int = 0  # MILP solves that ended optimal
    notes: list[str] = field(default_factory=list)
    #: grid points (budget, saved cap, fresh) the time budget did not reach: the engine
    #: gives them more time when it has some (:func:`extend_menu` solves them)
    pending: list[tuple[int | None, int | None, bool]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every grid point of the menu was solved."""
        return not self.pending

    @property
    def fresh(self) -> list[Option]:
        return [o for o in self.options if o.fresh]


def _storage_bytes(network: Network, names) -> int:
    roots = {storage_root(network, n) for n in names}
    return sum(network.tensors[r].storage_bytes for r in roots if not network.tensors[r].is_fixed)


def evaluate_option(bn: BlockNet, schedule: Schedule, origin: str) -> Option | None:
    """Replay ``schedule`` on the block's sub-network and describe it as an option.

    Returns None when the schedule is invalid, breaks the block's constraints, or
    recomputes in the sink's stage (which has no counterpart in the whole network).
    """
    net = bn.network
    cons = bn.constraints()
    sim = simulate(net, schedule, constraints=cons)
    if not sim.ok:
        return None
    if schedule.stages[0].recompute or schedule.stages[-1].recompute:
        return None
    idx = index(net)
    fixed = net.fixed_bytes
    fwd = [s for s in sim.steps if s.stage == 0]
    bwd = [s for s in sim.steps if s.stage >= 1]
    impls = chosen_impls(net, schedule)
    block_ops = bn.block_ops
    inputs = set(bn.inputs)
    outputs = set(idx.forward_ops[SINK].inputs)
    keep = frozenset(t for t in schedule.forward_keep if t not in inputs and t not in net.outputs)
    sticky = frozenset(sticky_tensors(net, impls, block_ops))
    fresh = keep <= (sticky | bn.keep)
    reforward = forward_closure(net, impls, outputs | keep, block_ops)
    none_reforward = forward_closure(net, impls, outputs, block_ops)
    rtime = lambda ops: math.fsum(idx.forward_ops[o].impl(impls[o]).effective_recompute_time_us for o in ops)  # noqa: E731
    none_peak = _none_peak(bn, impls, sticky)
    if none_peak is None:
        return None
    return Option(
        impls=tuple(sorted((k, v) for k, v in impls.items() if k not in (SOURCE, SOURCE_VIEWS, SINK) and not k.startswith(("src.", "sink.")))),
        keep=keep,
        recomputes=tuple(tuple(st.recompute) for st in schedule.stages[1:-1]),
        saved=_storage_bytes(net, keep - outputs),
        fwd_peak=max(s.peak for s in fwd) - fixed,
        fwd_time=math.fsum(s.time_us for s in fwd),
        bwd_peak=max((s.peak for s in bwd), default=fixed) - fixed,
        bwd_time=math.fsum(s.time_us for s in bwd),
        reforward_ops=reforward,
        reforward_time=rtime(reforward),
        sticky=sticky,
        sticky_bytes=_storage_bytes(net, sticky),
        none_peak=none_peak,
        none_reforward_ops=none_reforward,
        none_reforward_time=rtime(none_reforward),
        fresh=fresh,
        origin=origin,
    )


def _none_peak(bn: BlockNet, impls: dict[str, str], sticky) -> int | None:
    """Peak of the block's forward pass when it keeps only ``sticky`` (Rotor's F-empty)."""
    from ..schedule_builder import build_schedule

    net = bn.network
    choices = {k: v for k, v in impls.items() if len(net.op(k).impls) > 1}
    schedule = build_schedule(
        net, choices, forward_keep=set(sticky) | set(bn.inputs), never_recompute=bn.never, pinned=bn.keep,
        spec_path="block", fingerprint="0",
    )
    sim = simulate(net, schedule)
    if not sim.valid:
        return None
    return max(s.peak for s in sim.steps if s.stage == 0) - net.fixed_bytes


def _dominates(a: Option, b: Option) -> bool:
    ta = (a.saved, a.fwd_peak, a.bwd_peak, a.fwd_time, a.reforward_time, a.bwd_time, -int(a.fresh))
    tb = (b.saved, b.fwd_peak, b.bwd_peak, b.fwd_time, b.reforward_time, b.bwd_time, -int(b.fresh))
    return all(x <= y + 1e-9 for x, y in zip(ta, tb)) and (ta != tb or a.key() < b.key())


def pareto(options: list[Option]) -> list[Option]:
    """Options no other option beats on every measure (the ties broken by a fixed key)."""
    unique = {}
    for o in options:
        unique.setdefault(o.key(), o)
    items = list(unique.values())
    kept = [o for o in items if not any(_dominates(p, o) for p in items if p is not o)]
    return sorted(kept, key=lambda o: (o.saved, o.bwd_peak, o.bwd_time))


class _Solver:
    """The block MILP at a given budget / keep cap, warm-started from known schedules."""

    def __init__(self, bn: BlockNet, deadline: float, per_solve: float, stop=None):
        self.bn = bn
        self.stop = stop  # anything with is_set(): the caller's request to stop (Ctrl-C)
        self.net = bn.network
        self.cons = bn.constraints()
        self.deadline = deadline
        self.per_solve = per_solve
        self.baseline = no_recompute_compute_us(self.net, cheapest_impls(self.net, self.cons.allowed_impls))
        self.solves = 0
        self.proved = 0
        self.known: list[tuple[str, Schedule, object]] = []  # (name, schedule, simulation): MIP starts
        self.sticky = frozenset(self._sticky())
        self.outputs = frozenset(index(self.net).forward_ops[SINK].inputs)

    def _sticky(self) -> set[str]:
        """Tensors a fresh option may still keep: what recomputations read back (any impl)."""
        net = self.net
        idx = index(net)
        result = set(self.bn.keep)
        for name in self.bn.block_ops:
            op = idx.forward_ops[name]
            for impl in op.impls:
                for r in impl.recompute_reads:
                    if idx.producing_op(r) in self.bn.block_ops:
                        result.add(r)
        return result

    def remember(self, name: str, schedule: Schedule) -> None:
        sim = simulate(self.net, schedule, constraints=self.cons)
        if sim.ok:
            self.known.append((name, schedule, sim))

    def time_left(self) -> float:
        if self.stop is not None and self.stop.is_set():
            return 0.0
        return self.deadline - time.perf_counter()

    def solve(self, objective: str, budget: int | None = None, cap: int | None = None, fresh: bool = False) -> tuple[Schedule | None, str, float | None]:
        """(schedule, solver status, objective value in bytes or us) or (None, why, None).

        ``cap``: bytes the forward pass may keep besides the block's outputs (``saved``);
        ``fresh``: keep nothing but what recomputations read back."""
        left = self.time_left()
        if left <= 0.05:
            return None, "no time", None
        if fresh:
            cap, exempt = 0, self.sticky
        else:
            exempt = self.sticky | self.outputs
        model = build_model(
            self.net, self.cons, objective=objective, memory_budget=budget, baseline_us=self.baseline,
            no_recompute_stages={1}, forward_keep_cap=cap, forward_keep_exempt=exempt if cap is not None else frozenset(),
        )
        if model.builder.conflicts:
            return None, "infeasible", None
        fitting = [k for k in self.known if budget is None or k[2].peak_bytes <= budget]
        start = _start_for(model, fitting) if fitting else None
        gap = 0.0 if objective == "memory" else MENU_GAP
        run = run_highs(
            model.builder, time_limit=min(self.per_solve, left), rel_gap=gap,
            abs_gap=0.25 / MIB if objective == "memory" else 1e-6, start=None if start is None else start[1], stop=self.stop,
        )
        self.solves += 1
        if run.status == "optimal":
            self.proved += 1
        if run.x is None:
            return None, run.status, None
        decisions = decisions_from_solution(model, run.x)
        schedule = decode(model, decisions, spec_path="block", fingerprint="0")
        value = None if run.objective is None else (model.fixed_bytes + run.objective * MIB if objective == "memory" else run.objective)
        self.remember(f"milp {objective}", schedule)
        return schedule, run.status, value


def _heuristic_schedules(bn: BlockNet, quick: bool = False) -> list[tuple[str, Schedule]]:
    """The block's heuristic schedules; ``quick``: only store-all and recompute-all (a
    menu with no time left still needs an option that keeps and one that keeps nothing)."""
    cons = bn.constraints()
    found = []
    methods = (("store-all", store_all), ("recompute-all", recompute_all), ("chen-greedy", chen_greedy), ("revolve", revolve))
    for name, method in methods[:2] if quick else methods:
        try:
            found.append((name, method(bn.network, cons, spec_path="block", fingerprint="0")))
        except Exception:  # noqa: BLE001 - a heuristic that cannot handle the block is skipped
            continue
    return found


def option_schedule(bn: BlockNet, option: Option) -> Schedule:
    """The sub-network schedule an option describes (carries by liveness)."""
    from .compose import schedule_from_recomputes

    lists = [(), *option.recomputes, ()]
    return schedule_from_recomputes(bn.network, option.impl_map, lists, spec_path="block", fingerprint="0")


def build_menu(bn: BlockNet, *, time_budget: float = 10.0, per_solve: float = 4.0, grid: int = 2, seeds=(), stop=None) -> BlockMenu:
    """The menu of one block kind within ``time_budget`` seconds (see the module docstring).

    ``grid`` is the number of intermediate peak budgets between the block's minimum and
    the peak of its fastest schedule (for stored and for fresh options); the engine adds
    options at the budgets its plans actually give each block (:func:`extend_menu`).
    ``seeds``: options known already (of the same sub-network under pins no wider than
    this block's): they join the menu and warm-start every MILP solve.
    """
    begin = time.perf_counter()
    solver = _Solver(bn, begin + time_budget, per_solve, stop)
    options: list[Option] = list(seeds)
    quick = time_budget <= 0  # the search's time is spent: the two options every menu needs, no MILP
    for option in () if quick else seeds:
        solver.remember(option.origin, option_schedule(bn, option))
    notes: list[str] = []

    def add(schedule: Schedule | None, origin: str) -> Option | None:
        if schedule is None:
            return None
        option = evaluate_option(bn, schedule, origin)
        if option is not None:
            options.append(option)
        return option

    for name, schedule in _heuristic_schedules(bn, quick):
        if not quick:
            solver.remember(name, schedule)
        add(schedule, name)
    fastest = min((o for o in options), key=lambda o: (o.fwd_time + o.bwd_time, o.bwd_peak), default=None)
    fixed = bn.network.fixed_bytes
    plans: list[tuple[str, int | None, int | None, bool]] = []
    low, status, _ = solver.solve("memory")
    low_opt = add(low, "milp min-memory")
    retry_least_peak = status != "optimal" and status != "infeasible"
    if low_opt is None:
        notes.append(f"minimum-memory MILP: {status}")
    if not bn.pinned:
        ff = add(solver.solve("compute", None, fresh=True)[0], "milp fresh fastest")
        fl = add(solver.solve("memory", None, fresh=True)[0], "milp fresh min-memory")
        if ff is not None and fl is not None:
            lo_f = fixed + max(fl.fwd_peak, fl.bwd_peak)
            hi_f = fixed + max(ff.fwd_peak, ff.bwd_peak)
            plans.append(("milp fresh fastest at min peak", lo_f, None, True))
            plans += [(f"milp fresh peak<={b}", b, None, True) for b in _between(lo_f, hi_f, grid)]
    if low_opt is not None and fastest is not None:
        lo_peak = fixed + max(low_opt.fwd_peak, low_opt.bwd_peak)
        hi_peak = fixed + max(fastest.fwd_peak, fastest.bwd_peak)
        plans.insert(0, ("milp fastest at min peak", lo_peak, None, False))
        plans += [(f"milp peak<={b}", b, None, False) for b in _between(lo_peak, hi_peak, grid)]
        # options that keep less across the block than its fastest one: the chain DP
        # trades what a block holds during the inner calls against re-running it, and
        # selective keeps (a convolution's output, not the cheap ops after it) live here
        for frac in SAVED_FRACTIONS:
            cap = int(max(fastest.saved, 1) * frac)
            plans.append((f"milp saved<={cap}", hi_peak, cap, False))
    pending: list[tuple[int | None, int | None, bool]] = []
    for k, (origin, budget, cap, fresh) in enumerate(plans):
        if solver.time_left() <= 0.05:
            notes.append("time budget spent before every grid point was solved")
            pending = [(b, c, f) for _, b, c, f in plans[k:]]
            break
        add(solver.solve("compute", budget, cap, fresh)[0], origin)
    if retry_least_peak:
        pending.insert(0, LEAST_PEAK_REQUEST)
    return BlockMenu(bn.fingerprint, pareto(options), solver.solves, time.perf_counter() - begin, solver.proved, notes, pending)


def _between(lo: int, hi: int, count: int) -> list[int]:
    return [int(lo + (k + 1) / (count + 1) * (hi - lo)) for k in range(count)]


def extend_menu(bn: BlockNet, menu: BlockMenu, requests, *, time_budget: float, per_solve: float = 4.0, stop=None) -> BlockMenu:
    """``menu`` plus the fastest option at each requested (budget, saved cap, fresh).

    The engine asks for the budgets that its current plan leaves each block; the known
    options warm-start every solve, so the new option is never worse than them."""
    begin = time.perf_counter()
    solver = _Solver(bn, begin + time_budget, per_solve, stop)
    for option in menu.options:
        solver.remember(option.origin, option_schedule(bn, option))
    options = list(menu.options)
    attempted = set()
    queue = list(requests)
    while queue:
        if solver.time_left() <= 0.05:
            break
        request = queue.pop(0)
        attempted.add(request)
        if request == LEAST_PEAK_REQUEST:
            queue[:0] = _least_peak_again(bn, solver, options)
            continue
        budget, cap, fresh = request
        schedule = solver.solve("compute", budget, cap, fresh)[0]
        if schedule is not None:
            kind = "grid" if (budget, cap, fresh) in menu.pending else "targeted"
            option = evaluate_option(bn, schedule, f"milp {kind} peak<={budget}" + (" fresh" if fresh else f" saved<={cap}" if cap is not None else ""))
            if option is not None:
                options.append(option)
    return BlockMenu(
        bn.fingerprint, pareto(options), menu.milp_solves + solver.solves, menu.seconds + time.perf_counter() - begin,
        menu.proved + solver.proved, menu.notes, [r for r in menu.pending if r not in attempted],
    )


def _least_peak_again(bn: BlockNet, solver: _Solver, options: list[Option]) -> list:
    """Solve the block's least peak again (warm-started from every known option); when it
    is below the menu's lowest option, the option joins ``options`` and the grid points
    below the old lowest peak are returned as more requests (the fastest option at the new
    least peak, and one between)."""
    fixed = bn.network.fixed_bytes
    lowest = min((fixed + max(o.fwd_peak, o.bwd_peak) for o in options), default=None)
    schedule = solver.solve("memory")[0]
    option = None if schedule is None else evaluate_option(bn, schedule, "milp min-memory")
    if option is None:
        return []
    options.append(option)
    low = fixed + max(option.fwd_peak, option.bwd_peak)
    if lowest is None or low >= lowest:
        return []
    return [(low, None, False)] + [(b, None, False) for b in _between(low, lowest, 1)]


class MenuCache:
    """Menus by block fingerprint, kept for the life of the process."""

    def __init__(self):
        self.menus: dict[str, BlockMenu] = {}
        self.builds = 0  # menus built (not found in the cache)

    def get(self, fingerprint: str) -> BlockMenu | None:
        return self.menus.get(fingerprint)

    def put(self, menu: BlockMenu) -> None:
        self.menus[menu.fingerprint] = menu


#: the process-wide cache used when the caller passes none
DEFAULT_CACHE = MenuCache()


def _within(budget: float, until: float | None) -> float:
    """``budget`` seconds, or fewer when the wall-clock instant ``until`` (``time.time()``,
    the same in the worker processes) comes first: each kind's least time
    (:data:`MIN_SECONDS_PER_KIND`) must not carry the menus past the search's limit."""
    return budget if until is None else max(0.0, min(budget, until - time.time()))


def _build_one(args) -> BlockMenu:
    bn, budget, per_solve, grid, seeds, stop, until = args
    return build_menu(bn, time_budget=_within(budget, until), per_solve=per_solve, grid=grid, seeds=seeds, stop=stop)


def _extend_one(args) -> BlockMenu:
    bn, menu, requests, budget, stop, until = args
    return extend_menu(bn, menu, requests, time_budget=_within(budget, until), stop=stop)


def _pool_map(function, jobs, workers: int):
    """``map`` over worker processes. Spawned, not forked: HiGHS and numba run threads in
    this process, and a child forked while one of them holds a lock deadlocks."""
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            return list(pool.map(function, jobs))
    return [function(job) for job in jobs]


def extend_menus(
    requests: dict[str, tuple[BlockNet, list]], menus: dict[str, BlockMenu], *, time_budget: float,
    cache: MenuCache | None = None, workers: int = 1, stop=None, until: float | None = None,
) -> dict[str, BlockMenu]:
    """Add targeted options (``requests[fingerprint] = (block net, [(budget, cap, fresh)])``).
    ``stop`` (anything with ``is_set()``) ends the solves early, in this process only;
    no solve starts after ``until`` (a ``time.time()`` instant)."""
    cache = cache if cache is not None else DEFAULT_CACHE
    items = [(fp, bn, reqs) for fp, (bn, reqs) in requests.items() if reqs]
    if not items:
        return menus
    weights = [len(reqs) * max(1, len(bn.block_ops)) ** 2 for _, bn, reqs in items]
    total = sum(weights)
    share = time_budget * max(1, min(workers, len(items)))
    stop = stop if workers <= 1 else None  # an event does not cross into spawned processes
    jobs = [(bn, menus[fp], reqs, max(0.3, share * w / total), stop, until) for (fp, bn, reqs), w in zip(items, weights)]
    result = dict(menus)
    for menu in _pool_map(_extend_one, jobs, workers):
        cache.put(menu)
        result[menu.fingerprint] = menu
    return result


def build_menus(
    kinds: list[BlockNet],
    *,
    time_budget: float,
    cache: MenuCache | None = None,
    workers: int = 1,
    grid: int = 2,
    seeds: dict[str, list[Option]] | None = None,
    stop=None,
    until: float | None = None,
) -> dict[str, BlockMenu]:
    """Menus of every block kind (one representative :class:`BlockNet` per fingerprint).

    The time budget is shared among the kinds not in the cache, in proportion to their
    size (forward ops squared, as the MILP grows), and spread over ``workers`` processes.
    ``seeds``: known options by fingerprint (:func:`build_menu`).
    ``stop`` (anything with ``is_set()``) ends the solves early, in this process only.
    ``until`` (a ``time.time()`` instant): no MILP solve starts after it, whatever each
    kind's least share; a kind reached later gets the heuristics' options and its whole
    grid pending.
    """
    cache = cache if cache is not None else DEFAULT_CACHE
    result: dict[str, BlockMenu] = {}
    todo = []
    for bn in kinds:
        found = cache.get(bn.fingerprint)
        if found is not None:
            result[bn.fingerprint] = found
        elif all(bn.fingerprint != t.fingerprint for t in todo):
            todo.append(bn)
    if not todo:
        return result
    weights = [max(1, len(bn.block_ops)) ** 2 for bn in todo]
    total = sum(weights)
    share = time_budget * max(1, min(workers, len(todo)))
    seeds = seeds or {}
    stop = stop if workers <= 1 else None  # an event does not cross into spawned processes
    jobs = [(bn, max(MIN_SECONDS_PER_KIND, share * w / total), max(0.5, min(4.0, share * w / total / 3)), grid, tuple(seeds.get(bn.fingerprint, ())), stop,
             until)
            for bn, w in zip(todo, weights)]
    menus = _pool_map(_build_one, jobs, workers)
    for menu in menus:
        cache.put(menu)
        cache.builds += 1
        result[menu.fingerprint] = menu
    return result
