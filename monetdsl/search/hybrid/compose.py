"""From "which ops each stage recomputes" to a complete schedule, and re-forward closures.

The hybrid engine decides, per block, an implementation choice and a per-stage list of
recomputations (the block's menu option), and, across blocks, which forward passes to
re-run in which stage (the chain DP). What remains, which tensors the forward pass keeps
and which ones each stage keeps or frees, follows from those lists by *liveness*: a tensor
is carried out of a stage exactly when a later stage reads it before producing it again.
:func:`schedule_from_recomputes` derives it, so the carries never hold more than the
reads require. The simulator then replays the result; nothing here is trusted alone.

:func:`forward_closure` is the set of forward ops a re-run of a block's forward needs to
produce some tensors from what is present (the block's inputs and the tensors it cannot
recompute, such as saved batch statistics read back by a recomputation).
"""
from __future__ import annotations

from typing import Iterable, Sequence

from ...graph import index
from ...ir import Network, Schedule, StagePlan, TensorKind

__all__ = ["forward_closure", "sticky_tensors", "schedule_from_recomputes", "full_impls"]


def full_impls(network: Network, impls: dict[str, str]) -> dict[str, str]:
    """``impls`` completed with the only implementation of every single-implementation op."""
    return {op.name: impls.get(op.name, op.impls[0].name) for op in (*network.forward_ops, *network.backward_ops)}


def sticky_tensors(network: Network, impls: dict[str, str], ops: Iterable[str]) -> set[str]:
    """Tensors that re-running ``ops`` (in forward order) reads but cannot produce first:
    recompute reads made by the op itself or by a later op of ``ops``."""
    idx = index(network)
    ops = list(ops)
    pos = {name: idx.position[name] for name in ops}
    result = set()
    for name in ops:
        impl = idx.forward_ops[name].impl(impls[name])
        for r in impl.recompute_reads:
            producer = idx.producing_op(r)
            if producer in pos and pos[producer] >= pos[name]:
                result.add(r)
    return result


def forward_closure(network: Network, impls: dict[str, str], targets: Iterable[str], ops: Iterable[str]) -> tuple[str, ...]:
    """The ops among ``ops`` that must run, in forward order, to produce ``targets``.

    Tensors produced outside ``ops`` are taken as present; a recompute read that the op
    itself or a later op of ``ops`` produces is taken as present too (it is sticky:
    carried from the first forward pass)."""
    idx = index(network)
    allowed = set(ops)
    sticky = sticky_tensors(network, impls, allowed)
    needed: set[str] = set()
    stack = [t for t in targets if t not in sticky]
    seen: set[str] = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        producer = idx.producing_op(t)
        if producer is None or producer not in allowed:
            continue
        op = idx.forward_ops[producer]
        impl = op.impl(impls[producer])
        if t in idx.derived_by and t not in impl.derived:
            continue
        if producer in needed:
            continue
        needed.add(producer)
        for x in op.inputs:
            if x not in sticky:
                stack.append(x)
        for x in impl.recompute_reads:
            if x not in sticky:
                stack.append(x)
    return tuple(sorted(needed, key=lambda n: idx.position[n]))


def _step_io(network: Network, idx, impls: dict[str, str], kind: str, name: str):
    """(reads, produces, destroys) of one step, forward tensors only."""
    tensors = network.tensors
    if kind == "backward":
        impl = idx.backward_ops[name].impl(impls[name])
        return [r for r in impl.reads if idx.is_forward_tensor(r)], [], []
    op = idx.forward_ops[name]
    impl = op.impl(impls[name])
    reads = [r for r in op.inputs if idx.is_forward_tensor(r)]
    if kind == "recompute":
        reads += [r for r in sorted(impl.recompute_reads) if idx.is_forward_tensor(r)]
    produces = [o for o in (*op.outputs, *impl.derived) if tensors[o].kind is not TensorKind.GRADIENT]
    destroys = []
    if impl.overwrites is not None:
        destroys.append(impl.overwrites)
        destroys.extend(t for t, v in tensors.items() if v.view_of == impl.overwrites)
    return reads, produces, destroys


def schedule_from_recomputes(
    network: Network,
    impls: dict[str, str],
    recomputes: Sequence[Sequence[str]],
    *,
    spec_path: str,
    fingerprint: str,
) -> Schedule:
    """The schedule that recomputes ``recomputes[t]`` before the ``t``-th backward op.

    ``recomputes`` follows the canonical backward order; each list is run in forward order.
    Recomputations whose outputs would all be present already are dropped (the simulator
    refuses them, and they would only cost time). Carries follow by liveness.
    """
    idx = index(network)
    order = idx.backward_order
    if len(recomputes) != len(order):
        raise ValueError(f"{len(recomputes)} recompute lists for {len(order)} backward stages")
    impls = full_impls(network, impls)
    lists = [sorted(dict.fromkeys(r), key=lambda n: idx.position[n]) for r in recomputes]
    for _ in range(len(network.forward_ops) + 2):
        carries = _liveness(network, idx, impls, lists)
        dropped = _useless(network, idx, impls, lists, carries)
        if not dropped:
            break
        lists = [[n for n in lst if (t, n) not in dropped] for t, lst in enumerate(lists)]
    outputs = set(network.outputs)
    forward_keep = tuple(sorted((carries[0] - outputs), key=lambda x: (idx.position.get(idx.producing_op(x), -1), x)))
    stages = []
    for t, name in enumerate(order, start=1):
        before, after = carries[t - 1], carries[t]
        keep = tuple(sorted(after - before - outputs))
        free = tuple(sorted(before - after - outputs))
        stages.append(StagePlan(name, tuple(lists[t - 1]), keep, free))
    choices = {op: impl for op, impl in impls.items() if len(network.op(op).impls) > 1}
    return Schedule(spec_path, fingerprint, choices, forward_keep, tuple(stages))


def _stage_steps(idx, t: int, lists):
    if t == 0:
        return [("forward", n) for n in idx.forward_order]
    return [("recompute", n) for n in lists[t - 1]] + [("backward", idx.backward_order[t - 1])]


def _liveness(network: Network, idx, impls, lists) -> list[set[str]]:
    """``carries[t]``: forward tensors carried out of stage ``t`` (0 = the forward pass)."""
    T = len(idx.backward_order)
    # per stage: tensors read before this stage produces them ("needs from before"), and
    # tensors this stage produces or destroys (which ends the life of an earlier copy)
    needs_in: list[set[str]] = []
    ends: list[set[str]] = []
    for t in range(T + 1):
        produced: set[str] = set()
        need: set[str] = set()
        killed: set[str] = set()
        for kind, name in _stage_steps(idx, t, lists):
            reads, produces, destroys = _step_io(network, idx, impls, kind, name)
            for r in reads:
                if r not in produced:
                    need.add(r)
            produced.update(produces)
            for d in destroys:
                produced.discard(d)
                killed.add(d)
        needs_in.append(need)
        ends.append(produced | killed)
    outputs = set(network.outputs)
    carries: list[set[str]] = [set() for _ in range(T + 1)]
    live: set[str] = set()  # needed from before stage t+1
    for t in range(T, -1, -1):
        carries[t] = set(live)
        # what stage t needs from before it: its own needs, plus what is live after it
        # and that it neither produces nor destroys
        live = needs_in[t] | (live - ends[t]) if t > 0 else set()
    # a stage can only carry what exists at its end
    present: set[str] = set()
    for t in range(T + 1):
        produced_here: set[str] = set()
        killed: set[str] = set()
        for kind, name in _stage_steps(idx, t, lists):
            _, produces, destroys = _step_io(network, idx, impls, kind, name)
            produced_here.update(produces)
            for d in destroys:
                produced_here.discard(d)
                killed.add(d)
        present = ((present - killed) | produced_here)
        carries[t] = (carries[t] & present) | (outputs & present)
        present = set(carries[t])
    return carries


def _useless(network, idx, impls, lists, carries) -> set[tuple[int, str]]:
    """(stage index, op) of recomputations whose outputs are all present when they run."""
    tensors = network.tensors
    dropped = set()
    for t, lst in enumerate(lists):
        present = set(carries[t])
        for name in lst:
            op = idx.forward_ops[name]
            impl = op.impl(impls[name])
            outs = [o for o in (*op.outputs, *impl.derived) if tensors[o].kind is not TensorKind.GRADIENT]
            if outs and all(o in present for o in outs):
                dropped.add((t, name))
            present.update(outs)
            if impl.overwrites is not None:
                present.discard(impl.overwrites)
    return dropped
