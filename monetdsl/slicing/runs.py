"""Finding runs of per-sample ops that can be executed slice by slice of the batch.

A batch-sliced segment (:mod:`.segment`) replaces a chain of ops by one op that runs the
chain on one slice of the batch at a time. That is exact only when every op of the chain
treats each sample on its own (convolutions, activations, pooling: no batch statistics,
no reduction over the batch) and when nothing outside the chain sees its inner tensors.

A spec does not say what kind each op is, so a per-sample op is recognised by its
signature: one output and one batch input of the same leading (batch) dimension, every
other input a parameter, no implementation that needs ``recompute reads`` (saved batch
statistics, an RNG seed), no extra outputs (batch norm's mean and inverse deviation), and
backward ops that read only the op's own tensors. Batch norm in training mode, dropout,
losses, reshapes across the batch and concatenations all fail one of these tests. An op
that mixes samples while keeping this signature (an attention over the batch axis written
as one op) would be misjudged; the runtime's slices are checked against the whole batch in
the tests of :mod:`monetdsl.runtime.sliced_segment`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import BackwardOp, ForwardOp, Network, TensorKind, grad_name

__all__ = ["Run", "per_sample_runs", "blocks", "batch_input", "block_width"]


@dataclass(frozen=True)
class Run:
    """Consecutive per-sample ops ``ops`` (forward names, in order): the first reads
    ``source`` (its batch input), each next one reads its predecessor's only output, and the
    last one's output ``result`` is the only tensor of the run used outside it."""

    ops: tuple[str, ...]
    source: str
    result: str
    batch: int


def batch_input(network: Network, op: ForwardOp) -> str | None:
    """The op's one batch input when the op has the signature of a per-sample op, else None."""
    tensors = network.tensors
    if len(op.outputs) != 1:
        return None
    out = tensors[op.outputs[0]]
    if out.view_of is not None or not out.shape or out.dtype is None:
        return None
    batch_inputs = [name for name in op.inputs if tensors[name].kind in (TensorKind.ACTIVATION, TensorKind.INPUT)]
    others = [name for name in op.inputs if name not in batch_inputs]
    if len(batch_inputs) != 1 or any(tensors[name].kind is not TensorKind.PARAM for name in others):
        return None
    source = tensors[batch_inputs[0]]
    if not source.shape or source.shape[0] != out.shape[0] or source.dtype is None:
        return None
    for impl in op.impls:
        if impl.recompute_reads or impl.overwrites not in (None, source.name):
            return None
        if any(not tensors[d].shape or tensors[d].shape[0] != out.shape[0] for d in impl.derived):
            return None
    return source.name


def _own_tensors(op: ForwardOp, source: str) -> set[str]:
    derived = {d for impl in op.impls for d in impl.derived}
    return {source, *op.inputs, *op.outputs, *derived, grad_name(op.outputs[0])}


def _backward_is_local(network: Network, op: ForwardOp, source: str, backward: list[BackwardOp]) -> bool:
    own = _own_tensors(op, source)
    writes = {grad_name(name) for name in op.inputs}
    for bop in backward:
        if any(not (impl.reads <= own) for impl in bop.impls) or not set(bop.outputs) <= writes:
            return False
    return True


def per_sample_runs(network: Network, min_ops: int = 2) -> list[Run]:
    """Every maximal run of at least ``min_ops`` per-sample ops, in forward order.

    A run ends where its last output is read by two forward ops, is a network output, has a
    gradient or derived tensor that a backward op outside the run reads, or feeds an op that
    is not per-sample."""
    tensors = network.tensors
    consumers: dict[str, list[str]] = {}
    for op in network.forward_ops:
        for name in op.inputs:
            consumers.setdefault(name, []).append(op.name)
    backward_of: dict[str, list[BackwardOp]] = {}
    readers: dict[str, set[str]] = {}
    for bop in network.backward_ops:
        backward_of.setdefault(bop.of or "", []).append(bop)
        for impl in bop.impls:
            for name in impl.reads:
                readers.setdefault(name, set()).add(bop.of or bop.name)

    def eligible(op: ForwardOp) -> str | None:
        source = batch_input(network, op)
        if source is None or not _backward_is_local(network, op, source, backward_of.get(op.name, [])):
            return None
        return source

    def inner_ok(prev: ForwardOp, nxt: ForwardOp) -> bool:
        out = prev.outputs[0]
        if consumers.get(out) != [nxt.name] or out in network.outputs:
            return False
        inner = {out, grad_name(out), *(d for impl in prev.impls for d in impl.derived)}
        return all(readers.get(name, set()) <= {prev.name, nxt.name} for name in inner)

    runs: list[Run] = []
    current: list[ForwardOp] = []
    source = None

    def close() -> None:
        if len(current) >= min_ops:
            last = current[-1].outputs[0]
            runs.append(Run(tuple(op.name for op in current), source, last, tensors[last].shape[0]))

    for op in network.forward_ops:
        op_source = eligible(op)
        if op_source is not None and current and op_source == current[-1].outputs[0] and inner_ok(current[-1], op):
            current.append(op)
            continue
        close()
        current, source = ([op], op_source) if op_source is not None else ([], None)
    close()
    return runs


def blocks(network: Network, run: Run, min_ops: int = 2) -> list[Run]:
    """``run`` cut after every op whose output has fewer elements than its input (a pooling,
    a strided convolution): the stages of a VGG-style network, each a candidate segment."""
    tensors = network.tensors
    pieces: list[Run] = []
    start = 0
    source = run.source
    for i, name in enumerate(run.ops):
        op = network.op(name)
        inp, out = tensors[batch_input(network, op)], tensors[op.outputs[0]]
        shrinks = _numel(out.shape) < _numel(inp.shape)
        if shrinks or i == len(run.ops) - 1:
            ops = run.ops[start:i + 1]
            if len(ops) >= min_ops:
                pieces.append(Run(ops, source, out.name, run.batch))
            start, source = i + 1, out.name
    return pieces


def block_width(network: Network, run: Run) -> int:
    """The largest input + output of one op of ``run`` (bytes): the least that running the
    run op by op must hold at once besides fixed memory."""
    tensors = network.tensors
    width = 0
    for name in run.ops:
        op = network.op(name)
        width = max(width, tensors[batch_input(network, op)].storage_bytes + tensors[op.outputs[0]].storage_bytes)
    return width


def _numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total
