"""Turn "what the forward pass keeps" into a complete schedule.

Most heuristics decide only which tensors the forward pass keeps (Checkmate's S matrix at
stage 0); everything else follows: before each backward stage, recompute the cheapest set
of forward ops that produces the tensors the stage reads from what is kept (a closure
over producers, in forward order), optionally carry recomputed tensors to later stages,
and free every kept tensor after the last stage that reads it. This is the closed-form
"R from S" step of Checkmate, extended to implementation choice, derived tensors and
recompute reads.

    >>> from monetdsl.grammar.parser import parse_spec
    >>> net = parse_spec('''
    ... network chain
    ...   tensor x f32[4] input
    ...   op a (x) -> ya f32[4] time 1us
    ...     backward reads (grad(ya), x) -> grad(x) time 1us
    ...   op b (ya) -> yb f32[4] time 1us
    ...     backward reads (grad(yb), ya) -> grad(ya) time 1us
    ...   output yb
    ... ''').network
    >>> sched = build_schedule(net, {}, forward_keep=(), spec_path="chain.monet", fingerprint="0")
    >>> [(s.backward, s.recompute) for s in sched.stages]
    [('b.backward', ('a',)), ('a.backward', ())]
"""
from __future__ import annotations

from typing import Iterable

from ..graph import index
from ..ir import Network, Schedule, StagePlan, TensorKind

__all__ = ["build_schedule", "backward_reads"]


def backward_reads(network: Network, impls: dict[str, str], stage_order: Iterable[str]) -> list[set[str]]:
    """Forward tensors (not fixed, not gradients) each stage's backward op reads."""
    idx = index(network)
    result = []
    for name in stage_order:
        bop = idx.backward_ops[name]
        impl = bop.impl(impls.get(name, bop.impls[0].name))
        result.append({r for r in impl.reads if idx.is_forward_tensor(r)})
    return result


def build_schedule(
    network: Network,
    impls: dict[str, str],
    *,
    forward_keep: Iterable[str],
    promote: str | set[str] = "none",
    never_recompute: Iterable[str] = (),
    pinned: Iterable[str] = (),
    spec_path: str,
    fingerprint: str,
    stage_order: Iterable[str] | None = None,
) -> Schedule:
    """A schedule that keeps ``forward_keep`` after the forward pass and recomputes the rest.

    ``promote`` says which recomputed tensors are carried to later stages instead of being
    recomputed again: ``"none"``, ``"needed"`` (every recomputed tensor a later stage reads,
    which gives Chen-style segment recomputation), or an explicit set of tensor names.
    Outputs of ``never_recompute`` ops, and tensors a recomputation must read
    (``recompute reads``), are added to the forward keep set when a stage needs them.
    Kept tensors no stage reads are dropped from the keep set, except ``pinned`` ones
    (the constraints' ``keep``), which are kept until their last use.
    """
    idx = index(network)
    order = tuple(stage_order) if stage_order is not None else idx.backward_order
    impls = {op.name: impls.get(op.name, op.impls[0].name) for op in (*network.forward_ops, *network.backward_ops)}
    keep = {t for t in forward_keep if idx.is_forward_tensor(t)}
    # an input that an in-place implementation destroys in the forward pass cannot be kept
    keep -= {op.impl(impls[op.name]).overwrites for op in network.forward_ops} - set(pinned)
    never = set(never_recompute)
    for _ in range(len(network.tensors) + 1):
        stages, extra = _plan(network, impls, keep, promote, never, order)
        if not extra:
            break
        keep |= extra
    stages, used_keep = _add_frees(network, keep, stages, order, impls, pinned=set(pinned) & keep)
    choices = {op: impl for op, impl in impls.items() if len(network.op(op).impls) > 1}
    forward_keep_sorted = tuple(sorted(used_keep, key=lambda t: _tensor_position(idx, t)))
    return Schedule(spec_path, fingerprint, choices, forward_keep_sorted, tuple(stages))


def _tensor_position(idx, name: str) -> tuple[int, str]:
    op = idx.producing_op(name)
    return (idx.position.get(op, -1), name)


def _plan(network, impls, keep, promote, never, order):
    """Recompute lists and promotions per stage; also tensors that must be kept instead."""
    idx = index(network)
    tensors = network.tensors
    reads = backward_reads(network, impls, order)
    later_readers: dict[str, int] = {}
    for reads_t in reads:
        for name in reads_t:
            later_readers[name] = later_readers.get(name, 0) + 1
    carried = set(keep) | set(network.outputs)
    # an in-place recomputation in a later stage would destroy a carried input: such
    # tensors are recomputed where they are read instead of being promoted
    overwritten = {op.impl(impls[op.name]).overwrites for op in network.forward_ops} - {None}
    must_keep: set[str] = set()
    stages = []
    for t, name in enumerate(order):
        needed = reads[t]
        ops: set[str] = set()
        stack = [r for r in needed if r not in carried]
        produced_here: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor in produced_here or tensors[tensor].is_fixed or tensor in carried:
                continue
            producer = idx.producing_op(tensor)
            if producer is None:
                continue
            if producer in never:
                must_keep.add(tensor)
                continue
            op = idx.forward_ops[producer]
            impl = op.impl(impls[producer])
            if tensor in idx.derived_by and tensor not in impl.derived:
                continue  # the chosen impl never produces it: the simulator will say so
            if producer not in ops:
                ops.add(producer)
                produced_here.update(op.outputs)
                produced_here.update(impl.derived)
                for inp in op.inputs:
                    if inp not in carried and not tensors[inp].is_fixed:
                        stack.append(inp)
                for inp in impl.recompute_reads:
                    if inp not in carried and not tensors[inp].is_fixed:
                        if idx.producing_op(inp) == producer or idx.producing_op(inp) in never:
                            must_keep.add(inp)  # cannot be produced by recomputing: keep it
                        else:
                            stack.append(inp)
        recompute = tuple(sorted(ops, key=lambda n: idx.position[n]))
        for reads_t_name in needed:
            later_readers[reads_t_name] -= 1
        promoted: list[str] = []
        if promote != "none":
            candidates = set(produced_here) - overwritten
            for tensor in sorted(candidates, key=lambda x: _tensor_position(idx, x)):
                if tensors[tensor].kind is TensorKind.GRADIENT or tensor in carried:
                    continue
                wanted = later_readers.get(tensor, 0) > 0 if promote == "needed" else tensor in promote
                if wanted:
                    promoted.append(tensor)
        carried |= set(promoted)
        stages.append(StagePlan(name, recompute, tuple(promoted), ()))
    return stages, must_keep - keep


def _add_frees(network, keep, stages, order, impls, pinned=frozenset()):
    """Free each carried tensor after the last stage that reads it; drop unused keeps."""
    idx = index(network)
    reads = backward_reads(network, impls, order)
    last_read: dict[str, int] = {}
    for t, stage in enumerate(stages, start=1):
        for name in reads[t - 1]:
            last_read[name] = t
        for op_name in stage.recompute:
            op = idx.forward_ops[op_name]
            impl = op.impl(impls[op_name])
            for name in (*op.inputs, *impl.recompute_reads):
                last_read[name] = t
    outputs = set(network.outputs)
    frees: dict[int, list[str]] = {}
    used_keep = set()
    for name in keep:
        if name in outputs:
            continue
        if name in last_read or name in pinned:
            used_keep.add(name)
            frees.setdefault(last_read.get(name, 1), []).append(name)
    kept_stages = []
    for t, stage in enumerate(stages, start=1):
        promoted = []
        for name in stage.keep:
            if name in outputs:
                continue
            if last_read.get(name, 0) > t:  # carrying pays only if a later stage reads it
                promoted.append(name)
                frees.setdefault(last_read[name], []).append(name)
        kept_stages.append((stage, tuple(promoted)))
    result = []
    for t, (stage, promoted) in enumerate(kept_stages, start=1):
        free = tuple(sorted(frees.get(t, ()), key=lambda x: _tensor_position(idx, x)))
        result.append(StagePlan(stage.backward, stage.recompute, promoted, free))
    return result, used_keep
