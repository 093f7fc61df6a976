"""A batch-sliced segment: one op that runs a chain of per-sample ops slice by slice.

At the widest layers of a CNN no schedule of single ops goes below the size of one op's
input plus its output: the op holds both at once. A segment runs a chain of per-sample ops
(:mod:`.runs`) on ``ceil(batch / k)`` samples at a time:

* forward: each slice goes through the whole chain and only its slice of the chain's
  result is written; nothing inside the chain is kept;
* backward: each slice's forward is recomputed and backpropagated; the parameter gradients
  are added up over the slices, the slice of the input gradient is written.

Gradients are exact (sums over samples). The segment is an ordinary op of the spec: its
forward implementation ``slicedK`` and its backward implementation ``slicedK`` (chosen
independently, ``K`` slices each, ``sliced1`` being the whole batch at once) carry the
times and the workspaces defined here and nowhere else, so the simulator, the MILP, the
hybrid and the runtime's plan all account for it alike.

**Memory** (the workspace, besides the segment's input and output, which the memory model
counts as tensors): with ``s_i`` the slice of op ``i``'s output (plus its implementation's
derived tensors, e.g. max-pool indices) and ``g_i`` the slice of its gradient,

* forward: ``max_i (s_{i-1} + s_i + w_i)`` — the slice of the segment's input is a view;
  each op's output is released once the next op has read it;
* backward: ``sum_i s_i`` (autograd keeps at most every intermediate of the slice) ``+
  max_i (g_i + g_{i-1} + v_i)`` (the gradient flowing in and out of the op being
  differentiated, ``g_0`` the slice of the input gradient when the input has one, the
  last op's incoming gradient a view of the segment's) ``+`` the parameters' bytes twice
  (the sums of the parameter gradients so far and the slice's own before they are added
  in; once for one slice);

with ``w_i``/``v_i`` the workspaces of the ops' first (PyTorch's) implementations, taken
whole (a bound: they rarely shrink with the batch). It is an upper bound of what PyTorch's
autograd holds for one slice; the runtime's allocator is checked against it in the tests.

**Time**: the ops' first implementations, forward (and for the backward, the recomputed
forward plus the backward); each op run on ``k`` slices costs ``k - 1`` more kernel launch
fees (``kernel_fee_us``, the roofline's per-kernel overhead) than on the whole batch: a
roofline time is ``fee + max(flops / peak, bytes / bandwidth)`` and the second term
splits over the slices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import SpecError
from ..ir import (BackwardImpl, BackwardOp, ForwardImpl, ForwardOp, Network, Spec, Tensor, TensorKind, grad_name,
                  shape_bytes)
from ..grammar import parse_spec
from ..grammar.printer import format_spec
from ..validate import validate_network
from .runs import Run, batch_input, block_width

__all__ = ["DEFAULT_SLICES", "DEFAULT_KERNEL_FEE_US", "SegmentCosts", "segment_costs", "offered_costs", "segment_name",
           "is_segment", "slice_count", "segment_members", "sliced_network", "sliced_spec"]

#: a segment's implementation names: the slice count after the word (written and read here only)
SLICED_IMPL = "sliced{slices}"
#: slice counts a segment may be offered (those above the batch are left out)
DEFAULT_SLICES = (1, 2, 4, 8, 16, 32)
#: the roofline's per-kernel overhead on the shipped specs' P100 preset
DEFAULT_KERNEL_FEE_US = 5.0


@dataclass(frozen=True)
class SegmentCosts:
    """What running a segment in ``slices`` slices costs: times and workspaces."""

    slices: int
    forward_us: float
    forward_workspace: int
    backward_us: float
    backward_workspace: int


def _slice_bytes(tensor: Tensor, rows: int) -> int:
    return shape_bytes(tensor.dtype, (rows, *tensor.shape[1:]))


def segment_name(run: Run) -> str:
    """The segment op's name: its first and last op, ``features.0..features.4``."""
    return f"{run.ops[0]}..{run.ops[-1]}"


def is_segment(op: ForwardOp) -> bool:
    """Whether ``op`` is a batch-sliced segment: every implementation is ``slicedK``, as
    :func:`sliced_network` writes them (a spec keeps no other mark of it)."""
    return bool(op.impls) and all(re.fullmatch(SLICED_IMPL.format(slices="[0-9]+"), impl.name) for impl in op.impls)


def slice_count(impl_name: str) -> int:
    """``K`` of a segment implementation ``slicedK``."""
    found = re.fullmatch(SLICED_IMPL.format(slices="([0-9]+)"), impl_name)
    if found is None:
        raise SpecError(f"{impl_name} is not a batch-sliced segment's implementation (sliced1, sliced2, ...)")
    return int(found.group(1))


def segment_members(network: Network, segment: str) -> Run:
    """The run of ``network`` (the ops one by one) that the segment op named ``segment``
    (:func:`segment_name`) replaces in its sliced form."""
    order = [op.name for op in network.forward_ops]
    for i, first in enumerate(order):
        if segment.startswith(first + ".."):
            last = segment[len(first) + 2:]
            if last in order[i + 1:]:
                ops = tuple(order[i:order.index(last, i + 1) + 1])
                source = batch_input(network, network.op(ops[0]))
                result = network.op(ops[-1]).outputs[0]
                if source is not None:
                    return Run(ops, source, result, network.tensors[result].shape[0])
    raise SpecError(f"{segment} names no run of ops of {network.name} (a segment is named first..last)")


def _input_has_gradient(network: Network, run: Run) -> bool:
    first = grad_name(run.source)
    return any(first in bop.outputs for bop in network.backward_ops if bop.of == run.ops[0])


def segment_costs(network: Network, run: Run, slices: int, kernel_fee_us: float = DEFAULT_KERNEL_FEE_US) -> SegmentCosts:
    """Times and workspaces of ``run`` as a segment of ``slices`` slices (the module's
    docstring gives the formulas)."""
    if not 1 <= slices <= run.batch:
        raise SpecError(f"a segment of batch {run.batch} cannot run in {slices} slices")
    tensors = network.tensors
    rows = -(-run.batch // slices)
    ops = [network.op(name) for name in run.ops]
    backward = [bop for bop in network.backward_ops if bop.of in run.ops]
    out_slices = []   # s_i: output and derived tensors of op i, one slice
    grad_slices = []  # g_i: the gradient of op i's output, one slice
    for op in ops:
        first = op.impls[0]
        out = tensors[op.outputs[0]]
        out_slices.append(_slice_bytes(out, rows) + sum(_slice_bytes(tensors[d], rows) for d in first.derived))
        grad_slices.append(_slice_bytes(out, rows))
    forward_ws = max((out_slices[i - 1] if i else 0) + out_slices[i] + ops[i].impls[0].workspace
                     for i in range(len(ops)))
    source_grad = _slice_bytes(tensors[run.source], rows) if _input_has_gradient(network, run) else 0
    flowing = []
    for i, op in enumerate(ops):
        incoming = grad_slices[i] if i < len(ops) - 1 else 0  # the last op's is a view of grad(result)
        outgoing = grad_slices[i - 1] if i else source_grad
        own_ws = max((bop.impls[0].workspace for bop in backward if bop.of == op.name), default=0)
        flowing.append(incoming + outgoing + own_ws)
    params = sum(tensors[name].nbytes for op in ops for name in op.inputs if tensors[name].kind is TensorKind.PARAM)
    # the sums of the parameter gradients so far, and the slice's own before they are added
    backward_ws = sum(out_slices) + max(flowing) + params * (1 if slices == 1 else 2)
    launches = (slices - 1) * kernel_fee_us
    forward_us = sum(op.impls[0].time_us for op in ops) + launches * len(ops)
    backward_us = forward_us + sum(bop.impls[0].time_us for bop in backward) + launches * len(backward)
    return SegmentCosts(slices, forward_us, forward_ws, backward_us, backward_ws)


def offered_costs(network: Network, run: Run, slice_counts=None,
                  kernel_fee_us: float = DEFAULT_KERNEL_FEE_US) -> list[SegmentCosts]:
    """The costs of every slice count a segment of ``run`` offers: ``slice_counts`` when
    given; by default those of :data:`DEFAULT_SLICES` whose working sets, forward and
    backward, stay below the run's width (the largest input + output of one of its ops,
    :func:`.runs.block_width`) and, whatever the width, the largest count. Fewer slices
    save only kernel launches; the counts left out would hold more than running the ops
    one by one does, and they crowd the searches' menus with fast but wide alternatives."""
    counts = [k for k in (slice_counts or DEFAULT_SLICES) if 1 <= k <= run.batch]
    if not counts:
        raise SpecError(f"no slice count of {list(slice_counts or DEFAULT_SLICES)} fits a batch of {run.batch}")
    costs = [segment_costs(network, run, k, kernel_fee_us) for k in counts]
    if slice_counts is not None:
        return costs
    width = block_width(network, run)
    narrow = [c for c in costs if max(c.forward_workspace, c.backward_workspace) < width]
    return narrow or costs[-1:]


def _segment_ops(network: Network, run: Run, slice_counts, kernel_fee_us) -> tuple[ForwardOp, BackwardOp]:
    tensors = network.tensors
    ops = [network.op(name) for name in run.ops]
    params = tuple(dict.fromkeys(name for op in ops for name in op.inputs if tensors[name].kind is TensorKind.PARAM))
    param_grads = tuple(grad_name(p) for p in params
                        if any(grad_name(p) in bop.outputs for bop in network.backward_ops if bop.of in run.ops))
    costs = offered_costs(network, run, slice_counts, kernel_fee_us)
    name = segment_name(run)
    forward = ForwardOp(name, (run.source, *params), (run.result,),
                        tuple(ForwardImpl(SLICED_IMPL.format(slices=c.slices), c.forward_us, c.forward_workspace) for c in costs))
    outputs = ((grad_name(run.source),) if _input_has_gradient(network, run) else ()) + param_grads
    reads = frozenset({grad_name(run.result), run.source, *params})
    backward = BackwardOp(f"{name}.backward", outputs,
                          tuple(BackwardImpl(SLICED_IMPL.format(slices=c.slices), reads, c.backward_us, c.backward_workspace,
                                             accumulates=frozenset(param_grads)) for c in costs), of=name)
    return forward, backward


def sliced_network(network: Network, runs: list[Run], slice_counts=None,
                   kernel_fee_us: float = DEFAULT_KERNEL_FEE_US) -> Network:
    """``network`` with every run of ``runs`` replaced by one segment op (and its backward)."""
    members = [name for run in runs for name in run.ops]
    if len(set(members)) != len(members):
        raise SpecError("segments overlap: an op may belong to one segment only")
    for run in runs:
        for name in run.ops:
            if not network.has_op(name) or batch_input(network, network.op(name)) is None:
                raise SpecError(f"op {name} cannot be part of a batch-sliced segment (not a per-sample op)")
    gone_tensors: set[str] = set()
    replaced: dict[str, tuple[ForwardOp, BackwardOp]] = {}
    for run in runs:
        replaced[run.ops[0]] = _segment_ops(network, run, slice_counts, kernel_fee_us)
        for name in run.ops:
            op = network.op(name)
            inner = [o for o in op.outputs if o != run.result]
            inner += [d for impl in op.impls for d in impl.derived]
            gone_tensors.update(inner)
            gone_tensors.update(grad_name(t) for t in inner)
    member_set = set(members)
    forward_ops, backward_ops = [], []
    for op in network.forward_ops:
        if op.name in replaced:
            forward_ops.append(replaced[op.name][0])
        elif op.name not in member_set:
            forward_ops.append(op)
    segment_backward = {replaced[run.ops[0]][1].of: replaced[run.ops[0]][1] for run in runs}
    placed = set()
    for bop in network.backward_ops:
        owner = next((run for run in runs if bop.of in run.ops), None)
        if owner is None:
            backward_ops.append(bop)
            continue
        name = segment_name(owner)
        if name not in placed:  # at the place of the segment's first backward op
            backward_ops.append(segment_backward[name])
            placed.add(name)
    tensors = {name: t for name, t in network.tensors.items() if name not in gone_tensors}
    result = Network(network.name, tensors, tuple(forward_ops), tuple(backward_ops), network.outputs, network.fixed)
    problems = [d.message for d in validate_network(result) if d.severity == "error"]
    if problems:
        raise SpecError("the segments make an invalid network: " + "; ".join(problems))
    return result


def sliced_spec(spec: Spec, runs: list[Run], slice_counts=None,
                kernel_fee_us: float = DEFAULT_KERNEL_FEE_US) -> Spec:
    """``spec`` with ``runs`` as batch-sliced segments; constraints are kept as written (a
    pattern that named an op inside a segment is then reported as matching nothing)."""
    network = sliced_network(spec.network, runs, slice_counts, kernel_fee_us)
    return parse_spec(format_spec(replace(spec, network=network)), spec.path)
