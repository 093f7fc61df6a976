"""The catalogue's compact forms as torch custom ops (``torch.ops.monetdsl.*``).

Each op has a CPU implementation in plain torch (the catalogue's reference formulas,
with numpy's bit packing for speed) and, for the ones that move bits around, a CUDA
implementation that launches the numba kernels of :mod:`monetdsl.lowering.kernels` on
torch's current stream. A fake (meta) implementation gives every op its output shapes,
so the ops can be traced like aten ops.

Registered once, on import. The layout of a packed mask is the catalogue's:
``ceil(numel / 8)`` bytes, bit ``j`` of byte ``k`` = element ``8k + j``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..catalogue.loss import cross_entropy_grad_from_log_probs
from ..catalogue.norms import GammaHasZeros
from ..catalogue.packing import pack_bits as _reference_pack, unpack_bits as _reference_unpack

__all__ = [
    "pack_bits",
    "unpack_bits",
    "region_bits",
    "masked_grad",
    "masked_grad_",
    "apply_bits",
    "bn_backward_from_output",
    "window_from_indices",
    "indices_from_window",
    "dropout_seeded",
    "layer_norm_backward_from_output",
    "rms_norm_backward",
    "attention_probs",
    "attention_backward_from_probs",
    "cross_entropy_backward_from_log_probs",
    "CUDA_OPS",
]

_NS = "monetdsl"


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------------------- CPU helpers
def _pack_cpu(mask: Tensor) -> Tensor:
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool:
        flat = flat != 0
    if flat.device.type != "cpu":
        return _reference_pack(flat)
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8)  # through torch's allocator, so probes see it
    out.numpy()[:] = np.packbits(flat.contiguous().numpy(), bitorder="little")
    return out


def _unpack_cpu(bits: Tensor, numel: int) -> Tensor:
    if bits.device.type != "cpu":
        return _reference_unpack(bits, (numel,))
    out = torch.empty(numel, dtype=torch.bool)
    out.numpy()[:] = np.unpackbits(bits.contiguous().numpy(), count=numel, bitorder="little").view(np.bool_)
    return out


# ---------------------------------------------------------------------------------- ops
@torch.library.custom_op(f"{_NS}::pack_bits", mutates_args=())
def pack_bits(mask: Tensor) -> Tensor:
    """A mask (bool, or any dtype: nonzero = set) as ``ceil(numel/8)`` bytes."""
    return _pack_cpu(mask)


@pack_bits.register_fake
def _(mask):
    return mask.new_empty((mask.numel() + 7) // 8, dtype=torch.uint8)


@torch.library.custom_op(f"{_NS}::unpack_bits", mutates_args=())
def unpack_bits(bits: Tensor, shape: Sequence[int]) -> Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed."""
    return _unpack_cpu(bits, _numel(shape)).reshape(tuple(shape))


@unpack_bits.register_fake
def _(bits, shape):
    return bits.new_empty(tuple(shape), dtype=torch.bool)


def _region_bits_torch(x: Tensor, low: float, high: float) -> Tensor:
    """The torch formula of :func:`region_bits`: the CPU implementation, and the GPU one for dtypes numba cannot index."""
    region = x > low
    if not math.isinf(high):
        region &= x < high
    return _pack_cpu(region)


@torch.library.custom_op(f"{_NS}::region_bits", mutates_args=())
def region_bits(x: Tensor, low: float, high: float) -> Tensor:
    """1-bit mask of ``low < x < high``: where a ReLU (``0, inf``), a LeakyReLU or a
    hardtanh (``min, max``) is in its linear region."""
    return _region_bits_torch(x, low, high)


@region_bits.register_fake
def _(x, low, high):
    return x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)


def _masked_grad_torch(grad: Tensor, bits: Tensor, slope: float) -> Tensor:
    """The torch formula of :func:`masked_grad`: the CPU implementation, and the GPU one for dtypes numba cannot index."""
    region = _unpack_cpu(bits, grad.numel()).reshape(grad.shape)
    if slope == 0.0:
        return torch.where(region, grad, 0.0)
    return torch.where(region, grad, grad * slope)


@torch.library.custom_op(f"{_NS}::masked_grad", mutates_args=())
def masked_grad(grad: Tensor, bits: Tensor, slope: float) -> Tensor:
    """The ReLU-family backward from a 1-bit mask: ``grad`` where the bit is set,
    ``grad * slope`` (0 for ReLU and hardtanh) elsewhere."""
    return _masked_grad_torch(grad, bits, slope)


@masked_grad.register_fake
def _(grad, bits, slope):
    return torch.empty_like(grad)


def _masked_grad_inplace_torch(grad: Tensor, bits: Tensor, slope: float) -> None:
    """The torch formula of :func:`masked_grad_`: the CPU implementation, and the GPU one for dtypes numba cannot index."""
    outside = ~_unpack_cpu(bits, grad.numel()).reshape(grad.shape)
    if slope == 0.0:
        grad.masked_fill_(outside, 0.0)
    else:
        grad.copy_(torch.where(outside, grad * slope, grad))


@torch.library.custom_op(f"{_NS}::masked_grad_", mutates_args=("grad",))
def masked_grad_(grad: Tensor, bits: Tensor, slope: float) -> None:
    """:func:`masked_grad` written into ``grad`` (when the incoming gradient dies here)."""
    _masked_grad_inplace_torch(grad, bits, slope)


def _apply_bits_torch(x: Tensor, bits: Tensor, scale: float) -> Tensor:
    """The torch formula of :func:`apply_bits`: the CPU implementation, and the GPU one for dtypes numba cannot index."""
    return _masked_scale(x, _unpack_cpu(bits, x.numel()).reshape(x.shape), scale)


@torch.library.custom_op(f"{_NS}::apply_bits", mutates_args=())
def apply_bits(x: Tensor, bits: Tensor, scale: float) -> Tensor:
    """Dropout with a kept 1-bit mask: ``x * mask * scale`` (as ``native_dropout``
    computes it, so a recomputation equals the first forward bit for bit)."""
    return _apply_bits_torch(x, bits, scale)


@apply_bits.register_fake
def _(x, bits, scale):
    return torch.empty_like(x)


def _bn_backward_from_output_torch(grad: Tensor, y: Tensor, invstd: Tensor, weight: Optional[Tensor],
                                   bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The torch formula of :func:`bn_backward_from_output`: the CPU implementation, and the GPU one for dtypes numba cannot index.

    Computed in float32 at least (16-bit activations under autocast meet float32 weights
    and statistics, as in eager's kernel); the input gradient comes back in the
    activations' dtype, gamma's and beta's gradients in their parameters' dtypes."""
    if weight is not None and not weight.is_cuda and bool((weight == 0).any()):
        raise GammaHasZeros("batch norm backward from the output needs every gamma != 0; use from_input for this step")
    shape = [1, grad.shape[1]] + [1] * (grad.dim() - 2)
    dims = [0] + list(range(2, grad.dim()))
    compute = torch.promote_types(grad.dtype, torch.float32)
    g = grad.to(compute)
    xhat = y.to(compute) if bias is None else y.to(compute) - bias.to(compute).reshape(shape)
    if weight is not None:
        xhat = xhat / weight.to(compute).reshape(shape)
    sum_g = g.sum(dims)
    sum_gx = (g * xhat).sum(dims)
    count = grad.numel() // grad.shape[1]
    scale = invstd.to(compute) if weight is None else invstd.to(compute) * weight.to(compute)
    dx = scale.reshape(shape) * (g - sum_g.reshape(shape) / count - xhat * sum_gx.reshape(shape) / count)
    return (dx.to(grad.dtype), sum_gx.to(weight.dtype if weight is not None else grad.dtype),
            sum_g.to(bias.dtype if bias is not None else grad.dtype))


@torch.library.custom_op(f"{_NS}::bn_backward_from_output", mutates_args=())
def bn_backward_from_output(grad: Tensor, y: Tensor, invstd: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Batch-norm backward from its output (In-Place ABN): x_hat = (y - beta) / gamma.
    Returns (grad x, grad gamma, grad beta); gamma must have no zero."""
    return _bn_backward_from_output_torch(grad, y, invstd, weight, bias)


@bn_backward_from_output.register_fake
def _(grad, y, invstd, weight, bias):
    c = grad.shape[1]
    return (torch.empty_like(grad), grad.new_empty(c, dtype=weight.dtype if weight is not None else grad.dtype),
            grad.new_empty(c, dtype=bias.dtype if bias is not None else grad.dtype))


def _pool_attrs(kernel, stride, padding, dilation, in_shape, out_shape) -> dict:
    return {"kernel": tuple(kernel), "stride": tuple(stride), "padding": tuple(padding), "dilation": tuple(dilation),
            "shape": tuple(in_shape), "out_shape": tuple(out_shape)}


@torch.library.custom_op(f"{_NS}::window_from_indices", mutates_args=())
def window_from_indices(indices: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], in_shape: Sequence[int]) -> Tensor:
    """Max-pool indices (int64, flat in the input plane) as the int8 position of the
    maximum inside its window: 8x smaller."""
    from ..catalogue import CATALOGUE

    attrs = _pool_attrs(kernel, stride, padding, dilation, in_shape, indices.shape)
    return CATALOGUE["max_pool2d"]._to_window(indices, attrs)


@window_from_indices.register_fake
def _(indices, kernel, stride, padding, dilation, in_shape):
    return indices.new_empty(indices.shape, dtype=torch.int8)


@torch.library.custom_op(f"{_NS}::indices_from_window", mutates_args=())
def indices_from_window(window: Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], in_shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`window_from_indices`."""
    from ..catalogue import CATALOGUE

    attrs = _pool_attrs(kernel, stride, padding, dilation, in_shape, window.shape)
    return CATALOGUE["max_pool2d"]._from_window(window, attrs)


@indices_from_window.register_fake
def _(window, kernel, stride, padding, dilation, in_shape):
    return window.new_empty(window.shape, dtype=torch.int64)


# ------------------------------------------------- composite alternatives (torch on every device)
@torch.library.custom_op(f"{_NS}::dropout_seeded", mutates_args=())
def dropout_seeded(x: Tensor, seed: Tensor, p: float) -> Tensor:
    """Dropout whose keep-mask comes from ``seed`` (``rng_replay``): ``x * mask * scale``.
    The same call with the same seed gives the same mask, for a recomputation and for the
    backward alike; the bool mask is a temporary of this op."""
    from ..catalogue.dropout import mask_from_seed

    mask = mask_from_seed(seed, x.shape, p, x.device)
    return _masked_scale(x, mask, 1.0 / (1.0 - p))


def _masked_scale(x: Tensor, mask: Tensor, scale: float) -> Tensor:
    """``x * mask * scale`` rounded as eager dropout rounds it: on the CPU the mask is
    scaled in x's dtype first (in single and double precision both orders round alike);
    on a GPU half-precision inputs are computed in float32 and rounded once."""
    if x.dtype in (torch.float32, torch.float64):
        return x.mul(mask).mul_(scale)
    if x.is_cuda:
        return x.float().mul_(mask).mul_(scale).to(x.dtype)
    return x * (mask.to(x.dtype) * scale)


@dropout_seeded.register_fake
def _(x, seed, p):
    return torch.empty_like(x)


def _reference(kind: str, alt: str, grad: Tensor, saved: dict, attrs: dict) -> dict:
    """The catalogue's backward formula, computed in float32 at least (16-bit activations
    under autocast meet float32 weights and statistics); each gradient comes back in its
    tensor's dtype: the input's as the incoming gradient, a weight's or bias's as that
    parameter."""
    from ..catalogue import CATALOGUE

    compute = torch.promote_types(grad.dtype, torch.float32)
    wide = {role: (t.to(compute) if t.is_floating_point() else t) for role, t in saved.items()}
    out = CATALOGUE[kind].backward("backward", alt, {"y": grad.to(compute)}, wide, attrs)
    dtypes = {"x": grad.dtype, **{role: saved[role].dtype for role in ("w", "b") if role in saved}}
    return {role: t.to(dtypes.get(role, t.dtype)) for role, t in out.items()}


@torch.library.custom_op(f"{_NS}::layer_norm_backward_from_output", mutates_args=())
def layer_norm_backward_from_output(grad: Tensor, y: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                    normalized_shape: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Layer-norm backward from its output: x_hat = (y - b) / w (w must have no zero).
    Returns (grad x, grad w, grad b); the last two are empty without affine parameters."""
    saved = {"y": y, "rstd": rstd}
    affine = tuple(r for r, t in (("w", weight), ("b", bias)) if t is not None)
    if weight is not None:
        saved["w"] = weight
    if bias is not None:
        saved["b"] = bias
    out = _reference("layer_norm", "from_output", grad, saved, {"normalized_shape": tuple(normalized_shape), "affine": affine})
    return out["x"], out.get("w", grad.new_empty(0)), out.get("b", grad.new_empty(0))


@layer_norm_backward_from_output.register_fake
def _(grad, y, rstd, weight, bias, normalized_shape):
    return (torch.empty_like(grad), (weight.new_empty(weight.shape) if weight is not None else grad.new_empty(0)),
            (bias.new_empty(bias.shape) if bias is not None else grad.new_empty(0)))


@torch.library.custom_op(f"{_NS}::rms_norm_backward", mutates_args=())
def rms_norm_backward(grad: Tensor, saved: Tensor, rstd: Tensor, weight: Optional[Tensor], from_output: bool,
                      normalized_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """RMS-norm backward from its input (``saved`` = x) or from its output (``saved`` = y,
    w must have no zero). Returns (grad x, grad w) (empty without a weight)."""
    role = "y" if from_output else "x"
    values = {role: saved, "rstd": rstd}
    if weight is not None:
        values["w"] = weight
    out = _reference("rms_norm", "from_output" if from_output else "from_input", grad, values,
                     {"normalized_shape": tuple(normalized_shape)})
    return out["x"], out.get("w", grad.new_empty(0))


@rms_norm_backward.register_fake
def _(grad, saved, rstd, weight, from_output, normalized_shape):
    return torch.empty_like(grad), (weight.new_empty(weight.shape) if weight is not None else grad.new_empty(0))


@torch.library.custom_op(f"{_NS}::cross_entropy_backward_from_log_probs", mutates_args=())
def cross_entropy_backward_from_log_probs(grad: Tensor, lsm: Tensor, target: Tensor, total_weight: Tensor, reduction: int,
                                          ignore_index: int) -> Tensor:
    """The logits' gradient of log-softmax + NLL loss from the kept log-probabilities, in one
    new tensor: ``scale * (exp(lsm) - onehot(target))`` per row (every device: torch)."""
    return cross_entropy_grad_from_log_probs(grad, lsm, target, total_weight, reduction, ignore_index)


@cross_entropy_backward_from_log_probs.register_fake
def _(grad, lsm, target, total_weight, reduction, ignore_index):
    return torch.empty_like(lsm)


@torch.library.custom_op(f"{_NS}::attention_probs", mutates_args=())
def attention_probs(q: Tensor, k: Tensor, lse: Tensor, is_causal: bool, scale: Optional[float]) -> Tensor:
    """The attention probabilities exp(q k^T * scale - lse) the ``math`` alternative keeps."""
    s = q @ k.transpose(-1, -2)
    s.mul_(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        keep = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s.masked_fill_(~keep, float("-inf"))
    return s.sub_(lse.reshape(s.shape[:-1]).unsqueeze(-1)).exp_()


@attention_probs.register_fake
def _(q, k, lse, is_causal, scale):
    return q.new_empty(tuple(q.shape[:-1]) + (k.shape[-2],))


@torch.library.custom_op(f"{_NS}::attention_backward_from_probs", mutates_args=())
def attention_backward_from_probs(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, probs: Tensor,
                                  scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward from the kept probabilities (``math``): (grad q, grad k, grad v)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dv = probs.transpose(-1, -2) @ grad
    ds = grad @ v.transpose(-1, -2)
    ds.sub_((ds * probs).sum(-1, keepdim=True)).mul_(probs)
    return (ds @ k).mul_(scale), (ds.transpose(-1, -2) @ q).mul_(scale), dv


@attention_backward_from_probs.register_fake
def _(grad, q, k, v, probs, scale):
    # matrix products: contiguous results, whatever the layout of q, k and v (the layout
    # matters to what follows: the gradient adapter of a q/k/v split copies a transposed one)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ---------------------------------------------------------------------------- CUDA (numba)
def _device_array(t: Tensor):
    from numba import cuda

    return cuda.as_cuda_array(t.detach())


def _stream(t: Tensor):
    from numba import cuda

    return cuda.external_stream(torch.cuda.current_stream(t.device).cuda_stream)


#: dtypes numba.cuda can index through ``__cuda_array_interface__`` (not bfloat16)
_NUMBA_DTYPES = {torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int64, torch.bool}


def _numba_can_run(*tensors) -> bool:
    return all(t is None or t.dtype in _NUMBA_DTYPES for t in tensors)


def _as_words(flat: Tensor) -> Optional[Tensor]:
    """A flat byte tensor as int64 words, when its length and address allow."""
    if flat.numel() % 8 or flat.data_ptr() % 8:
        return None
    return flat.view(torch.int64)


def _flat_bytes(t: Tensor) -> Tensor:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype == torch.bool else flat


@pack_bits.register_kernel("cuda")
def _(mask):
    from . import kernels

    flags = _flat_bytes(mask if mask.dtype in (torch.bool, torch.uint8) else mask != 0)
    out = torch.empty((flags.numel() + 7) // 8, dtype=torch.uint8, device=mask.device)
    words = _as_words(flags)
    if words is not None:  # eight flags per 8-byte load
        kernels.launch_pack_words(_device_array(words), _device_array(out), _stream(out))
    else:
        kernels.launch_pack_bits(_device_array(flags), _device_array(out), flags.numel(), _stream(out))
    return out


@unpack_bits.register_kernel("cuda")
def _(bits, shape):
    from . import kernels

    n = _numel(shape)
    out = torch.empty(n, dtype=torch.uint8, device=bits.device)
    if n % 8 == 0:  # eight flags per 8-byte store
        kernels.launch_unpack_words(_device_array(bits.contiguous()), _device_array(out.view(torch.int64)), _stream(out))
    else:
        kernels.launch_unpack_bits(_device_array(bits.contiguous()), _device_array(out), n, _stream(out))
    return out.view(torch.bool).reshape(tuple(shape))


@region_bits.register_kernel("cuda")
def _(x, low, high):
    from . import kernels

    if not _numba_can_run(x):
        return _region_bits_torch(x, low, high)
    flat = x.detach().contiguous().reshape(-1)
    out = torch.empty((flat.numel() + 7) // 8, dtype=torch.uint8, device=x.device)
    kernels.launch_region_bits(_device_array(flat), _device_array(out), flat.numel(), float(low), float(high), _stream(out))
    return out


def _elementwise_with_bits(launch, x: Tensor, bits: Tensor, scalar: float) -> Tensor:
    """The body both "an element and its bit" ops share: a fresh output shaped like ``x``."""
    flat = x.detach().contiguous().reshape(-1)
    out = torch.empty_like(flat)
    launch(_device_array(flat), _device_array(bits.contiguous()), _device_array(out), flat.numel(), float(scalar), _stream(out))
    return out.reshape(x.shape)


@masked_grad.register_kernel("cuda")
def _(grad, bits, slope):
    from . import kernels

    if not _numba_can_run(grad):
        return _masked_grad_torch(grad, bits, slope)
    return _elementwise_with_bits(kernels.launch_masked_grad, grad, bits, slope)


@masked_grad_.register_kernel("cuda")
def _(grad, bits, slope):
    from . import kernels

    if not _numba_can_run(grad):
        return _masked_grad_inplace_torch(grad, bits, slope)
    if not grad.is_contiguous():
        raise ValueError("masked_grad_ needs a contiguous gradient")
    kernels.launch_masked_grad_inplace(_device_array(grad.reshape(-1)), _device_array(bits), grad.numel(), float(slope), _stream(grad))


@apply_bits.register_kernel("cuda")
def _(x, bits, scale):
    from . import kernels

    if not _numba_can_run(x):
        return _apply_bits_torch(x, bits, scale)
    return _elementwise_with_bits(kernels.launch_apply_bits, x, bits, scale)


@bn_backward_from_output.register_kernel("cuda")
def _(grad, y, invstd, weight, bias):
    from . import kernels

    if not _numba_can_run(grad, y, invstd, weight, bias):
        return _bn_backward_from_output_torch(grad, y, invstd, weight, bias)
    g = grad.detach().contiguous()
    yy = y.detach().contiguous()
    c = g.shape[1]
    sums = torch.zeros(2, c, dtype=torch.float64, device=g.device)
    out = torch.empty_like(g)
    w = _device_array(weight.detach().contiguous()) if weight is not None else None
    b = _device_array(bias.detach().contiguous()) if bias is not None else None
    kernels.launch_bn_backward_from_output(_device_array(g.reshape(-1)), _device_array(yy.reshape(-1)), w, b,
                                           _device_array(invstd.detach().contiguous()), _device_array(sums),
                                           _device_array(out.reshape(-1)), tuple(g.shape), _stream(out))
    return (out, sums[1].to(weight.dtype if weight is not None else g.dtype),
            sums[0].to(bias.dtype if bias is not None else g.dtype))


def _convert_pool_positions(launch, t: Tensor, dtype: torch.dtype, kernel, stride, padding, dilation, in_shape) -> Tensor:
    """The body both max-pool index conversions share: ``t`` re-encoded as ``dtype``."""
    flat = t.detach().contiguous().reshape(-1)
    out = torch.empty(flat.numel(), dtype=dtype, device=t.device)
    attrs = _pool_attrs(kernel, stride, padding, dilation, in_shape, t.shape)
    launch(_device_array(flat), _device_array(out), flat.numel(), attrs, _stream(out))
    return out.reshape(t.shape)


@window_from_indices.register_kernel("cuda")
def _(indices, kernel, stride, padding, dilation, in_shape):
    from . import kernels

    return _convert_pool_positions(kernels.launch_window_from_indices, indices, torch.int8, kernel, stride, padding, dilation, in_shape)


@indices_from_window.register_kernel("cuda")
def _(window, kernel, stride, padding, dilation, in_shape):
    from . import kernels

    return _convert_pool_positions(kernels.launch_indices_from_window, window, torch.int64, kernel, stride, padding, dilation, in_shape)


#: op name -> kernels it launches on CUDA
CUDA_OPS = {
    "pack_bits": ("pack_words", "region_bits"),
    "unpack_bits": ("unpack_words", "unpack_bits"),
    "region_bits": ("region_bits",),
    "masked_grad": ("masked_grad",),
    "masked_grad_": ("masked_grad_inplace",),
    "apply_bits": ("apply_bits",),
    "bn_backward_from_output": ("bn_channel_sums", "bn_dx"),
    "window_from_indices": ("window_from_indices",),
    "indices_from_window": ("indices_from_window",),
}
