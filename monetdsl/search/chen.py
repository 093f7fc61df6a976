"""Chen et al. (2016) greedy checkpointing over the articulation points.

Chen's greedy rule walks the forward pass accumulating activation bytes and checkpoints
the next articulation tensor (a tensor whose removal cuts the forward graph) once the
running sum exceeds a threshold ``b``; every segment between checkpoints is recomputed
once, when the backward pass enters it. Each ``b`` gives one schedule, so, as Checkmate
does for this baseline, the method tries a ladder of thresholds and keeps the schedule the
constraints prefer: the fastest within the budget, else (with only an overhead cap) the
lowest peak within the cap, else the lowest peak.

``chen-sqrt`` (every ~sqrt(k)-th articulation tensor) lives in :mod:`.baselines`.
"""
from __future__ import annotations

from ..graph import checkpoint_candidates, index
from ..ir import Network, Schedule
from ..validate import ResolvedConstraints
from .baselines import _setup
from .schedule_builder import build_schedule
from .simulator import simulate

__all__ = ["chen_greedy", "greedy_checkpoints", "pick_schedule"]


def _segment_bytes(network: Network, impls: dict[str, str]) -> list[tuple[str, int]]:
    """(tensor, bytes of activations produced since the previous candidate) per candidate."""
    idx = index(network)
    candidates = set(checkpoint_candidates(network))
    result = []
    running = 0
    for name in idx.forward_order:
        op = idx.forward_ops[name]
        impl = op.impl(impls.get(name, op.impls[0].name))
        for out in (*op.outputs, *impl.derived):
            running += network.tensors[out].storage_bytes
            if out in candidates:
                result.append((out, running))
                running = 0
    return result


def greedy_checkpoints(network: Network, impls: dict[str, str], threshold: int) -> tuple[str, ...]:
    """Checkpoint an articulation tensor once more than ``threshold`` bytes accumulated."""
    chosen = []
    running = 0
    for tensor, nbytes in _segment_bytes(network, impls):
        running += nbytes
        if running > threshold:
            chosen.append(tensor)
            running = 0
    return tuple(chosen)


def pick_schedule(network: Network, schedules, constraints: ResolvedConstraints | None) -> Schedule:
    """The schedule the constraints prefer among ``schedules`` (see the module docstring)."""
    sims = []
    for schedule in schedules:
        sim = simulate(network, schedule, constraints=constraints)
        if sim.valid:
            sims.append((schedule, sim))
    if not sims:
        return schedules[0]
    budget = constraints.memory_budget if constraints is not None else None
    cap = constraints.max_overhead if constraints is not None else None
    within_cap = [s for s in sims if cap is None or s[1].overhead <= cap + 1e-12]
    if budget is not None:
        fitting = [s for s in within_cap if s[1].peak_bytes <= budget]
        if fitting:
            return min(fitting, key=lambda s: (s[1].compute_us, s[1].peak_bytes))[0]
    pool = within_cap or sims
    return min(pool, key=lambda s: (s[1].peak_bytes, s[1].compute_us))[0]


def chen_greedy(
    network: Network, constraints: ResolvedConstraints | None = None, *, spec_path: str, fingerprint: str
) -> Schedule:
    """Chen's greedy checkpointing, with the threshold the constraints prefer."""
    impls, keep, never = _setup(network, constraints)
    segments = _segment_bytes(network, impls)
    total = sum(b for _, b in segments)
    thresholds = {0, total}
    acc = 0
    for _, nbytes in segments:  # every prefix sum and every even split of the total
        acc += nbytes
        thresholds.add(acc)
    for k in range(1, len(segments) + 1):
        thresholds.add(total // k)
    plans = []
    seen = set()
    for threshold in sorted(thresholds):
        checkpoints = greedy_checkpoints(network, impls, threshold)
        if checkpoints in seen:
            continue
        seen.add(checkpoints)
        plans.append(
            build_schedule(
                network,
                impls,
                forward_keep=keep | set(checkpoints),
                promote="needed",
                never_recompute=never,
                spec_path=spec_path,
                fingerprint=fingerprint,
            )
        )
    return pick_schedule(network, plans, constraints)
