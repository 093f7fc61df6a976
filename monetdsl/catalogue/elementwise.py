"""Addition of two same-shaped tensors (residual connections), optionally in place.

The backward of ``a + alpha * b`` reads nothing but the incoming gradient, so the sum can
always overwrite its first operand when nothing later reads it (MONeT's in-place add):
a residual block then needs no new storage for its sum.
"""
from __future__ import annotations

import torch

from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, OpKind

__all__ = ["Add"]


class Add(OpKind):
    name = "add"
    aten = ("add",)
    summary = "add (same shapes): out of place or in place over the first operand"
    flops_per_element = 1.0

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        if len(args) < 2 or len(input_shapes) < 2 or not input_shapes[1]:
            return None  # a scalar operand, or a list argument
        if not (tuple(input_shapes[0]) == tuple(input_shapes[1]) == tuple(output_shapes[0])):
            return None  # broadcasting: the gradient of the smaller operand is a reduction
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        return Binding({"a": args[0], "b": args[1]}, {"y": None}, {"alpha": alpha, "shape": tuple(output_shapes[0])})

    def forward_alts(self, binding):
        return (ForwardAlt("plain"), ForwardAlt("inplace", overwrites="a", doc="the sum overwrites the first operand"))

    def backward_steps(self, binding):
        return (BackwardStep("backward", ("a", "b"), (BackwardAlt("default", ()),)),)

    def forward(self, alt, inputs, attrs, saved=None):
        a, b = inputs["a"], inputs["b"]
        if alt == "inplace":
            return {"y": a.add_(b, alpha=attrs["alpha"])}
        return {"y": torch.add(a, b, alpha=attrs["alpha"])}

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        return {"a": g, "b": g * attrs["alpha"] if attrs["alpha"] != 1 else g}

    def autograd_reference(self, inputs, attrs):
        return {"y": torch.add(inputs["a"], inputs["b"], alpha=attrs["alpha"])}

    def examples(self):
        g = torch.Generator().manual_seed(13)
        a = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
        b = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
        return [({"a": a, "b": b}, {"alpha": 1, "shape": (3, 4, 5)}), ({"a": a, "b": b}, {"alpha": 0.5, "shape": (3, 4, 5)})]
