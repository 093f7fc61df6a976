"""Batch-sliced segments in plans made by ``monetdsl.optimize``: which blocks, and their steps.

``monetdsl trace`` writes the widest blocks of per-sample ops as batch-sliced segments
(:mod:`monetdsl.slicing`): one op each, whose ``slicedK`` implementations run the block
``K`` samples at a time and always recompute its forward in the backward. A plan made
under a memory budget does the same (:func:`with_planned_segments`), by the same rule
(:func:`monetdsl.slicing.widest_blocks`: the widest blocks within 10 % of the
no-recompute time, wider than every op outside them), on the costs measured for the plan:
a segment's times and workspaces follow from its member ops' measured ones by the
formulas of :mod:`monetdsl.slicing.segment` (the ones the simulator, the MILP and the
hybrid charge), with the device's per-kernel launch fee for each extra slice.

It does so only where the ops one by one cannot meet the budget: a segment recomputes
its block at every step and pays Python per slice, so a budget an op-by-op schedule meets
is planned op by op. Below the proved op-by-op bound
(:func:`monetdsl.slicing.op_by_op_bound`) the plan is made with segments straight away
(:func:`needs_segments`); between that bound and the store-all peak it is made op by op
first, and with segments only when that search finds no schedule (``build_plan``). Under an overhead cap alone, or with a schedule
file, the plan stays op by op: the segment's forced recomputation counts against the cap
the runtime measures against eager's step. ``monetdsl.optimize(..., segments=False)``
turns it off.

:func:`add_segment_steps` lowers each segment op of a scheduled network: its forward and
recomputation run the member ops' own first-forward steps (the captured calls) slice by
slice, its backward recomputes each slice under autograd and adds the parameters'
gradients into ``.grad`` slice by slice (:mod:`.sliced_segment`). Only blocks whose
member steps can run on a slice are offered (:func:`can_slice`).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir import Network, grad_name
from ..lowering.graphs import LoweringError
from ..lowering.program import AccumulatedGrad, Program, StepFn, first_forward_step
from ..search.impl_choice import cheapest_impls
from ..search.simulator import simulate
from ..slicing import DEFAULT_ALLOWANCE, Run, is_segment, op_by_op_bound, segment_members, slice_count
from ..tracing.api import with_segments
from ..tracing.costs import PRESETS
from ..validate import resolve_constraints
from .calibrate import device_of, store_all_schedule
from .sliced_segment import backward_in_slices, forward_in_slices

__all__ = ["can_slice", "kernel_fee_us", "wants_segments", "needs_segments", "with_planned_segments", "add_segment_steps"]


def kernel_fee_us(inputs) -> float:
    """The launch fee of one kernel on the inputs' device: what each extra slice costs per
    op (the CPU preset's, measured on the development machine; a GPU's from the roofline)."""
    return PRESETS["A100" if device_of(inputs) == "cuda" else "cpu"].overhead_us


def _member_chain(trace, run: Run) -> list[tuple[StepFn, str]] | None:
    """Each member op's first-forward step and the tensor it reads from the previous one
    (its batch input), or None when one cannot run on a slice."""
    network = trace.built.network
    chain, source = [], run.source
    for position, name in enumerate(run.ops):
        step = first_forward_step(trace, network, name, sliced_input=source)
        if step is None or step.accumulates or (position == 0 and step.overwrites is not None):
            return None  # an in-place first op would overwrite the segment's input, which its backward reads
        chain.append((step, source))
        source = network.op(name).outputs[0]
    return chain


def can_slice(trace) -> Callable[[Run], bool]:
    """Whether the runtime can run a block of ``trace`` as a segment: every member op has
    a lowered first forward that reads its batch input whole, no first member writes in
    place over the segment's input."""
    return lambda run: _member_chain(trace, run) is not None


def wants_segments(spec, budget: int | None) -> bool:
    """Whether a plan under ``budget`` should consider segments: only when store-all with
    the fastest implementations the spec's pins allow exceeds it (otherwise nothing needs
    recomputing, and a segment recomputes its block at every step)."""
    if budget is None:
        return False
    network = spec.network
    allowed = resolve_constraints(network, spec.constraints, path=spec.path, source=spec.source).allowed_impls
    schedule = store_all_schedule(network, cheapest_impls(network, allowed), spec.fingerprint)
    return schedule is None or simulate(network, schedule).peak_bytes > budget


def needs_segments(trace, budget: int | None) -> bool:
    """Whether no op-by-op schedule of ``trace`` can meet ``budget``: it is below the
    proved bound every such schedule holds above fixed memory."""
    if budget is None:
        return False
    network = trace.spec.network
    return budget < network.fixed_bytes + op_by_op_bound(network)


def with_planned_segments(trace, inputs, budget: int | None, allowance: float = DEFAULT_ALLOWANCE):
    """``trace`` with the segments a plan under ``budget`` uses (module docstring), or
    ``trace`` itself when none qualifies or none is wanted."""
    if not wants_segments(trace.spec, budget):
        return trace
    return with_segments(trace, allowance, kernel_fee_us=kernel_fee_us(inputs), accept=can_slice(trace),
                         turned_off_by="monetdsl.optimize(..., segments=False)")


def add_segment_steps(trace, network: Network, impls: dict[str, str], program: Program) -> None:
    """Lower every segment op of ``network`` (a sliced form of ``trace``'s network) with
    its chosen ``slicedK`` implementations into ``program``: forward, recomputation and
    backward steps."""
    for op in network.forward_ops:
        if not is_segment(op):
            continue
        run = segment_members(trace.built.network, op.name)
        chain = _member_chain(trace, run)
        if chain is None:
            raise LoweringError(f"{op.name}: the runtime cannot run this block slice by slice (a member op reads its"
                                " batch input through a view, or has no captured call of its own)")
        forward_k = slice_count(impls.get(op.name, op.impls[0].name))
        forward = _forward_fn(chain, op.inputs, forward_k)
        program.forward[op.name] = StepFn(op.name, tuple(op.inputs), tuple(op.outputs), forward)
        program.recompute[op.name] = StepFn(op.name, tuple(op.inputs), tuple(op.outputs), forward)
        bop = next(b for b in network.backward_ops if b.of == op.name)
        impl = bop.impl(impls.get(bop.name, bop.impls[0].name))
        program.backward[bop.name] = _backward_step(chain, op, bop.name, tuple(bop.outputs), slice_count(impl.name),
                                                    program.layouts)


def _run_slice(chain: list[tuple[StepFn, str]], piece: torch.Tensor, values: dict) -> torch.Tensor:
    """One slice through every member op: each step's reads are the previous output (its
    batch input) and the segment's parameters."""
    h = piece
    for step, source in chain:
        h = step.fn(*[h if name == source else values[name] for name in step.reads])[0]
    return h


def _forward_fn(chain, reads: tuple[str, ...], slices: int) -> Callable:
    def forward(*values):
        by_name = dict(zip(reads, values))
        return (forward_in_slices(lambda piece: _run_slice(chain, piece, by_name), values[0], slices),)

    return forward


def _backward_step(chain, op, name: str, writes: tuple[str, ...], slices: int, layouts: dict) -> StepFn:
    """The segment's backward: reads ``grad(result)``, the input and the parameters; writes
    the input's gradient (when it has one) and adds each parameter's into its target."""
    source, params = op.inputs[0], tuple(op.inputs[1:])
    result = op.outputs[0]
    reads = (grad_name(result), source, *params)
    wants_x = grad_name(source) in writes
    param_grads = [g for g in writes if g != grad_name(source)]
    trained = [p for p in params if grad_name(p) in param_grads]
    accumulates = {}
    for p in trained:
        shape, dtype = layouts[p]
        accumulates[grad_name(p)] = AccumulatedGrad(torch.empty(shape, dtype=dtype, device="meta"), covers=True)

    def backward(*values, into=None):
        grad_out, x = values[0], values[1]
        by_name = dict(zip(params, values[2:]))
        if into is None:
            into = step.scratch_targets(x.device)
        leaves = [by_name[p].detach().requires_grad_(True) for p in trained]
        by_name.update(zip(trained, leaves))
        targets = [into[grad_name(p)] for p in trained]

        def add(i: int, g: torch.Tensor, first: bool) -> None:
            target = targets[i]
            if first and target.overwrite:
                target.tensor.copy_(g)
            else:
                target.tensor.add_(g)

        grad_x = backward_in_slices(lambda piece: _run_slice(chain, piece, by_name), x, leaves, grad_out, slices, wants_x, add)
        return ((grad_x,) if wants_x else ()) + (None,) * len(param_grads)

    step = StepFn(name, reads, writes, backward, accumulates=accumulates)
    return step
