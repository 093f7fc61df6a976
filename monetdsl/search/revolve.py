"""Griewank-style binomial checkpointing (revolve) on the chain of articulation points.

The articulation tensors ``a_1..a_m`` of the forward graph cut it into ``l = m + 1``
segments, a chain (segment ``j`` reads ``a_{j-1}``). Revolve reverses such a chain with ``s`` checkpoint slots: to reverse
segments ``c+1..c+l`` from a held checkpoint ``a_c`` it advances ``m`` segments, stores
``a_{c+m}``, reverses the top ``l - m`` segments with ``s - 1`` slots, frees the slot and
reverses the bottom ``m`` with ``s`` slots; the split minimises the number of segment
recomputations for uniform segments (Griewank and Walther's binomial rule, computed here
by dynamic programming instead of the closed form). Within a segment, the tensors its
backward ops read are recomputed once, when the backward enters it, and carried until
their last use, as in Chen's scheme.

The plan is expressed as "which articulation tensors are carried after each stage" and
turned into a schedule by :func:`~monetdsl.search.carry_plan.schedule_from_carry`, so a
checkpoint stored during a backward advance is a recomputed tensor that the stage keeps.
The method tries every slot count and keeps what the constraints prefer (see
:func:`~monetdsl.search.chen.pick_schedule`).
"""
from __future__ import annotations

from functools import lru_cache

from ..graph import checkpoint_candidates, index
from ..ir import Network, Schedule
from ..validate import ResolvedConstraints
from .baselines import _setup
from .carry_plan import schedule_from_carry
from .chen import pick_schedule

__all__ = ["revolve", "revolve_schedule", "revolve_timeline", "advances"]


@lru_cache(maxsize=None)
def _best(l: int, s: int) -> tuple[int, int]:
    """(segment advances to reverse ``l`` segments with ``s`` free slots, best first split)."""
    if l <= 1:
        return l, 0
    if s == 0:
        return l * (l + 1) // 2, 0
    best = None
    for m in range(1, l):
        cost = m + _best(l - m, s - 1)[0] + _best(m, s)[0]
        if best is None or cost < best[0]:
            best = (cost, m)
    return best


def advances(l: int, s: int) -> int:
    """Segment recomputations revolve needs for ``l`` segments and ``s`` slots."""
    return _best(l, s)[0]


def revolve_timeline(l: int, s: int) -> list[tuple[int, frozenset[int]]]:
    """(segment, checkpoints held while it is reversed), in reversal order; 0 is the input."""
    timeline: list[tuple[int, frozenset[int]]] = []
    held: set[int] = {0}

    def rev(c: int, length: int, slots: int) -> None:
        if length <= 0:
            return
        if length == 1 or slots == 0:
            for j in range(c + length, c, -1):
                timeline.append((j, frozenset(held)))
            return
        m = _best(length, slots)[1]
        held.add(c + m)
        rev(c + m, length - m, slots - 1)
        held.discard(c + m)
        rev(c, m, slots)

    rev(0, l, s)
    return timeline


def _segments(network: Network, checkpoints: tuple[str, ...]):
    """Segment (1-based) of every forward op and of every backward stage."""
    idx = index(network)
    cut = sorted(idx.position[idx.producing_op(a)] for a in checkpoints)

    def seg_of_position(pos: int) -> int:
        return 1 + sum(1 for p in cut if p < pos)

    forward = {name: seg_of_position(idx.position[name]) for name in idx.forward_order}
    stages = []
    for name in idx.backward_order:
        bop = idx.backward_ops[name]
        if bop.of is not None and bop.of in idx.position:
            pos = idx.position[bop.of]
        else:
            reads = set().union(*(impl.reads for impl in bop.impls)) if bop.impls else set()
            positions = [idx.position[idx.producing_op(r)] for r in reads if idx.producing_op(r) in idx.position]
            pos = max(positions, default=0)
        stages.append(seg_of_position(pos))
    return forward, stages


def revolve_schedule(
    network: Network,
    impls: dict[str, str],
    slots: int,
    *,
    keep: set[str] = frozenset(),
    never: set[str] = frozenset(),
    spec_path: str,
    fingerprint: str,
) -> Schedule:
    """The revolve schedule with ``slots`` checkpoint slots."""
    idx = index(network)
    checkpoints = checkpoint_candidates(network)
    l = len(checkpoints) + 1
    forward_seg, stage_seg = _segments(network, checkpoints)
    held = dict(revolve_timeline(l, slots))

    def tensors(ks) -> set[str]:
        return {checkpoints[k - 1] for k in ks if k >= 1}

    T = len(idx.backward_order)
    carry = [set() for _ in range(T + 1)]
    carry[0] = tensors(held.get(stage_seg[0], ())) | set(keep) if T else set(keep)
    for t in range(1, T + 1):
        mine = held.get(stage_seg[t - 1], frozenset())
        if t < T and stage_seg[t] != stage_seg[t - 1]:
            mine = mine & held.get(stage_seg[t], frozenset())
        carry[t] = tensors(mine)

    def promote(t: int, x: str) -> bool:
        """Carry what the segment being reversed recomputes: its own tensors and its input."""
        j = stage_seg[t - 1]
        producer = idx.producing_op(x)
        if producer is not None and forward_seg.get(producer) == j:
            return True
        return j >= 2 and x == checkpoints[j - 2]

    return schedule_from_carry(
        network, impls, carry, never_recompute=never, promote=promote, spec_path=spec_path, fingerprint=fingerprint
    )


def revolve(network: Network, constraints: ResolvedConstraints | None = None, *, spec_path: str, fingerprint: str) -> Schedule:
    """Revolve with the slot count the constraints prefer."""
    impls, keep, never = _setup(network, constraints)
    m = len(checkpoint_candidates(network))
    plans = [
        revolve_schedule(network, impls, s, keep=keep, never=never, spec_path=spec_path, fingerprint=fingerprint)
        for s in range(0, m + 1)
    ]
    return pick_schedule(network, plans, constraints)
