"""Max pooling (2-d): where the maximum of each window was, kept three ways.

* ``indices``: torch's int64 flat indices (what autograd keeps, together with the
  input itself, whose storage autograd holds although only its shape is needed);
* ``window``: one int8 per output element, the position of the maximum *inside its
  window* (``kh * kernel_w + kw``; windows up to 127 elements): 8x smaller than int64;
* ``plain``: nothing; the backward re-runs the pool on the kept input to find the maxima.

Adaptive average pooling's backward needs only the input's shape (autograd keeps the
input anyway).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, OpKind

__all__ = ["MaxPool2d", "AdaptiveAvgPool2d"]


def _pair(v, default=None):
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        v = default
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) else None
    return (int(v), int(v))


class MaxPool2d(OpKind):
    name = "max_pool2d"
    aten = ("max_pool2d_with_indices",)
    summary = "max_pool2d: backward from the input (re-run), int64 indices, or int8 per-window indices"
    flops_per_element = 9.0

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        kernel = _pair(args[1])
        stride = _pair(args[2] if len(args) > 2 else None, kernel)
        padding = _pair(args[3] if len(args) > 3 else 0)
        dilation = _pair(args[4] if len(args) > 4 else 1)
        ceil_mode = bool(args[5]) if len(args) > 5 else False
        if len(input_shapes[0]) not in (3, 4):
            return None
        attrs = {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation, "ceil_mode": ceil_mode,
                 "shape": tuple(input_shapes[0]), "out_shape": tuple(output_shapes[0])}
        return Binding({"x": args[0]}, {"y": 0, "indices": 1}, attrs)

    def _window_ok(self, attrs) -> bool:
        return attrs["kernel"][0] * attrs["kernel"][1] <= 127

    def forward_alts(self, binding):
        alts = [ForwardAlt("indices", derived=("indices",), doc="torch's int64 indices")]
        if self._window_ok(binding.attrs):
            alts.append(ForwardAlt("window", derived=("window",), doc="int8 index of the maximum inside its window"))
        alts.append(ForwardAlt("plain", doc="keeps nothing; the backward re-runs the pool"))
        return tuple(alts)

    def backward_steps(self, binding):
        alts = [
            BackwardAlt("autograd", ("x", "indices"), "as autograd: keeps the input alive as well"),
            BackwardAlt("from_indices", ("indices",)),
        ]
        if self._window_ok(binding.attrs):
            alts.append(BackwardAlt("from_window", ("window",)))
        alts.append(BackwardAlt("from_input", ("x",), "re-runs the pool to find the maxima"))
        return (BackwardStep("backward", ("x",), tuple(alts)),)

    def derived_type(self, role, binding, y_dtype, y_shape):
        if role == "indices":
            return torch.int64, tuple(y_shape)
        if role == "window":
            return torch.int8, tuple(y_shape)
        raise KeyError(role)

    # reference -----------------------------------------------------------------------------
    def _pool(self, x, attrs):
        return F.max_pool2d(x, attrs["kernel"], attrs["stride"], attrs["padding"], attrs["dilation"], attrs["ceil_mode"], return_indices=True)

    def _starts(self, attrs, device):
        oh, ow = attrs["out_shape"][-2:]
        hs = torch.arange(oh, device=device) * attrs["stride"][0] - attrs["padding"][0]
        ws = torch.arange(ow, device=device) * attrs["stride"][1] - attrs["padding"][1]
        return hs.view(-1, 1), ws.view(1, -1)

    def _to_window(self, indices, attrs):
        width = attrs["shape"][-1]
        h0, w0 = self._starts(attrs, indices.device)
        dh, dw = attrs["dilation"]
        local_h = (indices // width - h0) // dh
        local_w = (indices % width - w0) // dw
        return (local_h * attrs["kernel"][1] + local_w).to(torch.int8)

    def _from_window(self, window, attrs):
        width = attrs["shape"][-1]
        h0, w0 = self._starts(attrs, window.device)
        local = window.to(torch.int64)
        h = h0 + (local // attrs["kernel"][1]) * attrs["dilation"][0]
        w = w0 + (local % attrs["kernel"][1]) * attrs["dilation"][1]
        return h * width + w

    def forward(self, alt, inputs, attrs, saved=None):
        y, indices = self._pool(inputs["x"], attrs)
        if alt == "indices":
            return {"y": y, "indices": indices}
        if alt == "window":
            return {"y": y, "window": self._to_window(indices, attrs)}
        return {"y": y}

    def _scatter(self, g, indices, attrs):
        shape = attrs["shape"]
        flat = g.new_zeros(shape[:-2] + (shape[-2] * shape[-1],))
        flat.scatter_add_(-1, indices.flatten(-2), g.flatten(-2))
        return flat.view(shape)

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        if alt in ("autograd", "from_indices"):
            indices = saved["indices"]
        elif alt == "from_window":
            indices = self._from_window(saved["window"], attrs)
        elif alt == "from_input":
            _, indices = self._pool(saved["x"], attrs)
        else:
            raise KeyError(alt)
        return {"x": self._scatter(g, indices, attrs)}

    def autograd_reference(self, inputs, attrs):
        return {"y": self._pool(inputs["x"], attrs)[0]}

    def examples(self):
        g = torch.Generator().manual_seed(6)
        cases = []
        for kernel, stride, padding, dilation, ceil in [((2, 2), (2, 2), (0, 0), (1, 1), False), ((3, 3), (2, 2), (1, 1), (1, 1), False),
                                                        ((3, 2), (1, 2), (1, 0), (2, 1), True)]:
            x = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
            y = F.max_pool2d(x, kernel, stride, padding, dilation, ceil)
            cases.append(({"x": x}, {"kernel": kernel, "stride": stride, "padding": padding, "dilation": dilation, "ceil_mode": ceil,
                                     "shape": tuple(x.shape), "out_shape": tuple(y.shape)}))
        return cases


def _windows(size: int, out: int):
    """Adaptive pooling windows along one dimension: [floor(i*size/out), ceil((i+1)*size/out))."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


class AdaptiveAvgPool2d(OpKind):
    """Adaptive average pooling: the backward needs only the input's *shape*.

    Autograd keeps the whole input (ResNet-50's last feature map at batch 184 is 70 MiB);
    ``from_shape`` keeps nothing and spreads each output gradient evenly over its window.
    """

    name = "adaptive_avg_pool2d"
    aten = ("_adaptive_avg_pool2d",)
    summary = "adaptive_avg_pool2d: backward from the input (autograd) or from its shape alone"
    flops_per_element = 1.0

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        if len(input_shapes[0]) not in (3, 4):
            return None
        return Binding({"x": args[0]}, {"y": None}, {"shape": tuple(input_shapes[0]), "out_shape": tuple(output_shapes[0])})

    def forward_alts(self, binding):
        return (ForwardAlt("default"),)

    def backward_steps(self, binding):
        return (BackwardStep("backward", ("x",), (
            BackwardAlt("autograd", ("x",), "as autograd: keeps the input although only its shape is used"),
            BackwardAlt("from_shape", (), "keeps nothing"),
        )),)

    def forward(self, alt, inputs, attrs, saved=None):
        return {"y": F.adaptive_avg_pool2d(inputs["x"], attrs["out_shape"][-2:])}

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        h, w = attrs["shape"][-2:]
        oh, ow = attrs["out_shape"][-2:]
        dx = g.new_zeros(attrs["shape"])
        for i, (h0, h1) in enumerate(_windows(h, oh)):
            for j, (w0, w1) in enumerate(_windows(w, ow)):
                dx[..., h0:h1, w0:w1] += (g[..., i, j] / ((h1 - h0) * (w1 - w0)))[..., None, None]
        return {"x": dx}

    def autograd_reference(self, inputs, attrs):
        return self.forward("default", inputs, attrs)

    def examples(self):
        g = torch.Generator().manual_seed(12)
        cases = []
        for shape, out in (((2, 3, 7, 7), (1, 1)), ((2, 3, 9, 7), (4, 3)), ((3, 10, 6), (5, 4))):
            x = torch.randn(shape, generator=g, dtype=torch.float64)
            y = F.adaptive_avg_pool2d(x, out)
            cases.append(({"x": x}, {"shape": tuple(x.shape), "out_shape": tuple(y.shape)}))
        return cases
