"""Planned nodes: a layer in a stretch whose backward runs the plan's own steps, in order.

Autograd runs a layer's backward as one node that makes every gradient at once: a
convolution's ``convolution_backward`` holds its input while it makes the input's
gradient. The plan may do better: make the weight gradient first, free the input, then
make the input gradient. Where the input is large (a decoder's convolution reading a skip
``cat``, 19 % of a small UNet's peak) that node does not fit the plan's peak, and the
layer used to run step by step, cutting the stretch around it in pieces too short to run
under the engine (x1.14-1.22 of eager's step against x1.02 without the cut).

A :class:`PlannedNode` records such a layer in its stretch as an autograd function whose
backward runs the plan's backward steps of the layer (the same kernels the step-by-step
runtime runs, so the same gradients and workspaces), in the plan's stage order, dropping
each input after the last of them that reads it. The parameters' gradients go back to
the engine, which adds them into ``.grad`` when the node returns: until then they are
held beside the later steps, the only bytes beyond the plan
(:func:`planned_node_overshoot`, charged like the engine's other excess).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ir import Network, TensorKind, grad_name

__all__ = ["NodeSpec", "PlannedNode", "node_spec", "planned_node_overshoot"]


@dataclass(frozen=True)
class NodeSpec:
    """One layer's forward step and its backward steps in the plan's order: ``reads``
    the forward step's inputs (the node's inputs), ``writes`` its outputs; per backward
    step its function, the names it reads and writes, and the names no later step reads
    (dropped after it)."""

    forward: Callable
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    held: tuple[str, ...]  # forward inputs the backward steps read
    steps: tuple[tuple[Callable, tuple[str, ...], tuple[str, ...], tuple[str, ...]], ...]


class PlannedNode(torch.autograd.Function):
    """A layer whose backward is the plan's steps (:class:`NodeSpec`). Its inputs are held
    as plain references, not saved tensors, so each is dropped after its last reader."""

    @staticmethod
    def forward(ctx, spec: NodeSpec, *values):
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        out = tuple(spec.forward(*values))
        ctx.held = {n: v for n, v in zip(spec.reads, values) if n in spec.held}
        # its own outputs held as detached aliases: the output itself would keep this node alive
        ctx.held.update((n, v.detach()) for n, v in zip(spec.writes, out) if n in spec.held)
        return out

    @staticmethod
    def backward(ctx, *grads):
        spec, held = ctx.spec, ctx.held
        ctx.held = None  # the node outlives the call (a kept output's grad_fn reaches it)
        for name, g in zip(spec.writes, grads):
            if g is not None:
                held[grad_name(name)] = g
        grads = None
        for fn, reads, writes, drop in spec.steps:
            result = fn(*(held[n] for n in reads))
            held.update(zip(writes, result))
            result = None
            for n in drop:
                held.pop(n, None)
        return (None, *(held.pop(grad_name(n), None) for n in spec.reads))


def node_spec(network: Network, program, op: str, bops: list[str], stage_of: dict, impls: dict) -> NodeSpec | None:
    """The :class:`NodeSpec` of ``op`` with backward ops ``bops``, or None when a planned
    node cannot run it: its backward steps must fill consecutive stages and read only the
    op's inputs, its outputs (a ReLU's or batch norm's backward from its output; held as
    detached aliases, so the node does not keep itself alive) and its outputs'
    gradients, and neither it nor they (``impls``: the schedule's) may write in place or
    add into ``.grad`` themselves. A backward written over its output's gradient
    (``from_output_inplace``) is refused: the engine may hand the same gradient tensor to
    another node (an ``add``'s backward passes its incoming one to both inputs), where
    the plan gives every gradient a storage of its own."""
    stages = sorted(stage_of.get(b, -1) for b in bops)
    if not bops or stages[0] < 0 or stages != list(range(stages[0], stages[-1] + 1)):
        return None
    forward = program.forward[op]
    readable = set(forward.reads) | set(forward.writes) | {grad_name(n) for n in forward.writes}
    ordered = sorted(bops, key=stage_of.__getitem__)
    steps = [program.backward[b] for b in ordered]
    overwriting = any(network.op(b).impl(impls.get(b, network.op(b).impls[0].name)).overwrites is not None for b in bops)
    if overwriting or forward.overwrites is not None or any(s.accumulates or s.overwrites is not None
                                                            or not set(s.reads) <= readable for s in steps):
        return None
    planned = []
    for k, s in enumerate(steps):
        later = {n for t in steps[k + 1:] for n in t.reads}
        drop = tuple(n for n in s.reads if n not in later)
        planned.append((s.fn, s.reads, s.writes, drop))
    held = tuple(n for n in (*forward.reads, *forward.writes) if any(n in s.reads for s in steps))
    return NodeSpec(forward.fn, forward.reads, forward.writes, held, tuple(planned))


def planned_node_overshoot(network: Network, bops: list[str], stage_of: dict, headroom: dict) -> int:
    """The bytes a planned node of an op with backward ops ``bops`` reaches above the
    plan's peak: at each stage after the first, the parameters' gradients its earlier
    steps made (the plan has added them into ``.grad``; the engine gets them when the node
    returns)."""
    params = {grad_name(n) for n, t in network.tensors.items() if t.kind is TensorKind.PARAM}
    made_before, worst = 0, None
    for b in sorted(bops, key=stage_of.__getitem__):
        t = stage_of[b]
        over = made_before - headroom.get(t, 0)
        worst = over if worst is None else max(worst, over)
        made_before += sum(network.tensors[n].nbytes for n in network.op(b).outputs if n in params)
    return worst if worst is not None else 0
