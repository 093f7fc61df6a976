"""Normalisations: batch norm (training), layer norm and RMS norm.

Each keeps small per-group statistics (mean and inverse standard deviation, or the RMS
reciprocal) as outputs. They serve twice:

* a **recomputation reuses them** instead of reducing the input again, so the recomputed
  output is bit-identical to the first one and batch norm's running statistics are
  updated exactly once (by the first forward);
* the backward needs them with either the input (``from_input``, what autograd does) or
  the output (``from_output``, as in In-Place ABN: x_hat = (y - beta) / gamma). The
  output-based backward is only valid while gamma has no zero; the reference raises
  ``ValueError`` when it meets one, so a runtime can check and fall back.
"""
from __future__ import annotations

import torch

from .base import BackwardAlt, BackwardStep, Binding, ForwardAlt, OpKind

__all__ = ["BatchNorm", "LayerNorm", "RMSNorm", "GammaHasZeros"]


class GammaHasZeros(ValueError):
    """An output-based normalisation backward met a zero scale: x_hat cannot be rebuilt."""


def _invert_affine(y, w, b, shape):
    if w is None:
        return y if b is None else y - b.reshape(shape)
    if bool((w == 0).any()):
        raise GammaHasZeros("backward from the output needs every gamma != 0; use from_input for this step")
    yb = y if b is None else y - b.reshape(shape)
    return yb / w.reshape(shape)


class BatchNorm(OpKind):
    """Training-mode batch norm over (N, C, *): y = (x - mean) * invstd * gamma + beta."""

    name = "batch_norm"
    aten = ("_native_batch_norm_legit_functional", "native_batch_norm", "_native_batch_norm_legit")
    summary = "batch_norm (training): backward from input or output (gamma != 0); recompute reuses batch stats"
    flops_per_element = 4.0
    two_pass_forward = True

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        x, w, b, rm, rv = args[:5]
        training, momentum, eps = args[5], args[6], args[7]
        if not training or rm is None or rv is None:
            return None
        inputs = {"x": x, "running_mean": rm, "running_var": rv}
        if w is not None:
            inputs["w"] = w
        if b is not None:
            inputs["b"] = b
        attrs = {"momentum": float(momentum), "eps": float(eps), "shape": tuple(input_shapes[0]),
                 "affine": tuple(r for r in ("w", "b") if r in inputs)}
        outputs = {"y": 0, "mean": 1, "invstd": 2}
        if len(output_shapes) == 5:  # the functional variant returns the updated running stats
            outputs.update(running_mean_out=3, running_var_out=4)
        return Binding(inputs, outputs, attrs)

    def forward_alts(self, binding):
        return (ForwardAlt("default", recompute_reads=("mean", "invstd"), cheaper_recompute=True,
                           doc="recomputation normalises with the saved batch statistics"),)

    def backward_steps(self, binding):
        affine = tuple(r for r in ("w", "b") if r in binding.inputs)
        from_input = BackwardAlt("from_input", ("x", "mean", "invstd", "running_mean", "running_var") + (("w",) if "w" in affine else ()))
        from_output = BackwardAlt("from_output", ("y", "invstd") + affine, "In-Place ABN; needs gamma != 0")
        return (BackwardStep("backward", ("x",) + affine, (from_input, from_output)),)

    # reference ---------------------------------------------------------------------------
    def forward(self, alt, inputs, attrs, saved=None):
        x = inputs["x"]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        if saved is None:
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            invstd = torch.rsqrt(var + attrs["eps"])
            n = x.numel() // x.shape[1]
            with torch.no_grad():  # running statistics: updated once, by the first forward
                m = attrs["momentum"]
                inputs["running_mean"].mul_(1 - m).add_(mean, alpha=m)
                inputs["running_var"].mul_(1 - m).add_(var * n / max(n - 1, 1), alpha=m)
        else:
            mean, invstd = saved["mean"], saved["invstd"]
        y = (x - mean.reshape(shape)) * invstd.reshape(shape)
        if "w" in inputs:
            y = y * inputs["w"].reshape(shape)
        if "b" in inputs:
            y = y + inputs["b"].reshape(shape)
        return {"y": y, "mean": mean, "invstd": invstd}

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        dims = [0] + list(range(2, g.dim()))
        shape = [1, g.shape[1]] + [1] * (g.dim() - 2)
        invstd = saved["invstd"].reshape(shape)
        w = saved.get("w")
        if alt == "from_input":
            xhat = (saved["x"] - saved["mean"].reshape(shape)) * invstd
        elif alt == "from_output":
            xhat = _invert_affine(saved["y"], w, saved.get("b"), shape)
        else:
            raise KeyError(alt)
        sum_g = g.sum(dims)
        sum_gx = (g * xhat).sum(dims)
        n = g.numel() // g.shape[1]
        scale = invstd if w is None else invstd * w.reshape(shape)
        dx = scale * (g - sum_g.reshape(shape) / n - xhat * sum_gx.reshape(shape) / n)
        out = {"x": dx}
        if "w" in attrs["affine"]:
            out["w"] = sum_gx
        if "b" in attrs["affine"]:
            out["b"] = sum_g
        return out

    def autograd_reference(self, inputs, attrs):
        rm = inputs["running_mean"].detach().clone()
        rv = inputs["running_var"].detach().clone()
        y = torch.nn.functional.batch_norm(inputs["x"], rm, rv, inputs.get("w"), inputs.get("b"), True, attrs["momentum"], attrs["eps"])
        return {"y": y}

    def examples(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
        w = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
        b = torch.randn(3, generator=g, dtype=torch.float64)
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        attrs = {"momentum": 0.1, "eps": 1e-5, "shape": tuple(x.shape), "affine": ("w", "b")}
        return [({"x": x, "w": w, "b": b, "running_mean": rm, "running_var": rv}, attrs)]


class LayerNorm(OpKind):
    """Layer norm over the trailing ``normalized_shape`` dims; keeps mean and rstd."""

    name = "layer_norm"
    aten = ("native_layer_norm",)
    summary = "layer_norm: backward from input or output (gamma != 0); recompute reuses mean/rstd"
    flops_per_element = 5.0
    two_pass_forward = True

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        x, normalized_shape, w, b, eps = args[:5]
        inputs = {"x": x}
        if w is not None:
            inputs["w"] = w
        if b is not None:
            inputs["b"] = b
        attrs = {"normalized_shape": tuple(int(d) for d in normalized_shape), "eps": float(eps), "shape": tuple(input_shapes[0]),
                 "affine": tuple(r for r in ("w", "b") if r in inputs)}
        return Binding(inputs, {"y": 0, "mean": 1, "rstd": 2}, attrs)

    def forward_alts(self, binding):
        return (ForwardAlt("default", recompute_reads=("mean", "rstd"), cheaper_recompute=True,
                           doc="recomputation normalises with the saved mean and rstd"),)

    def backward_steps(self, binding):
        affine = tuple(r for r in ("w", "b") if r in binding.inputs)
        from_input = BackwardAlt("from_input", ("x", "mean", "rstd") + affine)
        from_output = BackwardAlt("from_output", ("y", "rstd") + affine, "rebuilds x_hat = (y - b) / w; needs w != 0")
        return (BackwardStep("backward", ("x",) + affine, (from_input, from_output)),)

    def forward(self, alt, inputs, attrs, saved=None):
        x = inputs["x"]
        k = len(attrs["normalized_shape"])
        dims = list(range(x.dim() - k, x.dim()))
        if saved is None:
            mean = x.mean(dims, keepdim=True)
            rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + attrs["eps"])
        else:
            mean, rstd = saved["mean"], saved["rstd"]
        y = (x - mean) * rstd
        if "w" in inputs:
            y = y * inputs["w"]
        if "b" in inputs:
            y = y + inputs["b"]
        return {"y": y, "mean": mean, "rstd": rstd}

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        k = len(attrs["normalized_shape"])
        dims = list(range(g.dim() - k, g.dim()))
        lead = list(range(0, g.dim() - k))
        rstd = saved["rstd"]
        w = saved.get("w")
        if alt == "from_input":
            xhat = (saved["x"] - saved["mean"]) * rstd
        else:
            xhat = _invert_affine(saved["y"], w, saved.get("b"), attrs["normalized_shape"])
        gw = g if w is None else g * w
        n = 1
        for d in attrs["normalized_shape"]:
            n *= d
        dx = rstd * (gw - gw.sum(dims, keepdim=True) / n - xhat * (gw * xhat).sum(dims, keepdim=True) / n)
        out = {"x": dx}
        if "w" in attrs["affine"]:
            out["w"] = (g * xhat).sum(lead)
        if "b" in attrs["affine"]:
            out["b"] = g.sum(lead)
        return out

    def autograd_reference(self, inputs, attrs):
        return {"y": torch.nn.functional.layer_norm(inputs["x"], attrs["normalized_shape"], inputs.get("w"), inputs.get("b"), attrs["eps"])}

    def examples(self):
        g = torch.Generator().manual_seed(4)
        x = torch.randn(2, 5, 6, generator=g, dtype=torch.float64) * 3
        w = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
        b = torch.randn(6, generator=g, dtype=torch.float64)
        return [({"x": x, "w": w, "b": b}, {"normalized_shape": (6,), "eps": 1e-5, "shape": tuple(x.shape), "affine": ("w", "b")})]


class RMSNorm(OpKind):
    """RMS norm ``y = x * rstd * w`` with ``rstd = 1/sqrt(mean(x^2) + eps)`` (aten ``_fused_rms_norm``).

    On the CPU, torch 2.13 decomposes ``nn.RMSNorm`` into pow/mean/add/rsqrt/mul before
    autograd sees it; the tracer folds that sequence back into this kind with
    ``decomposed=True``, whose first alternatives (``autograd``) also keep x_hat, as the
    decomposed autograd graph does.
    """

    name = "rms_norm"
    aten = ("_fused_rms_norm",)
    summary = "rms_norm (fused): backward from input or output (w != 0); recompute reuses rstd"
    flops_per_element = 4.0
    two_pass_forward = True

    def bind(self, target, args, kwargs, input_shapes, output_shapes):
        x, normalized_shape = args[0], args[1]
        w = args[2] if len(args) > 2 else kwargs.get("weight")
        eps = args[3] if len(args) > 3 else kwargs.get("eps")
        inputs = {"x": x}
        if w is not None:
            inputs["w"] = w
        attrs = {"normalized_shape": tuple(int(d) for d in normalized_shape), "eps": eps, "shape": tuple(input_shapes[0])}
        return Binding(inputs, {"y": 0, "rstd": 1}, attrs)

    def _keeps_xhat(self, binding) -> bool:
        # the decomposed form (x * rstd, then * w) makes autograd keep x_hat for grad(w)
        return bool(binding.attrs.get("decomposed")) and "w" in binding.inputs

    def forward_alts(self, binding):
        alts = [ForwardAlt("default", recompute_reads=("rstd",), cheaper_recompute=True)]
        if self._keeps_xhat(binding):
            alts.insert(0, ForwardAlt("autograd", derived=("xhat",), recompute_reads=("rstd",), cheaper_recompute=True,
                                      doc="as autograd runs the decomposed op: also keeps x_hat"))
        return tuple(alts)

    def backward_steps(self, binding):
        affine = ("w",) if "w" in binding.inputs else ()
        alts = [
            BackwardAlt("from_input", ("x", "rstd") + affine),
            BackwardAlt("from_output", ("y", "rstd") + affine, "rebuilds x_hat = y / w; needs w != 0"),
        ]
        if self._keeps_xhat(binding):
            alts.insert(0, BackwardAlt("autograd", ("x", "rstd", "xhat") + affine, "as autograd: x_hat gives grad(w)"))
        return (BackwardStep("backward", ("x",) + affine, tuple(alts)),)

    def derived_type(self, role, binding, y_dtype, y_shape):
        if role == "xhat":
            return y_dtype, tuple(y_shape)
        raise KeyError(role)

    def _eps(self, x, attrs):
        return attrs["eps"] if attrs["eps"] is not None else torch.finfo(x.dtype).eps

    def forward(self, alt, inputs, attrs, saved=None):
        x = inputs["x"]
        dims = list(range(x.dim() - len(attrs["normalized_shape"]), x.dim()))
        rstd = saved["rstd"] if saved is not None else torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + self._eps(x, attrs))
        xhat = x * rstd
        y = xhat * inputs["w"] if "w" in inputs else xhat
        out = {"y": y, "rstd": rstd}
        if alt == "autograd":
            out["xhat"] = xhat
        return out

    def backward(self, step, alt, grads, saved, attrs):
        g = grads["y"]
        k = len(attrs["normalized_shape"])
        dims = list(range(g.dim() - k, g.dim()))
        lead = list(range(0, g.dim() - k))
        rstd, w = saved["rstd"], saved.get("w")
        if alt == "autograd":
            xhat = saved["xhat"]
        elif alt == "from_input":
            xhat = saved["x"] * rstd
        else:
            xhat = _invert_affine(saved["y"], w, None, attrs["normalized_shape"])
        gw = g if w is None else g * w
        n = 1
        for d in attrs["normalized_shape"]:
            n *= d
        dx = rstd * (gw - xhat * (gw * xhat).sum(dims, keepdim=True) / n)
        out = {"x": dx}
        if w is not None:
            out["w"] = (g * xhat).sum(lead)
        return out

    def autograd_reference(self, inputs, attrs):
        x = inputs["x"]
        dims = list(range(x.dim() - len(attrs["normalized_shape"]), x.dim()))
        y = x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + self._eps(x, attrs))
        return {"y": y * inputs["w"] if "w" in inputs else y}

    def examples(self):
        g = torch.Generator().manual_seed(5)
        x = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
        w = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
        attrs = {"normalized_shape": (8,), "eps": 1e-6, "shape": tuple(x.shape)}
        return [({"x": x, "w": w}, attrs), ({"x": x, "w": w}, {**attrs, "decomposed": True})]
