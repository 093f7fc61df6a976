"""Backward alternatives that write the input gradient over the output gradient.

The plan counts such a step as allocating nothing for its result: the incoming gradient
dies at this step and its storage becomes the input gradient
(:func:`monetdsl.validate.backward_overwrite_problem` says when the plan allows it). At
run time the gradient tensor must also really be the storage's only user: a gradient that
PyTorch's own backward returned as a view, an expanded tensor or a tensor shared with
another gradient (an addition's backward hands the same tensor to both inputs) would be
corrupted, so then the step computes its result out of place instead: correct, and the
measured peak shows the extra bytes against the plan.

* ReLU, LeakyReLU and hardtanh, from the output: PyTorch's backward kernels with the
  incoming gradient as their ``out`` (an elementwise kernel may write where it reads).
* The same from the 1-bit mask: the mask applied to ``MASK_CHUNK`` elements at a time, so
  the unpacked bits never exist for the whole tensor.
* A shape-keeping convolution's input gradient: batch slice by batch slice
  (:func:`monetdsl.catalogue.linear.conv_input_grad_over_output`).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..catalogue.linear import conv_input_grad_over_output
from . import ops as _ops  # noqa: F401 - registers torch.ops.monetdsl

__all__ = ["MASK_CHUNK", "may_overwrite", "clamp_backward_inplace", "conv_dgrad_sliced_inplace"]

aten = torch.ops.aten
mops = torch.ops.monetdsl

#: elements of gradient one chunk of the in-place mask backward unpacks (a multiple of 8)
MASK_CHUNK = 1 << 20


def may_overwrite(t: torch.Tensor) -> bool:
    """Whether ``t`` is the only user of a storage it covers exactly: no view of another
    tensor, no other tensor on its storage, no repeated or skipped elements."""
    if t._base is not None or t.requires_grad:
        return False
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size():
        return False
    try:
        users = torch._C._storage_Use_Count(storage._cdata)
    except (AttributeError, RuntimeError):  # a tensor subclass without a real storage
        return True
    return users <= 2  # ``t`` and the ``storage`` object made here


def _mask_over(g: torch.Tensor, bits: torch.Tensor, slope: float) -> None:
    flat = g.view(-1)
    for i0 in range(0, flat.numel(), MASK_CHUNK):
        i1 = min(i0 + MASK_CHUNK, flat.numel())
        mops.masked_grad_(flat[i0:i1], bits[i0 // 8:(i1 + 7) // 8], slope)


def clamp_backward_inplace(kind: str, alt: str, out_of_place: Callable) -> Callable:
    """The ReLU-family backward ``alt`` (``from_output`` or ``from_mask``) written over the
    incoming gradient; ``out_of_place`` (the same alternative) where that is not safe."""
    def run(ctx, saved: dict, grads: dict) -> dict:
        g, a = grads["y"], ctx.attrs
        if not may_overwrite(g) or (alt == "from_mask" and not g.is_contiguous()):
            return out_of_place(ctx, saved, grads)
        if alt == "from_mask":
            _mask_over(g, saved["mask"], float(a.get("slope", 0.0)) if kind == "leaky_relu" else 0.0)
        elif kind == "relu":
            aten.threshold_backward.grad_input(g, saved["y"], 0, grad_input=g)
        elif kind == "leaky_relu":
            aten.leaky_relu_backward.grad_input(g, saved["y"], a["slope"], False, grad_input=g)
        else:
            aten.hardtanh_backward.grad_input(g, saved["y"], a["min"], a["max"], grad_input=g)
        return {"x": g}

    return run


def conv_dgrad_sliced_inplace(ctx, saved: dict, grads: dict) -> dict:
    """A shape-keeping convolution's input gradient over its output gradient, by batch
    slices; the whole transposed convolution where the gradient is not safe to overwrite."""
    g, w, a = grads["y"], saved["w"], ctx.attrs
    if may_overwrite(g):
        return {"x": conv_input_grad_over_output(g, w, a)}
    n = g.dim() - 2
    return {"x": aten.convolution(g, w, None, list(a["stride"]), list(a["padding"]), list(a["dilation"]), True, [0] * n,
                                  a["groups"])}
