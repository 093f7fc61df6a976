"""Elementwise activations: the ReLU family, tanh/sigmoid, GELU and SiLU.

* **ReLU, LeakyReLU (slope > 0), hardtanh (ReLU6)**: the backward needs only *where* the
  input was in the linear region, which the input, the output, or a 1-bit mask all tell.
  So the forward may keep any of them, and it may run in place (the output overwrites
  the input) when the backward reads the output or the mask. Their backward from the
  output or the mask may also write the input gradient over the output gradient
  (``from_output_inplace``, ``from_mask_inplace``) where that gradient dies at this step:
  the step then allocates nothing.
* **tanh, sigmoid**: the derivative is a function of the output (1 - y^2, y (1 - y)),
  so the backward reads the output and the forward may run in place.
* **GELU, SiLU**: the derivative needs the input; recomputing them costs one cheap
  elementwise pass, so they are the natural ops to recompute rather than keep.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, OpKind
from .packing import pack_bits, unpack_bits

__all__ = ["ClampActivation", "OutputActivation", "InputActivation", "INPLACE_BACKWARD"]

#: ReLU-family backward alternatives that also come written over the incoming gradient
#: (``NAME_inplace``): one pass over each element, reading it before writing it
INPLACE_BACKWARD = ("from_output", "from_mask")


class ClampActivation(OpKind):
    """ReLU, LeakyReLU and hardtanh: backward from input, from output or from a 1-bit mask."""

    flops_per_element = 1.0

    def __init__(self, name: str, aten: tuple[str, ...], autograd_reads: str):
        self.name = name
        self.aten = aten
        self.autograd_reads = autograd_reads  # "y" for relu, "x" for leaky_relu and hardtanh
        self.summary = f"{name}: backward from input, output or a 1-bit mask; in place when legal"

    # -- binding -------------------------------------------------------------------------
    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        attrs: dict = {"shape": tuple(output_shapes[0])}
        if self.name == "leaky_relu":
            slope = args[1] if len(args) > 1 else kwargs.get("negative_slope", 0.01)
            attrs["slope"] = float(slope)
        elif self.name == "hardtanh":
            attrs["min"] = float(args[1] if len(args) > 1 else kwargs.get("min_val", -1.0))
            attrs["max"] = float(args[2] if len(args) > 2 else kwargs.get("max_val", 1.0))
        return Binding({"x": args[0]}, {"y": None}, attrs)

    def _output_ok(self, attrs) -> bool:
        # y tells the linear region apart only when the map is injective on its sign
        return self.name != "leaky_relu" or attrs.get("slope", 0.0) > 0.0

    def forward_alts(self, binding):
        return (
            ForwardAlt("plain", doc="out of place; keeps nothing extra"),
            ForwardAlt("inplace", overwrites="x", doc="output overwrites the input"),
            ForwardAlt("mask", derived=("mask",), doc="also writes a 1-bit mask of the linear region"),
            ForwardAlt("inplace_mask", derived=("mask",), overwrites="x", doc="in place, plus the 1-bit mask"),
        )

    def backward_steps(self, binding):
        from_input = BackwardAlt("from_input", ("x",), "derivative from the input")
        from_output = BackwardAlt("from_output", ("y",), "derivative from the output")
        from_mask = BackwardAlt("from_mask", ("mask",), "derivative from the 1-bit mask")
        alts = [from_output, from_input] if self.autograd_reads == "y" else [from_input]
        if self.autograd_reads == "x" and self._output_ok(binding.attrs):
            alts.append(from_output)
        alts.append(from_mask)
        # the same, written over the incoming gradient where it dies here (no new storage)
        alts += [BackwardAlt(f"{a.name}_inplace", a.reads, f"{a.doc}, written over the output gradient", overwrites="y")
                 for a in alts if a.name in INPLACE_BACKWARD]
        return (BackwardStep("backward", ("x",), tuple(alts)),)

    def derived_type(self, role, binding, y_dtype, y_shape):
        if role == "mask":
            return "u1", tuple(y_shape)
        raise KeyError(role)

    # -- reference ---------------------------------------------------------------------------
    def _apply(self, x, attrs):
        if self.name == "relu":
            return torch.relu(x)
        if self.name == "leaky_relu":
            return F.leaky_relu(x, attrs["slope"])
        return F.hardtanh(x, attrs["min"], attrs["max"])

    def _region(self, t, attrs, from_output: bool):
        """Where the derivative is 1 (ReLU, hardtanh) or not the slope (LeakyReLU)."""
        if self.name == "hardtanh":
            return (t > attrs["min"]) & (t < attrs["max"])
        return t > 0

    def forward(self, alt, inputs, attrs, saved=None):
        x = inputs["x"]
        out: dict = {}
        if alt.endswith("mask"):
            out["mask"] = pack_bits(self._region(x, attrs, False))
        y = self._apply(x, attrs)
        if alt.startswith("inplace"):
            x.copy_(y)  # the storage of x now holds y, as the in-place kernel leaves it
            y = x
        out["y"] = y
        return out

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        if alt.endswith("_inplace"):
            result = self.backward(step, alt[: -len("_inplace")], grads, saved, attrs)["x"]
            return {"x": g.copy_(result)}
        if alt == "from_input":
            region = self._region(saved["x"], attrs, False)
        elif alt == "from_output":
            region = self._region(saved["y"], attrs, True)
        elif alt == "from_mask":
            region = unpack_bits(saved["mask"], attrs["shape"]).to(g.device)
        else:
            raise KeyError(alt)
        if self.name == "leaky_relu":
            return {"x": torch.where(region, g, g * attrs["slope"])}
        return {"x": torch.where(region, g, torch.zeros_like(g))}

    def autograd_reference(self, inputs, attrs):
        return {"y": self._apply(inputs["x"], attrs)}

    def examples(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 2
        x[0, 0, :3] = torch.tensor([0.0, -1.0, 1.0], dtype=torch.float64)  # boundaries
        attrs = {"shape": tuple(x.shape)}
        if self.name == "leaky_relu":
            attrs["slope"] = 0.1
        if self.name == "hardtanh":
            attrs.update(min=0.0, max=6.0)
            x = x * 4
        return [({"x": x}, attrs)]


class OutputActivation(OpKind):
    """tanh, sigmoid, softmax and log-softmax: the derivative is a function of the output."""

    def __init__(self, name: str, aten: tuple[str, ...], flops_per_element: float):
        self.name = name
        self.aten = aten
        self.flops_per_element = flops_per_element
        self.summary = f"{name}: backward from the output; may run in place"

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        attrs = {"shape": tuple(output_shapes[0])}
        if self.name in ("softmax", "log_softmax"):
            if len(args) > 2 and args[2]:  # half_to_float changes the dtype: no in-place
                return None
            attrs["dim"] = int(args[1])
        return Binding({"x": args[0]}, {"y": None}, attrs)

    def forward_alts(self, binding):
        return (
            ForwardAlt("plain", doc="out of place"),
            ForwardAlt("inplace", overwrites="x", doc="output overwrites the input (the backward needs only y)"),
        )

    def backward_steps(self, binding):
        return (BackwardStep("backward", ("x",), (BackwardAlt("from_output", ("y",)),)),)

    def _apply(self, x, attrs):
        if self.name == "tanh":
            return torch.tanh(x)
        if self.name == "sigmoid":
            return torch.sigmoid(x)
        if self.name == "softmax":
            return torch.softmax(x, attrs["dim"])
        return torch.log_softmax(x, attrs["dim"])

    def forward(self, alt, inputs, attrs, saved=None):
        x = inputs["x"]
        y = self._apply(x, attrs)
        if alt == "inplace":
            x.copy_(y)
            y = x
        return {"y": y}

    def backward(self, step, alt, grads, saved, attrs):
        g, y = grads["y"], saved["y"]
        if self.name == "tanh":
            return {"x": g * (1 - y * y)}
        if self.name == "sigmoid":
            return {"x": g * y * (1 - y)}
        dim = attrs["dim"]
        if self.name == "softmax":
            return {"x": y * (g - (g * y).sum(dim, keepdim=True))}
        return {"x": g - torch.exp(y) * g.sum(dim, keepdim=True)}

    def autograd_reference(self, inputs, attrs):
        return {"y": self._apply(inputs["x"], attrs)}

    def examples(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
        attrs = {"shape": tuple(x.shape)}
        if self.name in ("softmax", "log_softmax"):
            attrs["dim"] = 1
        return [({"x": x}, attrs)]


class InputActivation(OpKind):
    """GELU and SiLU: the derivative needs the input; recomputation is one elementwise pass."""

    def __init__(self, name: str, aten: tuple[str, ...], flops_per_element: float):
        self.name = name
        self.aten = aten
        self.flops_per_element = flops_per_element
        self.summary = f"{name}: backward from the input; cheap to recompute"

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        attrs = {"shape": tuple(output_shapes[0])}
        if self.name == "gelu":
            attrs["approximate"] = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        return Binding({"x": args[0]}, {"y": None}, attrs)

    def forward_alts(self, binding):
        return (ForwardAlt("plain"),)

    def backward_steps(self, binding):
        return (BackwardStep("backward", ("x",), (BackwardAlt("from_input", ("x",)),)),)

    def _apply(self, x, attrs):
        if self.name == "gelu":
            return F.gelu(x, approximate=attrs["approximate"])
        return F.silu(x)

    def forward(self, alt, inputs, attrs, saved=None):
        return {"y": self._apply(inputs["x"], attrs)}

    def backward(self, step, alt, grads, saved, attrs):
        g, x = grads["y"], saved["x"]
        if self.name == "silu":
            s = torch.sigmoid(x)
            return {"x": g * s * (1 + x * (1 - s))}
        if attrs["approximate"] == "tanh":
            k = math.sqrt(2 / math.pi)
            inner = k * (x + 0.044715 * x**3)
            t = torch.tanh(inner)
            d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
            return {"x": g * d}
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return {"x": g * (cdf + x * pdf)}

    def autograd_reference(self, inputs, attrs):
        return {"y": self._apply(inputs["x"], attrs)}

    def examples(self):
        g = torch.Generator().manual_seed(2)
        x = torch.randn(3, 8, generator=g, dtype=torch.float64) * 2
        if self.name == "gelu":
            return [({"x": x}, {"shape": tuple(x.shape), "approximate": "none"}),
                    ({"x": x}, {"shape": tuple(x.shape), "approximate": "tanh"})]
        return [({"x": x}, {"shape": tuple(x.shape)})]
