"""How the runtime runs each catalogue alternative on real tensors.

Two kinds of implementation:

* **PyTorch's own**: the first forward alternative of a kind (what autograd runs) is the
  captured aten call itself, and the first alternative of every backward step is a local
  backward graph (:mod:`monetdsl.lowering.graphs`): both equal eager PyTorch bit for bit.
* **The others** are listed here, keyed by ``(kind, alternative)``, written with aten
  calls where one exists (so a backward from the input or from int64 indices is still
  eager's kernel) and with the custom ops of :mod:`monetdsl.lowering.ops` for the compact
  forms (1-bit masks, int8 window indices, batch norm from its output).

Forward functions get an :class:`OpContext` (the op's input roles, attributes and a way
to run the captured call) and return the op's output roles plus the derived tensors of
the alternative. ``saved`` is ``None`` for the first forward and, for a recomputation,
holds what the alternative's ``recompute reads`` name (batch statistics, a mask, a seed),
so a recomputation reproduces the first forward exactly and never touches running
statistics or the global RNG. Backward functions get the tensors the alternative reads
(by role) and the incoming gradients, and return the gradients of their input roles;
an alternative that accumulates a parameter gradient also gets ``into`` (role ->
:class:`~monetdsl.catalogue.base.GradTarget`) and adds that gradient there instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..catalogue.dropout import draw_seed
from ..catalogue import CATALOGUE
from ..catalogue.activations import INPLACE_BACKWARD
from ..catalogue.linear import CONV_WEIGHT_GRAD_INTO, matmul_weight_grad_into
from . import ops as _ops  # noqa: F401 - registers torch.ops.monetdsl
from .overwriting import clamp_backward_inplace, conv_dgrad_sliced_inplace

__all__ = ["OpContext", "FORWARD", "RECOMPUTE", "AUTOGRAD_FORWARDS", "BACKWARD", "forward_function", "backward_function"]

aten = torch.ops.aten
mops = torch.ops.monetdsl


@dataclass
class OpContext:
    """What an alternative sees of its op: input roles, attributes and the captured call."""

    kind: str
    attrs: dict
    inputs: dict
    call: Callable[[], dict]  # runs the captured aten call(s): output roles -> tensors


def _stand_in(like: torch.Tensor, shape) -> torch.Tensor:
    """A one-element tensor expanded to ``shape``: for kernels that need only a shape."""
    return like.new_empty(1).expand(tuple(shape))


# ------------------------------------------------------------------------ ReLU family
def _region(kind: str, attrs: dict) -> tuple[float, float]:
    if kind == "hardtanh":
        return attrs["min"], attrs["max"]
    return 0.0, math.inf


def _clamp_inplace(ctx: OpContext, saved):
    x = ctx.inputs["x"]
    if ctx.kind == "relu":
        return {"y": aten.relu_(x)}
    if ctx.kind == "leaky_relu":
        return {"y": aten.leaky_relu_(x, ctx.attrs["slope"])}
    return {"y": aten.hardtanh_(x, ctx.attrs["min"], ctx.attrs["max"])}


def _clamp_mask(ctx: OpContext, saved):
    bits = mops.region_bits(ctx.inputs["x"], *_region(ctx.kind, ctx.attrs))
    out = ctx.call()
    return {"y": out["y"], "mask": bits}


def _clamp_inplace_mask(ctx: OpContext, saved):
    bits = mops.region_bits(ctx.inputs["x"], *_region(ctx.kind, ctx.attrs))  # before x is overwritten
    out = _clamp_inplace(ctx, saved)
    out["mask"] = bits
    return out


def _slope(ctx_kind: str, attrs: dict) -> float:
    return float(attrs.get("slope", 0.0)) if ctx_kind == "leaky_relu" else 0.0


def _clamp_backward(kind: str, alt: str):
    def run(ctx: OpContext, saved: dict, grads: dict) -> dict:
        g = grads["y"]
        if alt == "from_mask":
            return {"x": mops.masked_grad(g, saved["mask"], _slope(kind, ctx.attrs))}
        t = saved["x"] if alt == "from_input" else saved["y"]
        if kind == "relu":
            return {"x": aten.threshold_backward(g, t, 0)}
        if kind == "leaky_relu":
            return {"x": aten.leaky_relu_backward(g, t, ctx.attrs["slope"], False)}
        return {"x": aten.hardtanh_backward(g, t, ctx.attrs["min"], ctx.attrs["max"])}

    return run


# --------------------------------------------------------------- output activations, in place
def _output_inplace(ctx: OpContext, saved):
    x = ctx.inputs["x"]
    if ctx.kind == "tanh":
        return {"y": aten.tanh_(x)}
    if ctx.kind == "sigmoid":
        return {"y": aten.sigmoid_(x)}
    if ctx.kind == "softmax":
        return {"y": aten._softmax.out(x, ctx.attrs["dim"], False, out=x)}
    return {"y": aten._log_softmax.out(x, ctx.attrs["dim"], False, out=x)}


# ------------------------------------------------------------------------------ batch norm
def _bn_forward(ctx: OpContext, saved):
    """First forward: eager's kernel, updating the running statistics in place (once).
    A recomputation renormalises without touching them (bit-identical output)."""
    i, a = ctx.inputs, ctx.attrs
    w, b = i.get("w"), i.get("b")
    if saved is None:
        y, mean, invstd = aten._native_batch_norm_legit.default(i["x"], w, b, i["running_mean"], i["running_var"], True, a["momentum"], a["eps"])
    else:
        y, mean, invstd = aten._native_batch_norm_legit.no_stats(i["x"], w, b, True, a["momentum"], a["eps"])
    return {"y": y, "mean": mean, "invstd": invstd}


def _norm_grads(ctx: OpContext, dx, dw, db) -> dict:
    """A normalisation's input gradient, and its weight's and bias's where it has them."""
    out = {"x": dx}
    if "w" in ctx.attrs["affine"]:
        out["w"] = dw
    if "b" in ctx.attrs["affine"]:
        out["b"] = db
    return out


def _bn_from_output(ctx: OpContext, saved: dict, grads: dict) -> dict:
    return _norm_grads(ctx, *mops.bn_backward_from_output(grads["y"], saved["y"], saved["invstd"], saved.get("w"),
                                                          saved.get("b")))


def _ln_from_output(ctx: OpContext, saved: dict, grads: dict) -> dict:
    return _norm_grads(ctx, *mops.layer_norm_backward_from_output(grads["y"], saved["y"], saved["rstd"], saved.get("w"),
                                                                  saved.get("b"), list(ctx.attrs["normalized_shape"])))


def _rms_backward(alt: str):
    def run(ctx: OpContext, saved: dict, grads: dict) -> dict:
        from_output = alt == "from_output"
        dx, dw = mops.rms_norm_backward(grads["y"], saved["y" if from_output else "x"], saved["rstd"], saved.get("w"),
                                        from_output, list(ctx.attrs["normalized_shape"]))
        return {"x": dx, "w": dw} if "w" in saved else {"x": dx}

    return run


def _sdpa_from_probs(ctx: OpContext, saved: dict, grads: dict) -> dict:
    dq, dk, dv = mops.attention_backward_from_probs(grads["y"], saved["q"], saved["k"], saved["v"], saved["probs"], ctx.attrs["scale"])
    return {"q": dq, "k": dk, "v": dv}


def _cross_entropy_from_output(ctx: OpContext, saved: dict, grads: dict) -> dict:
    return {"x": mops.cross_entropy_backward_from_log_probs(grads["y"], saved["lsm"], saved["target"], saved["total_weight"],
                                                             ctx.attrs["reduction"], ctx.attrs["ignore_index"])}


def _linear_ce_grads_in_forward(ctx: OpContext, saved):
    """The catalogue's own row-chunk code (plain torch calls, so the workspace probe sees
    each chunk's temporaries); a recomputation makes the same tensors again."""
    return CATALOGUE["linear_cross_entropy"].forward("grads_in_forward", ctx.inputs, ctx.attrs)


def _linear_ce_backward(alt: str):
    """``chunked`` and ``from_grads`` (and their ``_into_grad`` forms, given ``into``): the
    catalogue's code, on the tensors the alternative reads (x only when w's gradient is
    wanted, w only when x's is)."""
    def run(ctx: OpContext, saved: dict, grads: dict, into: dict | None = None) -> dict:
        return CATALOGUE["linear_cross_entropy"].backward("backward", alt, grads, saved, ctx.attrs, into)

    return run


# ------------------------------------------------------------------ weight gradients into .grad
def _conv_into_grad(whole, into_grad):
    """The weight gradient added into (or written to) ``.grad`` by the catalogue's code
    (``into_grad``: output-channel chunks; ``im2col_into_grad``: one matrix product), or,
    when there is no ``.grad`` yet (a target to adopt), made whole by ``whole`` and handed
    over; the bias gradient, small, is returned as usual."""
    def run(ctx: OpContext, saved: dict, grads: dict, into: dict) -> dict:
        g, target = grads["y"], into["w"]
        if target.tensor is None:
            target.adopt(whole(saved["x"], g, ctx.attrs))
        else:
            into_grad(target.tensor, saved["x"], g, ctx.attrs, overwrite=target.overwrite)
        if ctx.attrs["bias"]:
            return {"b": g.sum([0] + list(range(2, g.dim())))}
        return {}

    return run


def _matmul_into_grad(ctx: OpContext, saved: dict, grads: dict, into: dict) -> dict:
    g, target = grads["y"], into["b"]
    matmul_weight_grad_into(target.tensor, saved["a"], g, overwrite=target.overwrite)
    if "bias_shape" in ctx.attrs:
        return {"bias": g.sum(0) if len(ctx.attrs["bias_shape"]) == 1 else g.sum_to_size(ctx.attrs["bias_shape"])}
    return {}


# ------------------------------------------------------------------------------- max pooling
def _pool_args(attrs: dict) -> tuple:
    return list(attrs["kernel"]), list(attrs["stride"]), list(attrs["padding"]), list(attrs["dilation"]), attrs["ceil_mode"]


def _pool_window(ctx: OpContext, saved):
    out = ctx.call()
    a = ctx.attrs
    window = mops.window_from_indices(out["indices"], list(a["kernel"]), list(a["stride"]), list(a["padding"]), list(a["dilation"]), list(a["shape"]))
    return {"y": out["y"], "window": window}


def _pool_backward(alt: str):
    def run(ctx: OpContext, saved: dict, grads: dict) -> dict:
        g, a = grads["y"], ctx.attrs
        if alt == "from_indices":
            return {"x": aten.max_pool2d_with_indices_backward(g, _stand_in(g, a["shape"]), *_pool_args(a), saved["indices"])}
        if alt == "from_window":
            indices = mops.indices_from_window(saved["window"], list(a["kernel"]), list(a["stride"]), list(a["padding"]),
                                               list(a["dilation"]), list(a["shape"]))
            return {"x": aten.max_pool2d_with_indices_backward(g, _stand_in(g, a["shape"]), *_pool_args(a), indices)}
        x = saved["x"]  # from_input: find the maxima again
        _, indices = aten.max_pool2d_with_indices(x, *_pool_args(a))
        return {"x": aten.max_pool2d_with_indices_backward(g, x, *_pool_args(a), indices)}

    return run


def _avg_pool_from_shape(ctx: OpContext, saved: dict, grads: dict) -> dict:
    g = grads["y"]
    return {"x": aten._adaptive_avg_pool2d_backward(g, _stand_in(g, ctx.attrs["shape"]))}


# ---------------------------------------------------------------------------------- dropout
def _scale(attrs: dict) -> float:
    return 1.0 / (1.0 - attrs["p"])


def _apply_mask(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Eager dropout for a given mask, bit for bit: eager multiplies by the mask scaled in
    the tensor's dtype (``noise``), in the forward and in the backward alike. In single
    and double precision scaling after masking rounds the same, with no temporary."""
    if x.dtype in (torch.float32, torch.float64):
        return x.mul(mask).mul_(scale)
    return x * (mask.to(x.dtype) * scale)


_mask_backward = _apply_mask


def _eager_mask(ctx: OpContext) -> dict:
    """Dropout as eager runs it: on the CPU, a bool tensor filled by ``bernoulli_`` draws
    exactly the mask (and consumes exactly the RNG) of eager's float mask and of
    ``native_dropout``, without their float temporary and bool conversion; elsewhere the
    captured ``native_dropout`` itself."""
    x = ctx.inputs["x"]
    if x.device.type != "cpu":
        return ctx.call()
    mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - ctx.attrs["p"])
    return {"y": _apply_mask(x, mask, _scale(ctx.attrs)), "mask": mask}


def _dropout_bool(ctx: OpContext, saved):
    if saved is None:
        return _eager_mask(ctx)
    return {"y": _apply_mask(ctx.inputs["x"], saved["mask"], _scale(ctx.attrs)), "mask": saved["mask"]}


def _dropout_bits(ctx: OpContext, saved):
    x = ctx.inputs["x"]
    if saved is None:
        out = _eager_mask(ctx)  # eager's mask (the same RNG stream), kept as one bit per element
        return {"y": out["y"], "bits": mops.pack_bits(out["mask"])}
    return {"y": mops.apply_bits(x, saved["bits"], _scale(ctx.attrs)), "bits": saved["bits"]}


def _dropout_seed(ctx: OpContext, saved):
    x = ctx.inputs["x"]
    seed = draw_seed() if saved is None else saved["seed"]
    return {"y": mops.dropout_seeded(x, seed, ctx.attrs["p"]), "seed": seed}


def _dropout_backward(alt: str):
    def run(ctx: OpContext, saved: dict, grads: dict) -> dict:
        g = grads["y"]
        if alt == "from_bits":
            return {"x": mops.apply_bits(g, saved["bits"], _scale(ctx.attrs))}
        if alt == "from_seed":
            return {"x": mops.dropout_seeded(g, saved["seed"], ctx.attrs["p"])}
        return {"x": _mask_backward(g, saved["mask"], _scale(ctx.attrs))}

    return run


# -------------------------------------------------------------------------- add, attention
def _add_inplace(ctx: OpContext, saved):
    return {"y": ctx.inputs["a"].add_(ctx.inputs["b"], alpha=ctx.attrs["alpha"])}


def _sdpa_math(ctx: OpContext, saved):
    out = ctx.call()  # the flash kernel's output and log-sum-exp, as eager computes them
    probs = mops.attention_probs(ctx.inputs["q"], ctx.inputs["k"], out["lse"], ctx.attrs["is_causal"], ctx.attrs["scale"])
    return {**out, "probs": probs}


# ----------------------------------------------------------------------------------- tables
#: (kind, forward alternative) -> function(ctx, saved) for the first forward and recomputations
FORWARD: dict[tuple[str, str], Callable] = {}
for _kind in ("relu", "leaky_relu", "hardtanh"):
    FORWARD[(_kind, "inplace")] = _clamp_inplace
    FORWARD[(_kind, "mask")] = _clamp_mask
    FORWARD[(_kind, "inplace_mask")] = _clamp_inplace_mask
for _kind in ("tanh", "sigmoid", "softmax", "log_softmax"):
    FORWARD[(_kind, "inplace")] = _output_inplace
FORWARD[("batch_norm", "default")] = _bn_forward
FORWARD[("max_pool2d", "window")] = _pool_window
FORWARD[("dropout", "bool_mask")] = _dropout_bool
FORWARD[("dropout", "bit_mask")] = _dropout_bits
FORWARD[("dropout", "rng_replay")] = _dropout_seed
FORWARD[("add", "inplace")] = _add_inplace
FORWARD[("sdpa", "math")] = _sdpa_math
FORWARD[("linear_cross_entropy", "grads_in_forward")] = _linear_ce_grads_in_forward

#: first forward alternatives with a function of their own that record, under autograd,
#: the same backward as the captured call (eager's kernel; the mask times the scale)
AUTOGRAD_FORWARDS = {("batch_norm", "default"), ("dropout", "bool_mask")}

#: alternatives whose recomputation differs from their first forward (handled by ``saved``)
RECOMPUTE = {("batch_norm", "default"), ("dropout", "bool_mask"), ("dropout", "bit_mask"), ("dropout", "rng_replay")}

#: (kind, backward alternative) -> function(ctx, saved, grads) for alternatives that are not PyTorch's own
#: (and for PyTorch's own where a leaner equivalent exists: FASTER)
BACKWARD: dict[tuple[str, str], Callable] = {}
for _kind in ("relu", "leaky_relu", "hardtanh"):
    for _alt in ("from_input", "from_output", "from_mask"):
        BACKWARD[(_kind, _alt)] = _clamp_backward(_kind, _alt)
    for _alt in INPLACE_BACKWARD:  # written over the incoming gradient
        BACKWARD[(_kind, f"{_alt}_inplace")] = clamp_backward_inplace(_kind, _alt, _clamp_backward(_kind, _alt))
BACKWARD[("conv", "sliced_inplace")] = conv_dgrad_sliced_inplace
BACKWARD[("batch_norm", "from_output")] = _bn_from_output
BACKWARD[("layer_norm", "from_output")] = _ln_from_output
BACKWARD[("rms_norm", "from_input")] = _rms_backward("from_input")
BACKWARD[("rms_norm", "from_output")] = _rms_backward("from_output")
for _alt in ("from_indices", "from_window", "from_input"):
    BACKWARD[("max_pool2d", _alt)] = _pool_backward(_alt)
BACKWARD[("adaptive_avg_pool2d", "from_shape")] = _avg_pool_from_shape
for _alt in ("from_mask", "from_bits", "from_seed"):
    BACKWARD[("dropout", _alt)] = _dropout_backward(_alt)
BACKWARD[("sdpa", "math")] = _sdpa_from_probs
BACKWARD[("cross_entropy", "from_output")] = _cross_entropy_from_output
for _alt in ("chunked", "from_grads"):
    BACKWARD[("linear_cross_entropy", _alt)] = _linear_ce_backward(_alt)
    BACKWARD[("linear_cross_entropy", f"{_alt}_into_grad")] = _linear_ce_backward(f"{_alt}_into_grad")
#: these take ``into`` (role -> GradTarget): the parameter gradients they add into in place
for _alt, (_whole, _into) in CONV_WEIGHT_GRAD_INTO.items():
    BACKWARD[("conv", _alt)] = _conv_into_grad(_whole, _into)
#: into_grad alternatives that can take a target to adopt (:class:`~monetdsl.catalogue.base.GradTarget`)
ADOPTING = frozenset(("conv", alt) for alt in CONV_WEIGHT_GRAD_INTO)
BACKWARD[("matmul", "into_grad")] = _matmul_into_grad

#: PyTorch's own backward alternatives replaced by an equivalent with the same result bit for bit
FASTER = {("dropout", "from_mask")}


def forward_function(kind: str, alt: str) -> Callable | None:
    """The runtime's function for a forward alternative; ``None``: run the captured call."""
    return FORWARD.get((kind, alt))


def backward_function(kind: str, alt: str, first: bool = False) -> Callable | None:
    """The runtime's function for a backward alternative; ``None``: no hand-written one
    (PyTorch's own alternative, ``first``, runs as a local backward graph unless a
    bit-identical leaner one is listed in ``FASTER``)."""
    if first and (kind, alt) not in FASTER:
        return None
    return BACKWARD.get((kind, alt))
