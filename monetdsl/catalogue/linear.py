"""Convolutions and matrix products: the two gradients as two backward steps.

``y = conv(x, w) + b`` and ``y = a @ b (+ bias)`` have two independent gradients. Split
into a *weight-gradient* step (reads the input activation) and an *input-gradient* step
(reads only the weight), the input activation can be freed as soon as the first step has
run instead of living until the second. For a product of two activations (attention
scores written as ``bmm``) the steps are ``grad_a`` (reads ``b``) and ``grad_b`` (reads
``a``). Forward and each gradient cost about the same number of FLOPs.

A parameter's gradient is normally a new tensor that autograd then adds into ``.grad``:
for a moment the gradient exists twice (the last 512x512x3x3 convolution of a ResNet-18
makes a 9 MiB temporary, more than all its activations at a small batch). The
``into_grad`` alternatives add it into ``.grad`` directly: a matrix product with one
``addmm_`` (no temporary), a convolution by chunks of output channels (each chunk's
gradient is independent of the others; one chunk of ``WGRAD_CHUNK_BYTES`` at a time).

A 1-d or 2-d convolution's weight gradient is also one matrix product: the output
gradient as ``[out channels, N * positions]`` times the unfolded input (im2col,
``[N * positions, in channels * kernel]``), added into ``.grad`` by one ``addmm_``
(``im2col_into_grad``). Its temporaries are the unfolded input and the two operands laid
out for the product: small where the weight is large (a ResNet's last stage, at 2x2
positions), large in the first layers. On a 2-core CPU it ran 3.4x faster than oneDNN's
weight-gradient kernel plus the add for 512x512x3x3 at 2x2 (1.7 ms against 5.8 ms), and
slower at 16x16 with 64 channels (2.2 ms against 0.8 ms): the planner picks by measured
time and memory.

A convolution that keeps its input's shape (stride 1, as many output channels as input
channels, padding that keeps the size: VGG's 64->64, 128->128... layers) may also write its
input gradient over its output gradient (``sliced_inplace``): samples do not mix in a
convolution, so the input gradient of a slice of the batch needs only that slice of the
output gradient, and is copied over it once made. The step then allocates one slice
(``DGRAD_SLICE_BYTES``) instead of a second gradient the size of the first; the weight
gradient step, which reads the output gradient too, runs before it. A convolution that
changes the shape gets no such alternative: its input gradient needs a storage of another
size, and the memory model frees a gradient's storage whole, not slice by slice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.grad as nn_grad

from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, OpKind

__all__ = ["Convolution", "MatMul", "WGRAD_CHUNK_BYTES", "DGRAD_SLICE_BYTES", "CONV_WEIGHT_GRAD_INTO", "conv_weight_grad",
           "conv_weight_grad_into", "conv_weight_grad_im2col", "conv_weight_grad_im2col_into", "matmul_weight_grad_into",
           "conv_keeps_shape", "conv_input_grad_over_output"]

#: bytes of weight gradient one convolution chunk makes before it is added into ``.grad``
WGRAD_CHUNK_BYTES = 1 << 20

#: bytes of input gradient one batch slice of ``sliced_inplace`` makes before it is copied
#: over the output gradient (64 MiB: a few samples of a 224x224x64 layer, few enough calls)
DGRAD_SLICE_BYTES = 1 << 26

_CONV_INPUT = {1: nn_grad.conv1d_input, 2: nn_grad.conv2d_input, 3: nn_grad.conv3d_input}
_CONV_WEIGHT = {1: nn_grad.conv1d_weight, 2: nn_grad.conv2d_weight, 3: nn_grad.conv3d_weight}
_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


class Convolution(OpKind):
    name = "conv"
    aten = ("convolution",)
    summary = "conv: weight gradient (reads x) and input gradient (reads w) as separate steps"

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        x, w, b, stride, padding, dilation, transposed, output_padding, groups = args[:9]
        spatial = len(input_shapes[0]) - 2
        if transposed or spatial not in _CONV or len(input_shapes[0]) != len(input_shapes[1]):
            return None
        inputs = {"x": x, "w": w}
        if b is not None:
            inputs["b"] = b
        attrs = {"stride": tuple(stride), "padding": tuple(padding), "dilation": tuple(dilation), "groups": int(groups),
                 "shape": tuple(input_shapes[0]), "w_shape": tuple(input_shapes[1]), "bias": b is not None}
        return Binding(inputs, {"y": None}, attrs)

    def forward_alts(self, binding):
        return (ForwardAlt("default"),)

    def backward_steps(self, binding):
        wgrad = ("w", "b") if "b" in binding.inputs else ("w",)
        alts = [BackwardAlt("default", ("x",))]
        if "w" in binding.attrs.get("param_roles", ()) and binding.attrs["groups"] == 1:
            alts.append(BackwardAlt("into_grad", ("x",), "weight gradient added into .grad by output-channel chunks",
                                    accumulates=("w",)))
            if len(binding.attrs["shape"]) in (3, 4):
                alts.append(BackwardAlt("im2col_into_grad", ("x",), "weight gradient by one matrix product of the unfolded"
                                        " input, added into .grad", accumulates=("w",)))
        dgrad = [BackwardAlt("default", ("w",))]
        if conv_keeps_shape(binding.attrs):
            dgrad.append(BackwardAlt("sliced_inplace", ("w",), "input gradient written over the output gradient, batch slice"
                                     " by batch slice", overwrites="y"))
        return (
            BackwardStep("wgrad", wgrad, tuple(alts)),
            BackwardStep("dgrad", ("x",), tuple(dgrad)),
        )

    def temporary_traffic(self, alt, binding, itemsize):
        """``im2col_into_grad`` writes the unfolded input, copies it and the output gradient
        into the product's layouts, and the product reads both copies; ``sliced_inplace``
        reads each slice back and writes it over the output gradient."""
        if alt == "sliced_inplace":
            return 2 * itemsize * math.prod(binding.attrs["shape"])
        if alt != "im2col_into_grad":
            return 0
        attrs = binding.attrs
        x_shape, w_shape = attrs["shape"], attrs["w_shape"]
        positions = 1
        for size, k, s, p, d in zip(x_shape[2:], w_shape[2:], attrs["stride"], attrs["padding"], attrs["dilation"]):
            positions *= (size + 2 * p - d * (k - 1) - 1) // s + 1
        cols = x_shape[0] * positions * math.prod(w_shape[1:])
        grad = x_shape[0] * positions * w_shape[0]
        return itemsize * (4 * cols + 3 * grad)

    def forward(self, alt, inputs, attrs, saved=None):
        n = len(attrs["shape"]) - 2
        y = _CONV[n](inputs["x"], inputs["w"], inputs.get("b"), attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"])
        return {"y": y}

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        n = len(attrs["shape"]) - 2
        common = dict(stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"], groups=attrs["groups"])
        if step == "wgrad":
            if alt in ("into_grad", "im2col_into_grad"):
                w = g.new_zeros(attrs["w_shape"])
                CONV_WEIGHT_GRAD_INTO[alt][1](w, saved["x"], g, attrs, overwrite=False)
                out = {"w": w}
            else:
                out = {"w": conv_weight_grad(saved["x"], g, attrs)}
            if attrs["bias"]:
                out["b"] = g.sum([0] + list(range(2, g.dim())))
            return out
        if step == "dgrad":
            if alt == "sliced_inplace":
                return {"x": conv_input_grad_over_output(g, saved["w"], attrs)}
            return {"x": _CONV_INPUT[n](attrs["shape"], saved["w"], g, **common)}
        raise KeyError(step)

    def autograd_reference(self, inputs, attrs):
        return self.forward("default", inputs, attrs)

    def examples(self):
        g = torch.Generator().manual_seed(8)
        cases = []
        for shape, w_shape, stride, padding, dilation, groups in [
            ((2, 4, 7, 6), (6, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1),
            ((2, 4, 9, 8), (4, 1, 3, 3), (2, 2), (1, 1), (1, 1), 4),  # depthwise
            ((2, 3, 11), (5, 3, 3), (2,), (0,), (2,), 1),
            ((3, 4, 7, 6), (4, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # keeps its shape: input gradient in place
            ((2, 4, 9, 8), (4, 2, 3, 3), (1, 1), (2, 2), (2, 2), 2),  # the same, grouped and dilated
        ]:
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            w = torch.randn(w_shape, generator=g, dtype=torch.float64)
            b = torch.randn(w_shape[0], generator=g, dtype=torch.float64)
            cases.append(({"x": x, "w": w, "b": b}, {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
                                                     "shape": shape, "w_shape": w_shape, "bias": True, "param_roles": ("w", "b")}))
        return cases


class MatMul(OpKind):
    """``mm(a, b)``, ``bmm(a, b)`` and ``addmm(bias, a, b)`` (nn.Linear traces to these)."""

    name = "matmul"
    aten = ("mm", "bmm", "addmm")
    summary = "mm/bmm/addmm (linear): the gradients of a and b as separate steps"

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        name = target.__name__.split(".")[0] if hasattr(target, "__name__") else str(target)
        if name == "addmm":
            bias, a, b = args[:3]
            if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
                return None
            return Binding({"a": a, "b": b, "bias": bias}, {"y": None},
                           {"a_shape": tuple(input_shapes[1]), "b_shape": tuple(input_shapes[2]), "bias_shape": tuple(input_shapes[0])})
        a, b = args[:2]
        return Binding({"a": a, "b": b}, {"y": None}, {"a_shape": tuple(input_shapes[0]), "b_shape": tuple(input_shapes[1])})

    def forward_alts(self, binding):
        return (ForwardAlt("default"),)

    def backward_steps(self, binding):
        weight_is_b = "b" in binding.attrs.get("param_roles", ())
        grad_b = ("b", "bias") if "bias" in binding.inputs else ("b",)
        alts = [BackwardAlt("default", ("a",))]
        if weight_is_b and len(binding.attrs["a_shape"]) == 2 and len(binding.attrs["b_shape"]) == 2:
            alts.append(BackwardAlt("into_grad", ("a",), "weight gradient added into .grad by one addmm_", accumulates=("b",)))
        first = BackwardStep("wgrad" if weight_is_b else "grad_b", grad_b, tuple(alts))
        second = BackwardStep("dgrad" if weight_is_b else "grad_a", ("a",), (BackwardAlt("default", ("b",)),))
        return (first, second)

    def forward(self, alt, inputs, attrs, saved=None):
        y = torch.matmul(inputs["a"], inputs["b"])
        if "bias" in inputs:
            y = y + inputs["bias"]
        return {"y": y}

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        if step in ("wgrad", "grad_b"):
            if alt == "into_grad":
                b = g.new_zeros(attrs["b_shape"])
                matmul_weight_grad_into(b, saved["a"], g, overwrite=False)
                out = {"b": b}
            else:
                out = {"b": saved["a"].transpose(-1, -2) @ g}
            if "bias_shape" in attrs:
                out["bias"] = g.sum(0) if len(attrs["bias_shape"]) == 1 else g.sum_to_size(attrs["bias_shape"])
            return out
        if step in ("dgrad", "grad_a"):
            return {"a": g @ saved["b"].transpose(-1, -2)}
        raise KeyError(step)

    def autograd_reference(self, inputs, attrs):
        return self.forward("default", inputs, attrs)

    def examples(self):
        g = torch.Generator().manual_seed(9)
        a = torch.randn(5, 4, generator=g, dtype=torch.float64)
        b = torch.randn(4, 3, generator=g, dtype=torch.float64)
        bias = torch.randn(3, generator=g, dtype=torch.float64)
        a3 = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
        b3 = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
        return [
            ({"a": a, "b": b, "bias": bias}, {"a_shape": (5, 4), "b_shape": (4, 3), "bias_shape": (3,), "param_roles": ("b", "bias")}),
            ({"a": a, "b": b}, {"a_shape": (5, 4), "b_shape": (4, 3)}),
            ({"a": a3, "b": b3}, {"a_shape": (2, 5, 4), "b_shape": (2, 4, 6)}),
        ]


def _conv_output_size(attrs: dict) -> tuple[int, ...]:
    x_shape, w_shape = attrs["shape"], attrs["w_shape"]
    spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                    for size, k, s, p, d in zip(x_shape[2:], w_shape[2:], attrs["stride"], attrs["padding"], attrs["dilation"]))
    return (x_shape[0], w_shape[0], *spatial)


def conv_keeps_shape(attrs: dict) -> bool:
    """Whether the convolution's output has its input's shape (so its input gradient can
    take the output gradient's storage)."""
    return not attrs.get("transposed", False) and _conv_output_size(attrs) == tuple(attrs["shape"])


def conv_input_grad_over_output(g: torch.Tensor, w: torch.Tensor, attrs: dict) -> torch.Tensor:
    """The input gradient of a shape-keeping convolution written over its output gradient
    ``g`` (returned), ``DGRAD_SLICE_BYTES`` of samples at a time: each slice is the
    transposed convolution of that slice of ``g`` with the weight (the data-gradient kernel
    the runtime uses for the whole batch), made in a temporary and copied back."""
    n = g.dim() - 2
    per_sample = max(1, g[0].numel() * g.element_size())
    step = max(1, DGRAD_SLICE_BYTES // per_sample)
    for i0 in range(0, g.shape[0], step):
        part = g[i0:i0 + step]
        made = torch.ops.aten.convolution(part, w, None, list(attrs["stride"]), list(attrs["padding"]), list(attrs["dilation"]),
                                          True, [0] * n, attrs["groups"])
        part.copy_(made)
        del made
    return g


def conv_weight_grad(x: torch.Tensor, g: torch.Tensor, attrs: dict) -> torch.Tensor:
    """The whole weight gradient of a convolution, in one call of PyTorch's kernel."""
    n = len(attrs["shape"]) - 2
    return _CONV_WEIGHT[n](x, tuple(attrs["w_shape"]), g, stride=attrs["stride"], padding=attrs["padding"],
                           dilation=attrs["dilation"], groups=attrs["groups"])


def conv_weight_grad_into(out: torch.Tensor, x: torch.Tensor, g: torch.Tensor, attrs: dict, *, overwrite: bool) -> None:
    """Add the weight gradient of a convolution (``groups == 1``) into ``out`` (or write
    it, when ``overwrite``), ``WGRAD_CHUNK_BYTES`` of output channels at a time: each
    chunk is PyTorch's weight-gradient kernel on that slice of the output gradient, so
    at most one chunk exists besides ``out``."""
    n = len(attrs["shape"]) - 2
    common = dict(stride=attrs["stride"], padding=attrs["padding"], dilation=attrs["dilation"], groups=1)
    w_shape = tuple(attrs["w_shape"])
    per_channel = math.prod(w_shape[1:]) * out.element_size()
    step = max(1, WGRAD_CHUNK_BYTES // per_channel)
    if step > 16:
        step = 16 * round(step / 16)  # whole blocks of 16 channels, oneDNN's fast layouts (56 ran 1.7x slower than 64)
    for c0 in range(0, w_shape[0], step):
        c1 = min(c0 + step, w_shape[0])
        part = _CONV_WEIGHT[n](x, (c1 - c0, *w_shape[1:]), g[:, c0:c1], **common)
        if overwrite:
            out[c0:c1].copy_(part)
        else:
            out[c0:c1].add_(part)
        del part


def _im2col_operands(x: torch.Tensor, g: torch.Tensor, attrs: dict, *, kernel_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight gradient's two factors, ``[out channels, N * positions]`` (the output
    gradient) and ``[in channels * kernel, N * positions]`` (the unfolded input; with
    ``kernel_first``, ``[kernel * in channels, ...]``, the order of a channels-last
    weight), each laid out contiguously for one matrix product. A 1-d convolution is
    unfolded as a 2-d one of height 1. The unfolded input is released once its copy is made."""
    kernel, stride = tuple(attrs["w_shape"][2:]), tuple(attrs["stride"])
    padding, dilation = tuple(attrs["padding"]), tuple(attrs["dilation"])
    if len(kernel) == 1:
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    n, out_channels, in_channels = g.shape[0], g.shape[1], x.shape[1]
    g2 = g.reshape(n, out_channels, -1).transpose(0, 1).reshape(out_channels, -1)
    if kernel == (1, 1) and padding == (0, 0):
        # a pointwise kernel unfolds to the strided input itself; unfold would also hold an
        # input-sized storage on CPU (its result is shrunk from one), 4x the columns at stride 2
        return g2, x[:, :, ::stride[0], ::stride[1]].transpose(0, 1).reshape(in_channels, -1)
    cols = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    if kernel_first:
        return g2, cols.view(n, in_channels, -1, cols.shape[-1]).permute(2, 1, 0, 3).reshape(cols.shape[1], -1)
    return g2, cols.transpose(0, 1).reshape(cols.shape[1], -1)


def conv_weight_grad_im2col(x: torch.Tensor, g: torch.Tensor, attrs: dict) -> torch.Tensor:
    """A 1-d or 2-d convolution's (``groups == 1``) weight gradient as a new tensor, by one
    matrix product of the output gradient and the unfolded input."""
    g2, c2 = _im2col_operands(x, g, attrs)
    return torch.mm(g2, c2.t()).view(tuple(attrs["w_shape"]))


def conv_weight_grad_im2col_into(out: torch.Tensor, x: torch.Tensor, g: torch.Tensor, attrs: dict, *, overwrite: bool) -> None:
    """Add (or write, when ``overwrite``) a 1-d or 2-d convolution's weight gradient into
    ``out`` by one ``addmm_`` of the output gradient and the unfolded input. ``out`` is
    seen as the product's matrix when it is contiguous or channels-last (the unfolded
    input's rows are then ordered kernel position first); any other layout gets the
    product made whole and added."""
    if out.is_contiguous():
        target, kernel_first = out.view(out.shape[0], -1), False
    elif out.dim() == 4 and out.permute(0, 2, 3, 1).is_contiguous():
        target, kernel_first = out.permute(0, 2, 3, 1).view(out.shape[0], -1), True
    else:
        part = conv_weight_grad_im2col(x, g, attrs)
        if overwrite:
            out.copy_(part)
        else:
            out.add_(part)
        return
    g2, c2 = _im2col_operands(x, g, attrs, kernel_first=kernel_first)
    if overwrite:
        torch.mm(g2, c2.t(), out=target)
    else:
        target.addmm_(g2, c2.t())


#: a convolution's ``accumulates`` alternatives: name -> (the gradient made whole, added into a target)
CONV_WEIGHT_GRAD_INTO = {
    "into_grad": (conv_weight_grad, conv_weight_grad_into),
    "im2col_into_grad": (conv_weight_grad_im2col, conv_weight_grad_im2col_into),
}


def matmul_weight_grad_into(out: torch.Tensor, a: torch.Tensor, g: torch.Tensor, *, overwrite: bool) -> None:
    """``out += a.T @ g`` (or ``out = a.T @ g``) in one BLAS call, no temporary: the
    gradient of ``b`` in ``a @ b``. ``out`` may be a transposed view (a linear layer's
    weight gradient seen as the gradient of ``weight.t()``)."""
    if overwrite:
        torch.mm(a.t(), g, out=out)
    else:
        out.addmm_(a.t(), g)
