"""Lower a schedule's peak to a budget by evicting the cheapest tensors held across it.

The hybrid engine joins blocks cut at cheap cuts, and a checkpoint between two blocks
holds every tensor crossing the cut. On graphs whose long edges cross every cut (the
seeded layered Checkmate-format graphs: about 120 tensors cross each of the 500 cuts of a
1,000-node graph) no cut is cheap, and the chain DP's plans cost 10-13 % at 0.8x the
store-all peak, where a few percent suffices. There the better start is the other end:
store-all, whose peak is too high only at a few steps around the start of the backward
pass, with a few cheap tensors dropped over those steps and recomputed when next read.

**Windows.** In a schedule, a forward tensor ``x`` is *touched* by the steps that produce
or read it. Between two touches in different stages it is carried; evicting it over that
window (removing it from the carry plan there) saves its bytes at every step strictly
between the first touch and the start of the second touch's stage, and costs the
recomputation of ``x`` in that stage (plus that of any input that is not carried then).

**Cover.** With the replayed step peaks, the steps over the budget are covered greedily:
the step furthest over gets the window covering it with the least estimated cost per byte,
until no step is over (then windows the cover no longer needs are dropped, most
expensive first); or exactly, by HiGHS, started from the greedy cover. Two windows
exclude each other when one recomputes its tensor inside the other's window over a
tensor that recomputation reads (it would be recomputed too, a cost and a transient the
accounting leaves out; without this rule the exact cover's replay on a 100-node graph
cost 56 us for an estimated 40). The carry plan without the chosen windows becomes a
schedule (:func:`~.carry_plan.schedule_from_carry`), replayed by the simulator; the
accounting ignores a recomputation's own transient, so this repeats on the replay
(greedily) until it fits.

**Restore.** Then the reverse, on the schedule that fits: a recomputed tensor is carried
again from its previous touch when the replayed peaks of the steps in between leave room
for its bytes, the most expensive recomputations first (replayed before it is kept).

The result is a starting point for :func:`~.local_search.improve`, not an optimum.

    >>> from monetdsl.synth import layered_spec
    >>> from monetdsl.search.baselines import store_all
    >>> from monetdsl.search.simulator import simulate
    >>> from monetdsl.validate import resolve_constraints
    >>> spec = layered_spec(30, 0)
    >>> net = spec.network
    >>> start = store_all(net, spec_path="g", fingerprint="0")
    >>> full = simulate(net, start)
    >>> cons = resolve_constraints(net, spec.constraints, memory_budget=int(0.8 * full.peak_bytes))
    >>> found = evict_to_budget(net, start, cons, baseline_us=full.compute_us, time_limit=10)
    >>> found.simulation.ok, found.simulation.overhead < 0.1
    (True, True)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np

from ..graph import index, storage_root
from ..ir import Network, Schedule
from ..validate import ResolvedConstraints
from .baselines import store_all
from .carry_plan import schedule_from_carry
from .impl_choice import first_impls
from .milp.highs import run_highs
from .milp.linear import Expr, ModelBuilder
from .local_search import carry_of
from .simulator import Simulation, simulate

__all__ = ["evict_to_budget", "least_peak_within_cap", "evicted_start", "compute_lower_bound_within", "EvictionResult"]

#: the lowest-peak bisection keeps the exact cover while one takes less than this
#: share of its time (then greedy covers)
EXACT_TRIES = 12
#: rounds of cover-and-replay before giving up on fitting the budget
MAX_ROUNDS = 12
#: relative gap of the exact cover: its costs are estimates of the recomputation alone
#: (a few percent of the step), so 1 % of them is noise; HiGHS proves that in seconds
#: on a 1,000-node graph where proving 0.1 % takes minutes
COVER_GAP = 0.01


@dataclass
class EvictionResult:
    """The schedule that fits (or the lowest-peak one found), its replay, and what was done."""

    schedule: Schedule
    simulation: Simulation
    evicted: int = 0
    restored: int = 0
    rounds: int = 0
    seconds: float = 0.0


@dataclass
class _Window:
    tensor: str
    first_stage: int  # the carry plan loses the tensor at stages first_stage .. last_stage - 1
    last_stage: int
    lo: int  # steps lo .. hi - 1 change by the tensor's bytes
    hi: int
    cost: float
    size: int
    #: evictable tensors the recomputation reads: evicted across ``last_stage`` too, they
    #: would be recomputed with it (a cost and a transient the accounting leaves out)
    inputs: tuple[str, ...] = ()


class _Timeline:
    """One replayed schedule seen tensor by tensor: touches, carry plan, step peaks."""

    def __init__(self, evictor: "_Evictor", schedule: Schedule, sim: Simulation):
        self.schedule, self.sim = schedule, sim
        self.plan = carry_of(evictor.network, schedule)
        self.peaks = np.array([s.peak for s in sim.steps], dtype=np.int64)
        self.stage = [s.stage for s in sim.steps]
        self.stage_start: dict[int, int] = {}
        for k, s in enumerate(sim.steps):
            self.stage_start.setdefault(s.stage, k)
        self.touches: dict[str, list[int]] = {}
        self.recomputed_at: dict[str, list[int]] = {}
        for k, step in enumerate(sim.steps):
            for x in evictor.touched(step):
                self.touches.setdefault(x, []).append(k)
            if step.kind == "recompute":
                for x in evictor.idx.forward_ops[step.op].outputs:
                    self.recomputed_at.setdefault(x, []).append(k)

    def carried(self, x: str, first: int, last: int) -> bool:
        return all(x in self.plan[s] for s in range(first, last))


class _Evictor:
    """What every round needs of the network: which tensors may be evicted, what their
    recomputation costs, and the replay of a carry plan."""

    def __init__(self, network: Network, constraints: ResolvedConstraints, baseline_us: float, deadline: float, stop):
        self.network, self.constraints = network, constraints
        self.idx = index(network)
        self.baseline_us, self.deadline, self.stop = baseline_us, deadline, stop
        self.never = set(constraints.never_recompute)
        self.budget = constraints.memory_budget

    def time_up(self) -> bool:
        return time.perf_counter() >= self.deadline or (self.stop is not None and self.stop.is_set())

    def touched(self, step) -> list[str]:
        """Forward tensors a step produces or reads."""
        idx = self.idx
        if step.kind == "backward":
            reads = idx.backward_ops[step.op].impl(step.impl).reads
            return [x for x in reads if idx.is_forward_tensor(x)]
        op = idx.forward_ops[step.op]
        impl = op.impl(step.impl)
        names = [*op.outputs, *op.inputs]
        if step.kind == "recompute":
            names += sorted(impl.recompute_reads)
        return [x for x in names if idx.is_forward_tensor(x)]

    def evictable(self, impls: dict[str, str]) -> dict[str, int]:
        """Tensors a recomputation can bring back alone, with their bytes: outputs of ops
        that may be recomputed, not views nor viewed, not written in place, not pinned."""
        net, idx = self.network, self.idx
        viewed = {storage_root(net, t) for t, tensor in net.tensors.items() if tensor.view_of is not None}
        overwritten = set()
        for op in net.forward_ops:
            target = op.impl(impls[op.name]).overwrites
            if target is not None:
                overwritten.update((target, *op.outputs))
        blocked = set(net.outputs) | set(self.constraints.keep) | viewed | overwritten
        sizes = {}
        for op in net.forward_ops:
            if op.name in self.never:
                continue
            for x in op.outputs:
                tensor = net.tensors[x]
                if x in blocked or tensor.view_of is not None or tensor.is_fixed or x in idx.derived_by:
                    continue
                if tensor.storage_bytes > 0:
                    sizes[x] = tensor.storage_bytes
        return sizes

    def recompute_cost(self, x: str, carried: set[str], impls: dict[str, str]) -> float:
        """Time to recompute ``x`` when ``carried`` is held (its missing inputs included)."""
        idx, tensors = self.idx, self.network.tensors
        seen: set[str] = set()
        total = 0.0
        stack = [x]
        while stack:
            t = stack.pop()
            producer = idx.producing_op(t)
            if producer is None or producer in seen or producer not in idx.forward_ops:
                continue
            seen.add(producer)
            op = idx.forward_ops[producer]
            impl = op.impl(impls[producer])
            total += impl.effective_recompute_time_us
            for inp in (*op.inputs, *impl.recompute_reads):
                if inp not in carried and idx.is_forward_tensor(inp) and not tensors[inp].is_fixed:
                    stack.append(inp)
        return total

    def recompute_reads(self, sizes: dict[str, int], impls: dict[str, str]) -> dict[str, tuple[str, ...]]:
        """The evictable tensors each evictable tensor's recomputation reads."""
        idx = self.idx
        found = {}
        for x in sizes:
            op = idx.forward_ops[idx.producing_op(x)]
            impl = op.impl(impls[op.name])
            found[x] = tuple(t for t in dict.fromkeys((*op.inputs, *sorted(impl.recompute_reads))) if t in sizes)
        return found

    def windows(self, line: _Timeline, sizes: dict[str, int], impls: dict[str, str]) -> list[_Window]:
        """Every window over which a carried tensor could be evicted (see the module docstring)."""
        found = []
        reads = self.recompute_reads(sizes, impls)
        for x, steps in line.touches.items():
            size = sizes.get(x)
            if size is None:
                continue
            for i, j in zip(steps, steps[1:]):
                first, last = line.stage[i], line.stage[j]
                lo, hi = i + 1, line.stage_start[last]
                if last <= first or hi <= lo or not line.carried(x, first, last):
                    continue
                cost = self.recompute_cost(x, line.plan[last - 1] - {x}, impls)
                found.append(_Window(x, first, last, lo, hi, cost, size, reads.get(x, ())))
        return found

    def build(self, impls, plan, spec_path, fingerprint) -> tuple[Schedule, Simulation] | None:
        try:
            schedule = schedule_from_carry(self.network, impls, plan, never_recompute=self.never, spec_path=spec_path,
                                           fingerprint=fingerprint)
        except (KeyError, ValueError):
            return None
        sim = simulate(self.network, schedule, constraints=self.constraints, baseline_us=self.baseline_us)
        return (schedule, sim) if sim.valid else None


def _conflicts(windows: list[_Window]) -> list[tuple[int, int]]:
    """Pairs of windows that exclude each other: one recomputes its tensor in a stage
    inside the other's window over one of the tensors that recomputation reads."""
    by_tensor: dict[str, list[int]] = {}
    for j, v in enumerate(windows):
        by_tensor.setdefault(v.tensor, []).append(j)
    pairs = []
    for i, w in enumerate(windows):
        for y in w.inputs:
            for j in by_tensor.get(y, ()):
                v = windows[j]
                if v.first_stage < w.last_stage < v.last_stage:
                    pairs.append((i, j))
    return pairs


def _cover(windows: list[_Window], peaks: np.ndarray, budget: int) -> list[_Window]:
    """Windows whose bytes bring every step's peak within ``budget`` at a low total cost
    (greedy: the step furthest over takes the cheapest window per byte covering it), then
    without the windows the cover does not need, most expensive first."""
    if not windows:
        return []
    excess = peaks - budget
    lo = np.array([w.lo for w in windows])
    hi = np.array([w.hi for w in windows])
    size = np.array([w.size for w in windows], dtype=np.int64)
    # cheapest per byte first; among equals the larger tensor (fewer recomputations)
    key = np.array([w.cost / w.size for w in windows]) - 1e-9 * size
    used = np.zeros(len(windows), dtype=bool)
    blocked = np.zeros(len(windows), dtype=bool)
    excluded: dict[int, list[int]] = {}
    for i, j in _conflicts(windows):
        excluded.setdefault(i, []).append(j)
        excluded.setdefault(j, []).append(i)
    while True:
        k = int(np.argmax(excess))
        if excess[k] <= 0:
            break
        candidates = (lo <= k) & (k < hi) & ~used & ~blocked
        if not candidates.any():
            break  # nothing evictable is held across this step
        pick = int(np.argmin(np.where(candidates, key, np.inf)))
        used[pick] = True
        blocked[excluded.get(pick, [])] = True
        excess[lo[pick]:hi[pick]] -= size[pick]
    chosen = sorted(np.flatnonzero(used), key=lambda w: -windows[w].cost)
    kept = []
    for w in chosen:
        if excess[lo[w]:hi[w]].max() + size[w] <= 0:
            excess[lo[w]:hi[w]] += size[w]  # not needed: keep the tensor
        else:
            kept.append(windows[w])
    return kept


def _restorable(evictor: _Evictor, line: _Timeline, sizes: dict[str, int], impls: dict[str, str]) -> list[_Window]:
    """Recomputations that carrying the tensor from its previous touch would remove."""
    found = []
    idx = evictor.idx
    for x, steps in line.recomputed_at.items():
        size = sizes.get(x)
        if size is None:
            continue
        producer = idx.forward_ops[idx.producing_op(x)]
        if len(producer.outputs) != 1:
            continue
        touches = line.touches[x]
        for r in steps:
            before = [k for k in touches if k < r]
            if not before:
                continue
            i = before[-1]
            first, last = line.stage[i], line.stage[r]
            if last <= first:
                continue
            saved = producer.impl(impls[producer.name]).effective_recompute_time_us
            found.append(_Window(x, first, last, i + 1, r, saved, size))
    return found


def _restore(evictor: _Evictor, best, impls, sizes, budget: int):
    """Carry back the costliest recomputed tensors the replayed peaks leave room for."""
    line = _Timeline(evictor, *best)
    peaks = line.peaks.copy()
    candidates = sorted(_restorable(evictor, line, sizes, impls), key=lambda w: -w.cost / w.size)
    plan = [set(c) for c in line.plan]
    taken = 0
    for w in candidates:
        if w.cost <= 0:
            break
        if w.hi > w.lo and peaks[w.lo:w.hi].max() + w.size > budget:
            continue
        peaks[w.lo:w.hi] += w.size
        for s in range(w.first_stage, w.last_stage):
            plan[s].add(w.tensor)
        taken += 1
    if not taken:
        return best, 0
    schedule = best[0]
    built = evictor.build(impls, plan, schedule.spec_path, schedule.fingerprint)
    if built is None or not built[1].ok or built[1].compute_us >= best[1].compute_us:
        return best, 0
    return built, taken


def _cover_milp(windows: list[_Window], peaks: np.ndarray, budget: int, start: list[_Window], time_limit: float,
                stop=None) -> list[_Window] | None:
    """The cheapest windows covering every step over ``budget`` under :func:`_cover`'s
    accounting (conflicting windows excluded), by HiGHS within :data:`COVER_GAP`
    (``start``: a cover to begin from), or its best at the time limit or when ``stop``
    is set; None when it found none."""
    excess = peaks - budget
    over = np.flatnonzero(excess > 0)
    if not len(over) or not windows:
        return None
    builder = ModelBuilder()
    rows: list[dict[int, float]] = [{} for _ in over]
    for col, w in enumerate(windows):
        builder.binary(f"evict {w.tensor} {w.first_stage}-{w.last_stage}")
        builder.cost[col] = w.cost
        for r in range(int(np.searchsorted(over, w.lo)), int(np.searchsorted(over, w.hi))):
            rows[r][col] = float(w.size)
    for r, k in enumerate(over):
        builder.row(Expr(0.0, rows[r]), lower=float(excess[k]), name=f"step {k}")
    if builder.conflicts:
        return None  # a step no window covers
    for i, j in _conflicts(windows):
        builder.row(Expr(0.0, {i: 1.0, j: 1.0}), upper=1.0, name=f"conflict {i} {j}")
    chosen = {id(w) for w in start}
    vector = np.array([1.0 if id(w) in chosen else 0.0 for w in windows]) if start else None
    run = run_highs(builder, time_limit=time_limit, rel_gap=COVER_GAP, start=vector, stop=stop)
    if run.x is None:
        return None
    return [w for w, v in zip(windows, run.x) if v > 0.5]


def evict_to_budget(
    network: Network,
    schedule: Schedule,
    constraints: ResolvedConstraints,
    *,
    baseline_us: float,
    time_limit: float,
    exact_cover: bool = False,
    stop=None,
) -> EvictionResult | None:
    """``schedule`` with tensors evicted until its replayed peak fits the budget of
    ``constraints`` (see the module docstring); None without a budget or a valid start.

    ``exact_cover``: the first cover is HiGHS's cheapest (within :data:`COVER_GAP`, or
    its best in the time limit) rather than the greedy one: on 100-node layered graphs
    the exact optimum of the whole problem, on 1,000 nodes 8-13 % less recomputation, in
    about 4 s on a loaded machine. The rounds after the first are greedy. ``stop``
    (anything with ``is_set()``) ends the search early.

    The result's simulation says whether it fits (``ok``); when the rounds or the time
    ran out first it is the lowest-peak schedule found."""
    begin = time.perf_counter()
    budget = constraints.memory_budget
    if budget is None:
        return None
    evictor = _Evictor(network, constraints, baseline_us, begin + time_limit, stop)
    start = simulate(network, schedule, constraints=constraints, baseline_us=baseline_us)
    if not start.valid:
        return None
    impls = {op.name: schedule.impls.get(op.name, op.impls[0].name) for op in (*network.forward_ops, *network.backward_ops)}
    sizes = evictor.evictable(impls)
    best = current = (schedule, start)
    evicted = rounds = 0
    while not current[1].ok and rounds < MAX_ROUNDS and not evictor.time_up():
        rounds += 1
        line = _Timeline(evictor, *current)
        windows = evictor.windows(line, sizes, impls)
        chosen = _cover(windows, line.peaks, budget)
        if exact_cover and rounds == 1:
            exact = _cover_milp(windows, line.peaks, budget, chosen, evictor.deadline - time.perf_counter(), stop)
            chosen = exact if exact is not None else chosen
        if not chosen:
            break
        plan = [set(c) for c in line.plan]
        for w in chosen:
            for s in range(w.first_stage, w.last_stage):
                plan[s].discard(w.tensor)
        built = evictor.build(impls, plan, schedule.spec_path, schedule.fingerprint)
        if built is None or built[1].peak_bytes >= current[1].peak_bytes:
            break
        evicted += len(chosen)
        current = built
        if current[1].peak_bytes < best[1].peak_bytes or current[1].ok:
            best = current
    restored = 0
    if best[1].ok:
        for _ in range(2):
            if evictor.time_up():
                break
            best, taken = _restore(evictor, best, impls, sizes, budget)
            restored += taken
            if not taken:
                break
    return EvictionResult(best[0], best[1], evicted, restored, rounds, time.perf_counter() - begin)


def least_peak_within_cap(
    network: Network,
    schedule: Schedule,
    constraints: ResolvedConstraints,
    *,
    baseline_us: float,
    floor: int,
    time_limit: float,
    stop=None,
) -> EvictionResult | None:
    """The lowest peak :func:`evict_to_budget` reaches from ``schedule`` within the
    overhead cap of ``constraints`` (whose budget is ignored): a bisection on the budget
    between ``floor`` (a peak no schedule beats) and ``schedule``'s peak, to 0.1 %.

    The recomputation the cover needs does not always grow as the budget falls (the
    greedy rounds after the first differ), so every budget tried that fits counts, not
    only the last. None when no budget below ``schedule``'s peak fits the cap. The covers
    are exact while one takes under 1/:data:`EXACT_TRIES` of ``time_limit``, greedy after.

    On UNet (batch 72) within 5 % of PyTorch's time, from store-all with the spec's
    fastest implementations: 6.39 GiB in 0.6 s, where the hybrid's blocks reached
    6.82 GiB in 60 s."""
    begin = time.perf_counter()
    start = simulate(network, schedule, constraints=replace(constraints, memory_budget=None), baseline_us=baseline_us)
    if not start.valid or constraints.max_overhead is None:
        return None
    lo, hi = floor, start.peak_bytes
    best = None
    tries = 0
    exact = True
    while hi - lo > max(1, hi // 1000) and time.perf_counter() - begin < time_limit and not (stop is not None and stop.is_set()):
        budget = (lo + hi) // 2
        tries += 1
        found = evict_to_budget(network, schedule, replace(constraints, memory_budget=budget), baseline_us=baseline_us,
                                time_limit=max(0.1, time_limit - (time.perf_counter() - begin)), exact_cover=exact, stop=stop)
        # the bisection needs about ten tries: greedy covers when an exact one is slower than that allows
        exact = exact and found is not None and found.seconds < time_limit / EXACT_TRIES
        if found is not None and found.simulation.ok:
            hi = found.simulation.peak_bytes
            if best is None or hi < best.simulation.peak_bytes:
                best = found
        else:
            lo = budget
    if best is not None:
        best.rounds, best.seconds = tries, time.perf_counter() - begin
    return best


def evicted_start(network: Network, store: tuple[Schedule, Simulation], constraints: ResolvedConstraints, *, objective: str,
                  baseline_us: float, time_limit: float, floor: int, stop=None) -> EvictionResult | None:
    """Store-all (``store``: its schedule and replay) evicted to what the search asks: for
    a budget with the compute objective, the cheapest eviction that fits it
    (:func:`evict_to_budget`, exact cover); for a cap with the memory objective, the
    lowest budget whose eviction stays within the cap (:func:`least_peak_within_cap`,
    ``floor`` a peak no schedule beats). None when there is nothing to evict to (no cap,
    no budget, or store-all fits already) or nothing was found; the result may not fit
    (its simulation says)."""
    if time_limit <= 0.2:
        return None
    if objective == "memory":
        if constraints.max_overhead is None:
            return None
        return least_peak_within_cap(network, store[0], constraints, baseline_us=baseline_us, floor=floor, time_limit=time_limit,
                                     stop=stop)
    if constraints.memory_budget is None or store[1].ok:
        return None
    return evict_to_budget(network, store[0], constraints, baseline_us=baseline_us, time_limit=time_limit, exact_cover=True, stop=stop)


def _plain(network: Network) -> bool:
    """One implementation per op, one output per forward op, no views, no in-place, no
    derived tensors: then every schedule runs the same steps as store-all, with the same
    gradients, plus recomputations, and holds at least what later steps read or recomputes it."""
    if any(t.view_of is not None for t in network.tensors.values()):
        return False
    for op in network.forward_ops:
        impl = op.impls[0]
        if len(op.impls) != 1 or len(op.outputs) != 1 or impl.overwrites is not None or impl.derived or impl.recompute_reads:
            return False
    return all(len(bop.impls) == 1 for bop in network.backward_ops)


def compute_lower_bound_within(network: Network, constraints: ResolvedConstraints, *, baseline_us: float) -> float | None:
    """A lower bound on the compute of every schedule within the budget of
    ``constraints``, for plain networks (:func:`_plain`; None otherwise, or without a budget).

    At each step, store-all holds exactly the forward tensors some later step reads. A
    schedule within the budget holds, at a step where store-all is over it by ``e``
    bytes, at least ``e`` bytes fewer of them (recomputations only add memory), and each
    tensor not held there is recomputed later, at least once: at least the cheapest
    recomputation (per byte, fractionally) of ``e`` bytes among the tensors store-all
    holds there that the step does not read. The bound is store-all's compute plus the
    largest such amount over the steps. On 1,000-node layered graphs at 0.8x the
    store-all peak it proves about half the overhead the eviction reaches."""
    budget = constraints.memory_budget
    if budget is None or not _plain(network):
        return None
    start = store_all(network, constraints, spec_path="bound", fingerprint="bound")
    sim = simulate(network, start, baseline_us=baseline_us)
    if not sim.valid:
        return None
    evictor = _Evictor(network, constraints, baseline_us, float("inf"), None)
    impls = first_impls(network)
    sizes = evictor.evictable(impls)
    line = _Timeline(evictor, start, sim)
    windows = evictor.windows(line, sizes, impls)
    excess = line.peaks - budget
    if not windows:
        return sim.compute_us if excess.max() <= 0 else None
    idx = evictor.idx
    lo = np.array([w.lo for w in windows])
    hi = np.array([w.hi for w in windows])
    size = np.array([w.size for w in windows], dtype=np.float64)
    cost = np.array([idx.forward_ops[idx.producing_op(w.tensor)].impls[0].effective_recompute_time_us for w in windows])
    order = np.argsort(cost / size, kind="stable")
    lo, hi, size, cost = lo[order], hi[order], size[order], cost[order]
    need = 0.0
    for k in np.flatnonzero(excess > 0):
        covering = (lo <= k) & (k < hi)
        s, c = size[covering], cost[covering]
        if s.sum() < excess[k]:
            return None  # the budget is below what any schedule needs here
        before = np.cumsum(s) - s  # bytes of the cheaper windows
        take = np.clip((excess[k] - before) / s, 0.0, 1.0)
        need = max(need, float(np.dot(take, c)))
    return sim.compute_us + need
