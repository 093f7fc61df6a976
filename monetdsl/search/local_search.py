"""Improve a schedule by small moves on its carry plan, each checked by the simulator.

A schedule is, up to closed-form details, its *carry plan*: which forward tensors are
held after the forward pass and after every backward stage (what
:func:`~monetdsl.search.carry_plan.schedule_from_carry` turns back into recomputations and
frees), plus the implementation of every operator. The hybrid engine's chain DP decides
the plan block by block and holds every cut tensor it checkpoints; some good schedules are
outside that space. The classic one is a residual network: the exact optimum keeps each
block's batch-norm output (which the batch-norm backward reads when it runs "from its
output") instead of the block's output, and re-derives the block output with a cheap add
and ReLU when a later stage needs it, so no convolution is ever re-run. Three moves reach
such schedules from the DP's:

* **carry on**: a tensor recomputed in two stages is carried from the first to the second;
* **hold longer**: a tensor some stage recomputes is held from the forward pass until that
  stage instead (uses memory the DP's conservative accounting left free);
* **swap**: a held tensor is replaced, in every set that holds it, by one of its nearby
  producers' inputs or outputs of at most the same size, followed by re-picking the
  backward implementations that could read the new one;
* **re-pick**: one operator's implementation changes.

Every candidate is rebuilt with :func:`schedule_from_carry` and replayed by the simulator;
a move is taken only when the replay is valid, within the constraints, and better
(compute then peak, or peak then compute with the memory objective). The search is
first-improvement hill climbing, then iterated: random kicks of a few moves followed by
climbing again, until the deadline (seeded, so a run is repeatable on an idle machine), or,
given a :class:`~.stopping.StopRule`, once it has stopped paying: no improvement of its
best for the rule's share of its own running time (:mod:`.stopping`). Its clock starts
with it, not with the search that calls it: the moves it makes are ones the phases before
it cannot, so a stall of those phases says nothing about what it will find.

    >>> from monetdsl.grammar.parser import parse_spec
    >>> from monetdsl.search.baselines import recompute_all
    >>> from monetdsl.validate import resolve_constraints
    >>> spec = parse_spec('''
    ... network n
    ...   tensor x f32[256] input
    ...   op a (x) -> y f32[256] time 5us
    ...     backward reads (grad(y), x) -> grad(x) time 1us
    ...   op b (y) -> z f32[256] time 5us
    ...     backward reads (grad(z), y) -> grad(y) time 1us
    ...   output z
    ... ''')
    >>> cons = resolve_constraints(spec.network, spec.constraints)
    >>> start = recompute_all(spec.network, cons, spec_path="n", fingerprint="0")
    >>> better = improve(spec.network, start, cons, baseline_us=12.0, time_limit=5.0)
    >>> better.simulation.compute_us < 22.0    # recompute-all re-runs a: holding y is free here
    True
"""
from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass, field

from ..graph import index, storage_root
from ..ir import Network, Schedule
from ..validate import ResolvedConstraints
from .carry_plan import schedule_from_carry
from .schedule_builder import backward_reads
from .simulator import Simulation, simulate
from .stopping import StallWatch, StopRule

__all__ = ["improve", "LocalSearchResult", "carry_of"]

#: how many producer steps back a swap looks for a replacement tensor
SWAP_DEPTH = 3
#: random moves in one kick of the iterated local search
KICK_MOVES = 2
#: moves a kick draws from (the first ones generated) and tries at most
KICK_POOL = 2000
KICK_TRIES = 40
#: the iterated search stops after this many kicks in a row that found nothing better
STALE_KICKS = 40


@dataclass
class LocalSearchResult:
    """The best schedule found, its replay, and what the search did."""

    schedule: Schedule
    simulation: Simulation
    moves: list[str] = field(default_factory=list)
    evaluations: int = 0
    kicks: int = 0
    seconds: float = 0.0
    #: why the search ended before its deadline by the stop rule, or None
    stalled: str | None = None


def carry_of(network: Network, schedule: Schedule) -> list[set[str]]:
    """The schedule's carry plan: what is held after the forward pass and after each stage."""
    idx = index(network)
    held = {x for x in schedule.forward_keep if idx.is_forward_tensor(x)}
    plan = [set(held)]
    for stage in schedule.stages:
        held = (held | {x for x in stage.keep if idx.is_forward_tensor(x)}) - set(stage.free)
        plan.append(set(held))
    return plan


class _Search:
    def __init__(self, network, constraints, baseline_us, objective, deadline, spec_path, fingerprint, stop=None,
                 watch: StallWatch | None = None):
        self.network = network
        self.stop = stop
        self.watch = watch
        self.stalled: str | None = None
        self.idx = index(network)
        self.constraints = constraints
        self.baseline_us = baseline_us
        self.objective = objective
        self.deadline = deadline
        self.spec_path = spec_path
        self.fingerprint = fingerprint
        self.never = set(constraints.never_recompute)
        self.evaluations = 0

    def time_up(self) -> bool:
        """The deadline has passed, the caller asked the search to stop, or the search has
        stopped paying under its stop rule (the reason is kept in ``stalled``)."""
        if time.perf_counter() >= self.deadline or (self.stop is not None and self.stop.is_set()):
            return True
        if self.watch is not None and self.stalled is None:
            self.stalled = self.watch.reason()
        return self.stalled is not None

    def found_better(self, sim: Simulation) -> None:
        """Tell the stall watch (if any) of a new best schedule."""
        if self.watch is not None:
            self.watch.observe(float(sim.peak_bytes) if self.objective == "memory" else sim.compute_us)

    def key(self, sim: Simulation) -> tuple:
        if self.objective == "memory":
            return (sim.peak_bytes, round(sim.compute_us, 6))
        return (round(sim.compute_us, 6), sim.peak_bytes)

    def build(self, impls: dict[str, str], plan: list[set[str]]) -> tuple[Schedule, Simulation] | None:
        self.evaluations += 1
        try:
            schedule = schedule_from_carry(
                self.network, impls, plan, never_recompute=self.never, spec_path=self.spec_path, fingerprint=self.fingerprint,
            )
        except (KeyError, ValueError):
            return None
        sim = simulate(self.network, schedule, constraints=self.constraints, baseline_us=self.baseline_us)
        if not sim.ok:
            return None
        return schedule, sim

    def allowed(self, op) -> tuple[str, ...]:
        return self.constraints.impls_for(op)

    # ------------------------------------------------------------------ moves
    def hold_longer(self, schedule: Schedule, plan):
        """(description, impls, plan) for each recomputed tensor held from the forward pass."""
        idx = self.idx
        recomputed: dict[str, int] = {}
        for t, stage in enumerate(schedule.stages, start=1):
            for op_name in stage.recompute:
                for x in idx.forward_ops[op_name].outputs:
                    recomputed[x] = t  # the last stage that recomputes it
        for x, last in sorted(recomputed.items(), key=lambda item: -self._producer_time(item[0])):
            new = [set(c) for c in plan]
            for t in range(last):
                new[t].add(x)
            yield f"hold {x} until stage {last}", None, new

    def carry_on(self, schedule: Schedule, plan):
        """(description, impls, plan) for each tensor recomputed twice: carried between."""
        idx = self.idx
        stages_of: dict[str, list[int]] = {}
        for t, stage in enumerate(schedule.stages, start=1):
            for op_name in stage.recompute:
                for x in idx.forward_ops[op_name].outputs:
                    stages_of.setdefault(x, []).append(t)
        for x, ts in sorted(stages_of.items()):
            if len(ts) < 2:
                continue
            new = [set(c) for c in plan]
            for t in range(ts[0], ts[-1]):
                new[t].add(x)
            yield f"carry {x} from stage {ts[0]} to {ts[-1]}", None, new

    def _producer_time(self, x: str) -> float:
        producer = self.idx.producing_op(x)
        if producer is None or producer not in self.idx.forward_ops:
            return 0.0
        return max(impl.time_us for impl in self.idx.forward_ops[producer].impls)

    def swaps(self, schedule: Schedule, plan, impls):
        idx, tensors = self.idx, self.network.tensors
        held = set().union(*plan) - set(self.network.outputs) - set(self.constraints.keep)
        for y in sorted(held):
            size = tensors[storage_root(self.network, y)].storage_bytes
            for u in self._nearby(y):
                if u in held or tensors[u].is_fixed or tensors[storage_root(self.network, u)].storage_bytes > size:
                    continue
                new_impls = self._readers_of(u, impls)
                new = [(c - {y}) | {u} if y in c else set(c) for c in plan]
                # hold u up to the last stage that reads it (the new readers may come later)
                last = max((t for t, r in enumerate(backward_reads(self.network, new_impls, idx.backward_order), start=1) if u in r), default=0)
                first = min((t for t, c in enumerate(new) if u in c), default=0)
                for t in range(first, last):
                    new[t].add(u)
                yield f"swap {y} -> {u}", new_impls, new

    def _nearby(self, y: str) -> list[str]:
        """Forward tensors up to :data:`SWAP_DEPTH` producer steps before ``y``."""
        idx = self.idx
        found: list[str] = []
        frontier = [y]
        for _ in range(SWAP_DEPTH):
            nxt = []
            for x in frontier:
                producer = idx.producing_op(x)
                if producer is None or producer not in idx.forward_ops:
                    continue
                for inp in idx.forward_ops[producer].inputs:
                    if idx.is_forward_tensor(inp) and inp not in found and inp != y:
                        found.append(inp)
                        nxt.append(inp)
            frontier = nxt
        return found

    def _readers_of(self, u: str, impls: dict[str, str]) -> dict[str, str]:
        """Implementations switched to ones that read ``u`` where an allowed one does."""
        switched = dict(impls)
        for bop in self.network.backward_ops:
            if len(bop.impls) < 2:
                continue
            allowed = self.allowed(bop)
            current = bop.impl(impls.get(bop.name, bop.impls[0].name))
            if u in current.reads:
                continue
            options = [impl for impl in bop.impls if impl.name in allowed and u in impl.reads]
            if options:
                switched[bop.name] = min(options, key=lambda impl: impl.time_us).name
        return switched

    def repicks(self, impls: dict[str, str], plan):
        for op in (*self.network.forward_ops, *self.network.backward_ops):
            if len(op.impls) < 2:
                continue
            for name in self.allowed(op):
                if name != impls.get(op.name):
                    new_impls = dict(impls)
                    new_impls[op.name] = name
                    yield f"impl {op.name} = {name}", new_impls, plan


def kicks_left(done: int, limit: int | None) -> bool:
    return limit is None or done < limit


def _moves(search: _Search, schedule: Schedule):
    """Every move from ``schedule``, lazily, cheapest kinds first."""
    network = search.network
    plan = carry_of(network, schedule)
    impls = {op.name: schedule.impls.get(op.name, op.impls[0].name) for op in (*network.forward_ops, *network.backward_ops)}
    return impls, itertools.chain(  # lazily: on 1,000 ops a pass may not finish before the deadline
        search.carry_on(schedule, plan),
        search.hold_longer(schedule, plan),
        search.swaps(schedule, plan, impls),
        search.repicks(impls, plan),
    )


def _climb(search: _Search, best: tuple[Schedule, Simulation], moves_taken: list[str]) -> tuple[Schedule, Simulation]:
    """First-improvement hill climbing from ``best`` until no move helps or time is up."""
    improved = True
    while improved and not search.time_up():
        improved = False
        impls, moves = _moves(search, best[0])
        for description, new_impls, new_plan in moves:
            if search.time_up():
                break
            found = search.build(new_impls if new_impls is not None else impls, new_plan)
            if found is not None and search.key(found[1]) < search.key(best[1]):
                best = found
                search.found_better(found[1])
                moves_taken.append(description)
                improved = True
                break
    return best


def _kick(search: _Search, start: tuple[Schedule, Simulation], rng: random.Random, count: int):
    """``start`` after ``count`` random valid moves (better or not), or None if none is valid."""
    current, taken = start, []
    for _ in range(count):
        impls, moves = _moves(search, current[0])
        pool = list(itertools.islice(moves, KICK_POOL))
        rng.shuffle(pool)
        for description, new_impls, new_plan in pool[:KICK_TRIES]:
            found = search.build(new_impls if new_impls is not None else impls, new_plan)
            if found is not None and search.key(found[1]) != search.key(current[1]):
                current = found
                taken.append(description)
                break
        if search.time_up():
            break
    return (current, taken) if taken else (None, taken)


def improve(
    network: Network,
    schedule: Schedule,
    constraints: ResolvedConstraints,
    *,
    baseline_us: float,
    time_limit: float,
    objective: str = "compute",
    seed: int = 0,
    max_kicks: int | None = None,
    stop=None,
    rule: StopRule | None = None,
) -> LocalSearchResult:
    """The best schedule the moves reach from ``schedule`` within ``time_limit`` seconds.

    Hill climbing first; then, while time remains (at most ``max_kicks`` times, and until
    :data:`STALE_KICKS` kicks in a row found nothing better), the best schedule is kicked
    by :data:`KICK_MOVES` random valid moves and climbed again.

    ``schedule`` must replay validly; the result is never worse than it (it is returned
    unchanged when no move helps). ``stop`` (anything with ``is_set()``) ends it early;
    so does ``rule`` (a :class:`~.stopping.StopRule`, timed from this call) once the search
    has stopped paying.
    """
    begin = time.perf_counter()
    search = _Search(network, constraints, baseline_us, objective, begin + time_limit, schedule.spec_path, schedule.fingerprint, stop,
                     None if rule is None else StallWatch(rule, begin))
    impls = {op.name: schedule.impls.get(op.name, op.impls[0].name) for op in (*network.forward_ops, *network.backward_ops)}
    current_sim = simulate(network, schedule, constraints=constraints, baseline_us=baseline_us)
    best = (schedule, current_sim)
    plan = carry_of(network, schedule)
    rebuilt = search.build(impls, plan)
    if rebuilt is not None and search.key(rebuilt[1]) <= search.key(current_sim):
        best = rebuilt
    search.found_better(best[1])
    result = LocalSearchResult(best[0], best[1])
    if not current_sim.ok:
        result.seconds = time.perf_counter() - begin
        return result
    best = _climb(search, best, result.moves)
    # iterated local search: kick the best schedule with a few random valid moves (worse
    # ones too), climb again, keep the result when it is better; seeded, so repeatable
    rng = random.Random(seed)
    kicks = since_better = 0
    while kicks_left(kicks, max_kicks) and since_better < STALE_KICKS and not search.time_up():
        kicks += 1
        since_better += 1
        kicked, taken = _kick(search, best, rng, KICK_MOVES)
        if kicked is None:
            break
        trail: list[str] = []
        found = _climb(search, kicked, trail)
        if search.key(found[1]) < search.key(best[1]):
            best = found
            since_better = 0
            result.moves += [f"kick: {m}" for m in taken] + trail
    result.kicks = kicks
    result.stalled = search.stalled
    result.schedule, result.simulation = best
    result.evaluations = search.evaluations
    result.seconds = time.perf_counter() - begin
    return result
