"""The runtime form of a batch-sliced segment: per-sample modules run slice by slice.

:class:`SlicedSegment` wraps a chain of per-sample modules (convolutions, activations,
pooling; what :mod:`monetdsl.slicing.runs` accepts) and runs them as the segment's
``slicedK`` implementations define (:mod:`monetdsl.slicing.segment`): the forward runs each
slice through the whole chain without autograd and writes only the slice of the output;
the backward recomputes each slice with autograd, backpropagates the slice of the
output's gradient, writes the slice of the input gradient and adds up the parameter
gradients. Nothing inside the chain outlives a slice, so the memory held is the segment's
input and output (and their gradients) plus one slice's working set.

The chain must be free of cross-sample effects and of randomness (batch norm in training
mode, dropout): the slices then give exactly the gradients of the whole batch, up to the
order in which floating-point sums are taken.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SlicedSegment", "slice_bounds"]


def slice_bounds(batch: int, slices: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each slice: ``ceil(batch / slices)`` samples, the last one shorter."""
    if not 1 <= slices <= batch:
        raise ValueError(f"a batch of {batch} cannot be cut into {slices} slices")
    rows = -(-batch // slices)
    return [(start, min(start + rows, batch)) for start in range(0, batch, rows)]


class _SlicedRun(torch.autograd.Function):
    """Forward without saving anything inside the chain; backward by recomputed slices."""

    @staticmethod
    def forward(ctx, chain: nn.Module, forward_slices: int, backward_slices: int, x: torch.Tensor, *params):
        ctx.chain, ctx.backward_slices = chain, backward_slices
        ctx.save_for_backward(x)
        out = None
        with torch.no_grad():
            for start, stop in slice_bounds(x.shape[0], forward_slices):
                piece = chain(x[start:stop])
                if out is None:
                    out = piece.new_empty((x.shape[0], *piece.shape[1:]))
                out[start:stop] = piece
                del piece
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        chain = ctx.chain
        params = [p for p in chain.parameters() if p.requires_grad]
        wants_x = ctx.needs_input_grad[3]
        grad_x = torch.empty_like(x) if wants_x else None
        grad_params = [None] * len(params)
        for start, stop in slice_bounds(x.shape[0], ctx.backward_slices):
            with torch.enable_grad():
                piece_in = x[start:stop].detach().requires_grad_(wants_x)
                piece_out = chain(piece_in)
                wrt = ([piece_in] if wants_x else []) + params
                grads = torch.autograd.grad(piece_out, wrt, grad_out[start:stop])
            del piece_out
            if wants_x:
                grad_x[start:stop] = grads[0]
                grads = grads[1:]
            for i, g in enumerate(grads):
                if grad_params[i] is None:
                    grad_params[i] = g
                else:
                    grad_params[i] += g
            del grads
        return (None, None, None, grad_x, *grad_params)


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
