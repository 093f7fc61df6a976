"""The runtime form of a batch-sliced segment: a chain of per-sample ops run slice by slice.

A segment (:mod:`monetdsl.slicing.segment`) runs its chain as its ``slicedK``
implementations define: the forward runs each slice through the whole chain without
autograd and writes only the slice of the output; the backward recomputes each slice
with autograd, backpropagates the slice of the output's gradient, writes the slice of the
input gradient and adds up the parameter gradients. Nothing inside the chain outlives a
slice, so the memory held is the segment's input and output (and their gradients) plus
one slice's working set.

:func:`forward_in_slices` and :func:`backward_in_slices` are that rule, once: the
runtime's lowering of a scheduled segment op (:mod:`.segment_steps`, whose chain is the
member ops' lowered steps) and :class:`SlicedSegment` (an ``nn.Sequential`` wrapped by
hand) both run them.

The chain must be free of cross-sample effects and of randomness (batch norm in training
mode, dropout): the slices then give exactly the gradients of the whole batch, up to the
order in which floating-point sums are taken.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["SlicedSegment", "slice_bounds", "forward_in_slices", "backward_in_slices"]


def slice_bounds(batch: int, slices: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each slice: ``ceil(batch / slices)`` samples, the last one shorter."""
    if not 1 <= slices <= batch:
        raise ValueError(f"a batch of {batch} cannot be cut into {slices} slices")
    rows = -(-batch // slices)
    return [(start, min(start + rows, batch)) for start in range(0, batch, rows)]


def forward_in_slices(chain: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, slices: int) -> torch.Tensor:
    """``chain(x)`` computed ``slices`` slices of the batch at a time, without autograd:
    only the output is allocated whole, each slice's intermediates die with it."""
    out = None
    with torch.no_grad():
        for start, stop in slice_bounds(x.shape[0], slices):
            piece = chain(x[start:stop])
            if out is None:
                out = piece.new_empty((x.shape[0], *piece.shape[1:]))
            out[start:stop] = piece
            del piece
    return out


def backward_in_slices(chain: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: Sequence[torch.Tensor],
                       grad_out: torch.Tensor, slices: int, wants_x: bool,
                       add_param_grad: Callable[[int, torch.Tensor, bool], None]) -> torch.Tensor | None:
    """The gradient of ``chain`` at ``x`` for the output gradient ``grad_out``, slice by
    slice: each slice's forward is recomputed under autograd (``params``: the leaves whose
    gradients are wanted, which ``chain`` reads) and differentiated. Returns the input's
    gradient (None unless ``wants_x``); each slice's parameter gradients go to
    ``add_param_grad(i, gradient, first_slice)``, which sums them where it likes."""
    grad_x = torch.empty_like(x) if wants_x else None
    for k, (start, stop) in enumerate(slice_bounds(x.shape[0], slices)):
        with torch.enable_grad():
            piece_in = x[start:stop].detach().requires_grad_(wants_x)
            piece_out = chain(piece_in)
            wrt = ([piece_in] if wants_x else []) + list(params)
            grads = torch.autograd.grad(piece_out, wrt, grad_out[start:stop], allow_unused=True)
        del piece_out, piece_in
        if wants_x:
            grad_x[start:stop] = grads[0]
            grads = grads[1:]
        for i, g in enumerate(grads):
            if g is not None:
                add_param_grad(i, g, k == 0)
        del grads
    return grad_x


class _SlicedRun(torch.autograd.Function):
    """Forward without saving anything inside the chain; backward by recomputed slices."""

    @staticmethod
    def forward(ctx, chain: nn.Module, forward_slices: int, backward_slices: int, x: torch.Tensor, *params):
        ctx.chain, ctx.backward_slices = chain, backward_slices
        ctx.save_for_backward(x)
        return forward_in_slices(chain, x, forward_slices)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = [p for p in ctx.chain.parameters() if p.requires_grad]
        sums: list = [None] * len(params)

        def add(i: int, g: torch.Tensor, first: bool) -> None:
            if sums[i] is None:
                sums[i] = g
            else:
                sums[i] += g

        grad_x = backward_in_slices(ctx.chain, x, params, grad_out, ctx.backward_slices, ctx.needs_input_grad[3], add)
        return (None, None, None, grad_x, *sums)


class SlicedSegment(nn.Module):
    """``chain`` (an ``nn.Sequential`` of per-sample modules) run in ``forward_slices``
    slices forward and ``backward_slices`` slices backward (the segment's two ``slicedK``
    implementations, chosen independently)."""

    def __init__(self, chain: nn.Module, forward_slices: int = 1, backward_slices: int = 1):
        super().__init__()
        for module in chain.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, nn.modules.dropout._DropoutNd):
                raise ValueError(f"{type(module).__name__} mixes samples or draws random numbers: it cannot run in slices")
        self.chain = chain
        self.forward_slices = forward_slices
        self.backward_slices = backward_slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.chain.parameters() if p.requires_grad]
        return _SlicedRun.apply(self.chain, self.forward_slices, self.backward_slices, x, *params)
