"""Exhaustive search over every valid schedule of a tiny network: the MILP's referee.

This enumerates, for every implementation assignment, every forward ``keep`` set and, stage
after stage, every recompute set together with every choice of what to carry on (``keep``
and ``free``), and lets the simulator's own stage replay decide what is legal and what it
costs. Nothing here shares modelling with the MILP: the only knowledge used is the schedule
language. Identical simulator states reached by different prefixes are merged (dynamic
programming over stages), and each state keeps the Pareto front of (compute, peak) of the
stages after it, so one run answers every budget.

It is exponential in every dimension and meant for networks of a handful of operators:
tests compare the MILP with it on random graphs.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from ..graph import index
from ..ir import Network, Schedule, StagePlan
from .simulator import Simulation, _Memory, _Replay

__all__ = ["ParetoPoint", "exhaustive_front", "best_within"]


@dataclass(frozen=True)
class ParetoPoint:
    """A schedule that no other schedule beats in both compute and peak."""

    compute_us: float
    peak_bytes: int
    schedule: Schedule


def _pareto(points):
    """Points (compute, peak, payload) that no other point dominates; one per (compute, peak)."""
    points = sorted(points, key=lambda p: (p[0], p[1]))
    front = []
    best_peak = None
    for point in points:
        if best_peak is None or point[1] < best_peak:
            front.append(point)
            best_peak = point[1]
    return front


class _Invalid(Exception):
    """Raised at a stage's first error: the stage is illegal, the rest of its replay moot."""


class _Replay1(_Replay):
    """The simulator's replay, stopping at the first error (only legality is needed here)."""

    def error(self, message: str, line: int = 0) -> None:
        raise _Invalid(message)


def _clone(replay: _Replay) -> _Replay:
    copy = object.__new__(_Replay1)
    copy.__dict__.update(replay.__dict__)
    mem = _Memory()
    mem.storage_of = dict(replay.mem.storage_of)
    mem.users = {k: set(v) for k, v in replay.mem.users.items()}
    mem.size = dict(replay.mem.size)
    mem.live = replay.mem.live
    mem._next = replay.mem._next
    copy.mem = mem
    copy.carried = set(replay.carried)
    copy.last_read_stage = dict(replay.last_read_stage)
    copy.carried_since = dict(replay.carried_since)
    copy.gradient_readers = Counter(replay.gradient_readers)
    copy.gradient_writers_left = Counter(replay.gradient_writers_left)
    copy.seeds = set(replay.seeds)
    copy.result = Simulation(replay.net, replay.sched, fixed_bytes=replay.fixed)
    return copy


def _state_key(replay: _Replay) -> tuple:
    storages = frozenset((frozenset(users), replay.mem.size[sid]) for sid, users in replay.mem.users.items())
    return (frozenset(replay.carried), storages)


def _cost(result: Simulation) -> tuple[float, int]:
    compute = sum(step.time_us for step in result.steps)
    peak = max((step.peak for step in result.steps), default=0)
    return compute, peak


def exhaustive_front(network: Network, *, spec_path: str = "<exhaustive>", fingerprint: str = "0") -> list[ParetoPoint]:
    """The Pareto front of (compute, peak) over all valid schedules in the canonical stage order."""
    idx = index(network)
    order = idx.backward_order
    outputs = set(network.outputs)
    choice_ops = [op for op in (*network.forward_ops, *network.backward_ops) if len(op.impls) > 1]
    forward_ops = list(idx.forward_order)
    results = []
    for combo in itertools.product(*[op.impl_names for op in choice_ops]):
        impls = {op.name: name for op, name in zip(choice_ops, combo)}
        results.extend(_front_for_impls(network, idx, impls, order, outputs, forward_ops, spec_path, fingerprint))
    front = _pareto(results)
    return [ParetoPoint(c, p, s) for c, p, s in front]


def _front_for_impls(network, idx, impls, order, outputs, forward_ops, spec_path, fingerprint):
    def produced_by(op_names, chosen):
        out = set()
        for name in op_names:
            op = idx.forward_ops[name]
            out.update(op.outputs)
            out.update(op.impl(chosen.get(name, op.impls[0].name)).derived)
        return out

    chosen = {op.name: impls.get(op.name, op.impls[0].name) for op in network.forward_ops}
    forward_set = {t for t in network.tensors if idx.is_forward_tensor(t)}

    def _inputs_available(recompute, before, reads) -> bool:
        """Every forward tensor the stage reads exists when read: carried in or made earlier."""
        have = set(before)
        for name in recompute:
            op = idx.forward_ops[name]
            impl = op.impl(chosen[name])
            for x in (*op.inputs, *impl.recompute_reads):
                if x in forward_set and x not in have:
                    return False
            have.update(op.outputs)
            have.update(impl.derived)
        return reads <= have
    forward_produced = sorted(produced_by(forward_ops, chosen) - outputs)
    memo: dict = {}

    def stage_front(t: int, replay: _Replay):
        """Pareto points (compute, peak, plans) of stages t.. from this state."""
        if t > len(order):
            return [(0.0, 0, ())]
        key = (t, _state_key(replay))
        if key in memo:
            return memo[key]
        points = []
        before = set(replay.carried)
        reads = {name for name in replay.reads_of_backward(idx.backward_ops[order[t - 1]]) if name in forward_set}
        for r in range(len(forward_ops) + 1):
            for recompute in itertools.combinations(forward_ops, r):
                if not _inputs_available(recompute, before, reads):
                    continue  # the simulator would report a missing input: skip the replay
                pool = sorted((before | produced_by(recompute, chosen)) - outputs)
                for k in range(len(pool) + 1):
                    for carried in itertools.combinations(pool, k):
                        carried = set(carried)
                        keep = tuple(sorted(carried - before))
                        free = tuple(sorted((before - carried) - outputs))
                        plan = StagePlan(order[t - 1], recompute, keep, free)
                        nxt = _clone(replay)
                        try:
                            nxt.backward_stage(t, plan)
                        except _Invalid:
                            continue
                        compute, peak = _cost(nxt.result)
                        for c, p, plans in stage_front(t + 1, nxt):
                            points.append((compute + c, max(peak, p), (plan, *plans)))
        memo[key] = _pareto(points)
        return memo[key]

    results = []
    for k in range(len(forward_produced) + 1):
        for keep in itertools.combinations(forward_produced, k):
            sched = Schedule(spec_path, fingerprint, impls, tuple(keep), ())
            result = Simulation(network, sched, fixed_bytes=network.fixed_bytes)
            replay = _Replay(network, sched, result)
            replay.choose_impls()
            replay.count_gradient_uses()
            replay.forward_stage()
            if result.errors:
                continue
            replay.start_backward()
            compute0, peak0 = _cost(result)
            start = _clone(replay)
            for c, p, plans in stage_front(1, start):
                schedule = Schedule(spec_path, fingerprint, dict(impls), tuple(keep), plans)
                results.append((compute0 + c, max(peak0, p), schedule))
    return _pareto(results)


def best_within(front: list[ParetoPoint], budget: int | None) -> ParetoPoint | None:
    """The fastest point whose peak fits ``budget`` (None: no fitting schedule)."""
    fitting = [p for p in front if budget is None or p.peak_bytes <= budget]
    return min(fitting, key=lambda p: (p.compute_us, p.peak_bytes)) if fitting else None
