"""An op whose backward the runtime runs with its own kernels, as one node of autograd's graph.

A convolution's PyTorch backward is, in the runtime, two steps with other kernels than
autograd's combined ``convolution_backward`` (the input gradient as a transposed
convolution, the weight gradient alone): that is what its measured workspaces and times
are, and on the CPU autograd's combined kernel allocated more (grouped and depthwise
convolutions most) and ran slower. Inside a stretch (:mod:`monetdsl.runtime.stretches`)
such an op is recorded as a :class:`PlannedNode`: its forward step runs as planned, the
node saves exactly what its backward steps read, and when the engine reaches it, it runs
those steps in order and hands their gradients back to the engine. The rest of the
stretch stays autograd's own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ir import grad_name

__all__ = ["NodeSteps", "PlannedNode"]


@dataclass(frozen=True)
class NodeSteps:
    """One op's forward step and backward steps by IR name: ``forward`` reads ``reads``
    and writes ``writes``; each backward step is ``(fn, reads, writes)``; ``saved``: the
    reads and writes the backward steps read (what the node keeps)."""

    forward: Callable
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    backward: tuple[tuple[Callable, tuple[str, ...], tuple[str, ...]], ...]
    saved: tuple[str, ...]

    def record(self, *values):
        """The forward step's outputs, recorded as one node of autograd's graph."""
        return PlannedNode.apply(self, *values)


class PlannedNode(torch.autograd.Function):
    """Forward: the op's forward step. Backward: its backward steps, in order."""

    @staticmethod
    def forward(ctx, steps: NodeSteps, *values):
        outs = steps.forward(*values)
        known = dict(zip(steps.reads, values))
        known.update(zip(steps.writes, outs))
        ctx.steps = steps
        ctx.save_for_backward(*(known[n] for n in steps.saved))
        for o in outs:
            if isinstance(o, torch.Tensor) and not o.is_floating_point():
                ctx.mark_non_differentiable(o)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        steps = ctx.steps
        known = dict(zip(steps.saved, ctx.saved_tensors))
        known.update((grad_name(n), g) for n, g in zip(steps.writes, grads))
        made: dict[str, torch.Tensor] = {}
        for fn, reads, writes in steps.backward:
            results = fn(*(known[n] for n in reads))
            for name, value in zip(writes, results):
                made[name] = value if name not in made else made[name] + value
        known.clear()
        return (None, *(made.pop(grad_name(n), None) for n in steps.reads))
