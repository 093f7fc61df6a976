"""From "what is carried after each stage" to a complete schedule (Checkmate's R from S).

:func:`~monetdsl.search.schedule_builder.build_schedule` starts from the forward keep set
only. Revolve and the rounding of Checkmate's LP relaxation decide more: which tensors are
carried after *every* stage, including tensors recomputed in a backward stage and carried
on to later ones. :func:`schedule_from_carry` takes that plan (``carry[t]`` for stage ``t``,
``carry[0]`` being the forward keep set) and derives the rest in closed form:

* each stage recomputes, in forward order, the fewest ops that produce what the stage
  reads and what the plan carries out of it but was not carried in (a closure over
  producers, as in the R-from-S step of Checkmate);
* a tensor a recomputation must read but cannot get by recomputing (a recompute-read
  produced by the op itself, or by an op that may never be recomputed) is carried from the
  forward pass instead;
* every carried tensor is freed after the last stage that reads it, whatever the plan
  said, so rounding noise never costs memory.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..graph import index
from ..ir import Network, Schedule, StagePlan
from .schedule_builder import backward_reads

__all__ = ["schedule_from_carry"]


def schedule_from_carry(
    network: Network,
    impls: dict[str, str],
    carry: Sequence[set[str]],
    *,
    never_recompute: set[str] = frozenset(),
    promote: Callable[[int, str], bool] | None = None,
    spec_path: str,
    fingerprint: str,
) -> Schedule:
    """A schedule carrying ``carry[t]`` after stage ``t`` (``len(carry)`` = stages + 1).

    ``promote(t, x)`` may carry a tensor recomputed in stage ``t`` on to the last stage that
    reads it (Chen-style segment recomputation); ``never_recompute`` ops have their outputs carried
    from the forward pass when a stage needs them.
    """
    idx = index(network)
    order = idx.backward_order
    T = len(order)
    if len(carry) != T + 1:
        raise ValueError(f"carry has {len(carry)} entries, the network has {T} stages (+1 for the forward pass)")
    impls = {op.name: impls.get(op.name, op.impls[0].name) for op in (*network.forward_ops, *network.backward_ops)}
    outputs = set(network.outputs)

    def producible(x: str) -> bool:
        if not idx.is_forward_tensor(x):
            return False
        if x in idx.derived_by:
            op = idx.derived_by[x][0]
            return x in idx.forward_ops[op].impl(impls[op]).derived
        return True

    plan = [{x for x in c if producible(x)} for c in carry]
    reads = backward_reads(network, impls, order)
    for _ in range(len(network.tensors) + 2):
        stages, extra = _stages(network, idx, impls, plan, reads, never_recompute, promote, outputs)
        if not extra:
            break
        for t, x in extra:
            for s in range(t):
                plan[s].add(x)
    stages, forward_keep = _trim(network, idx, impls, plan[0], stages, reads, outputs)
    choices = {op: impl for op, impl in impls.items() if len(network.op(op).impls) > 1}
    return Schedule(spec_path, fingerprint, choices, forward_keep, tuple(stages))


def _stages(network, idx, impls, plan, reads, never, promote, outputs):
    tensors = network.tensors
    carried = set(plan[0]) | outputs
    stages = []
    extra: list[tuple[int, str]] = []
    promoted: set[str] = set()  # carried on until their last read (see _trim)
    for t, name in enumerate(idx.backward_order, start=1):
        wanted = set(plan[t])
        needed = set(reads[t - 1]) | (wanted - carried)
        ops: set[str] = set()
        made: set[str] = set()
        stack = [x for x in needed if x not in carried]
        while stack:
            x = stack.pop()
            if x in made or x in carried or tensors[x].is_fixed:
                continue
            producer = idx.producing_op(x)
            if producer is None:
                continue
            if producer in never:
                extra.append((t, x))
                continue
            op = idx.forward_ops[producer]
            impl = op.impl(impls[producer])
            if x in idx.derived_by and x not in impl.derived:
                continue  # the chosen implementation never makes it: the simulator will say so
            if producer in ops:
                continue
            ops.add(producer)
            made.update(op.outputs)
            made.update(impl.derived)
            for inp in op.inputs:
                if inp not in carried and not tensors[inp].is_fixed:
                    stack.append(inp)
            for inp in impl.recompute_reads:
                if inp in carried or tensors[inp].is_fixed:
                    continue
                source = idx.producing_op(inp)
                if source == producer or source in never:
                    extra.append((t, inp))  # cannot be recomputed: carry it from the forward pass
                else:
                    stack.append(inp)
        recompute = tuple(sorted(ops, key=lambda n: idx.position[n]))
        after = (carried & wanted) | (made & wanted) | outputs | (carried & promoted)
        if promote is not None:
            newly = {x for x in made if promote(t, x)}
            promoted |= newly
            after |= newly
        keep = tuple(sorted(after - carried))
        free = tuple(sorted(carried - after - outputs))
        stages.append(StagePlan(name, recompute, keep, free))
        carried = after
    return stages, extra


def _trim(network, idx, impls, forward_keep, stages, reads, outputs):
    """Free every carried tensor right after the last stage that reads it."""
    last: dict[str, int] = {}
    for t, stage in enumerate(stages, start=1):
        for x in reads[t - 1]:
            last[x] = t
        for op_name in stage.recompute:
            op = idx.forward_ops[op_name]
            impl = op.impl(impls[op_name])
            for x in (*op.inputs, *impl.recompute_reads):
                last[x] = t
    carried = {x for x in forward_keep if last.get(x, 0) >= 1} | outputs
    keep0 = tuple(sorted(carried - outputs, key=lambda x: (idx.position.get(idx.producing_op(x), -1), x)))
    result = []
    for t, stage in enumerate(stages, start=1):
        before = set(carried)
        after = (before | set(stage.keep)) - set(stage.free)
        after = {x for x in after if x in outputs or last.get(x, 0) > t}
        keep = tuple(sorted(after - before))
        free = tuple(sorted(before - after))
        result.append(StagePlan(stage.backward, stage.recompute, keep, free))
        carried = after
    return result, keep0
