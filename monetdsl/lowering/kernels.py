"""numba.cuda kernels for the compact forms the catalogue offers, and their launchers.

Every kernel loops grid-stride (over elements, tiles or rows, however small the grid), so
the same code runs a full-size grid on a GPU and a tiny grid under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), where each simulated thread is a Python thread; the
batch-norm sums take one block per channel and part, as their launcher sizes the grid.
No warp intrinsics are used (the simulator has none).

Bit layout: bit ``j`` of byte ``k`` holds element ``8k + j`` of the flattened tensor
(``numpy.packbits(bitorder="little")``), as :mod:`monetdsl.catalogue.packing` packs it.

Scalars (slopes, scales, region bounds) are passed as float32, as eager PyTorch's CUDA
kernels hold them (``opmath``), so a recomputed dropout or a LeakyReLU backward rounds
exactly as eager's.

Launchers take arrays numba can index (device arrays from
``numba.cuda.as_cuda_array(tensor.detach())`` on a GPU, numpy arrays in the simulator)
and an optional stream; :mod:`monetdsl.lowering.ops` calls them for CUDA tensors.
"""
from __future__ import annotations

import math

import numpy as np
from numba import cuda, uint8

__all__ = [
    "grid_for",
    "launch_pack_bits",
    "launch_pack_words",
    "launch_region_bits",
    "launch_unpack_bits",
    "launch_unpack_words",
    "launch_masked_grad",
    "launch_masked_grad_inplace",
    "launch_apply_bits",
    "launch_bn_backward_from_output",
    "launch_window_from_indices",
    "launch_indices_from_window",
    "KERNELS",
]

THREADS = 256
#: shared-memory marks of one tile of :func:`_region_bits` (a constant numba can size by)
TILE_MARKS = 8 * THREADS


def grid_for(n: int, threads: int = THREADS) -> tuple[int, int]:
    """(blocks, threads) for ``n`` work items: enough blocks on a GPU, one tiny block in the
    simulator (each simulated thread costs a Python thread; grid-stride loops cover the rest)."""
    if _simulating():
        return 1, 8
    blocks = max(1, min(65535, math.ceil(n / threads)))
    return blocks, threads


def _simulating() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


# ------------------------------------------------------------------------------ bit masks
@cuda.jit
def _region_bits(x, out, n, low, high):
    """Bit i set when low < x[i] < high: the linear region of ReLU (0, inf), LeakyReLU
    (0, inf) and hardtanh (min, max); on 0/1 bytes with (0, inf), the packing of a mask.

    A block takes a tile of ``8 * blockDim`` consecutive elements per turn: each thread
    reads eight elements ``blockDim`` apart (every load coalesced; a thread reading eight
    neighbours would stride the warp's loads by eight) and marks them in shared memory,
    then each thread writes one byte of eight neighbouring marks. The loop's trip count
    is the same for every thread of a block, so the barriers inside it are safe.
    ``blockDim`` must be at most :data:`THREADS`.
    """
    marks = cuda.shared.array(TILE_MARKS, dtype=uint8)
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    tile = 8 * threads
    for base in range(cuda.blockIdx.x * tile, n, cuda.gridDim.x * tile):
        for j in range(8):
            local = j * threads + tid
            i = base + local
            mark = 0
            if i < n:
                v = x[i]
                if v > low and v < high:
                    mark = 1
            marks[local] = mark
        cuda.syncthreads()
        k = base // 8 + tid
        if k < out.shape[0]:
            value = 0
            for j in range(8):
                value |= marks[8 * tid + j] << j
            out[k] = value
        cuda.syncthreads()


@cuda.jit
def _pack_words(words, out):
    """A 0/1 byte mask read as int64 words, eight flags each: byte k of the packed mask
    from word k (one 8-byte load and one byte store per thread)."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for k in range(start, out.shape[0], stride):
        w = words[k]
        value = 0
        for j in range(8):
            if (w >> (8 * j)) & 0xFF:
                value |= 1 << j
        out[k] = value


@cuda.jit
def _unpack_words(bits, words):
    """The inverse of :func:`_pack_words`: word k holds the eight 0/1 bytes of byte k."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for k in range(start, words.shape[0], stride):
        b = int(bits[k])  # widened before shifting into the upper bytes
        value = 0
        for j in range(8):
            value |= ((b >> j) & 1) << (8 * j)
        words[k] = value


@cuda.jit
def _unpack_bits(bits, out, n):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, n, stride):
        out[i] = (bits[i >> 3] >> (i & 7)) & 1


@cuda.jit
def _masked_grad(grad, bits, out, n, slope):
    """out = grad where the bit is set, grad * slope elsewhere (ReLU: slope 0)."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, n, stride):
        if (bits[i >> 3] >> (i & 7)) & 1:
            out[i] = grad[i]
        elif slope == 0.0:
            out[i] = 0.0
        else:
            out[i] = grad[i] * slope


@cuda.jit
def _masked_grad_inplace(grad, bits, n, slope):
    """The ReLU backward from the mask written into the incoming gradient's storage."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, n, stride):
        if not (bits[i >> 3] >> (i & 7)) & 1:
            grad[i] = grad[i] * slope if slope != 0.0 else 0.0


@cuda.jit
def _apply_bits(x, bits, out, n, scale):
    """Dropout from a 1-bit keep-mask: out = x * mask * scale."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, n, stride):
        if (bits[i >> 3] >> (i & 7)) & 1:
            out[i] = x[i] * scale
        else:
            out[i] = x[i] * 0.0


# --------------------------------------------------------------- batch norm from its output
@cuda.jit
def _bn_channel_sums(grad, y, weight, bias, sums, n_outer, channels, inner, has_weight, has_bias):
    """Per channel c: sum(g) and sum(g * x_hat) with x_hat = (y - beta) / gamma, added
    into ``sums`` (zero on entry). The grid is ``channels * parts`` blocks: block b sums
    channel ``b % channels`` over every ``parts``-th batch slice from ``b // channels``
    (rows of ``inner`` contiguous elements: no index division), reduces in shared memory
    and adds its two totals atomically; several blocks per channel keep the GPU busy
    when the channels are few."""
    acc_g = cuda.shared.array(THREADS, dtype="float64")
    acc_gx = cuda.shared.array(THREADS, dtype="float64")
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    parts = cuda.gridDim.x // channels
    c = cuda.blockIdx.x % channels
    part = cuda.blockIdx.x // channels
    w = weight[c] if has_weight else 1.0
    b = bias[c] if has_bias else 0.0
    s_g = 0.0
    s_gx = 0.0
    for nn in range(part, n_outer, parts):
        row = (nn * channels + c) * inner
        for j in range(tid, inner, threads):
            g = grad[row + j]
            s_g += g
            s_gx += g * ((y[row + j] - b) / w)
    acc_g[tid] = s_g
    acc_gx[tid] = s_gx
    cuda.syncthreads()
    step = threads // 2
    while step > 0:
        if tid < step:
            acc_g[tid] += acc_g[tid + step]
            acc_gx[tid] += acc_gx[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        cuda.atomic.add(sums, (0, c), acc_g[0])
        cuda.atomic.add(sums, (1, c), acc_gx[0])


@cuda.jit
def _bn_dx(grad, y, weight, bias, invstd, sums, out, rows, channels, inner, count, has_weight, has_bias):
    """One (batch, channel) row of ``inner`` contiguous elements per block turn: the
    channel's constants once per row, no index division per element."""
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    for row in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        c = row % channels
        w = weight[c] if has_weight else 1.0
        b = bias[c] if has_bias else 0.0
        scale = invstd[c] * w
        mean_g = sums[0, c] / count
        mean_gx = sums[1, c] / count
        base = row * inner
        for j in range(tid, inner, threads):
            i = base + j
            out[i] = scale * (grad[i] - mean_g - ((y[i] - b) / w) * mean_gx)


# ------------------------------------------------------------------- compact max-pool indices
@cuda.jit
def _window_from_indices(indices, out, n, out_h, out_w, width, sh, sw, ph, pw, dh, dw, kw):
    """int64 flat indices into the input plane -> int8 position inside the window."""
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, n, stride):
        ow = i % out_w
        oh = (i // out_w) % out_h
        idx = indices[i]
        local_h = (idx // width - (oh * sh - ph)) // dh
        local_w = (idx % width - (ow * sw - pw)) // dw
        out[i] = local_h * kw + local_w


@cuda.jit
def _indices_from_window(window, out, n, out_h, out_w, width, sh, sw, ph, pw, dh, dw, kw):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, n, stride):
        ow = i % out_w
        oh = (i // out_w) % out_h
        local = window[i]
        h = oh * sh - ph + (local // kw) * dh
        w = ow * sw - pw + (local % kw) * dw
        out[i] = h * width + w


#: every kernel, for the PTX compilation check
KERNELS = {
    "pack_words": _pack_words,
    "unpack_words": _unpack_words,
    "region_bits": _region_bits,
    "unpack_bits": _unpack_bits,
    "masked_grad": _masked_grad,
    "masked_grad_inplace": _masked_grad_inplace,
    "apply_bits": _apply_bits,
    "bn_channel_sums": _bn_channel_sums,
    "bn_dx": _bn_dx,
    "window_from_indices": _window_from_indices,
    "indices_from_window": _indices_from_window,
}


# ------------------------------------------------------------------------------- launchers
def _launch(kernel, n: int, stream, *args, threads: int = THREADS):
    blocks, tpb = grid_for(n, threads)
    if stream is None:
        kernel[blocks, tpb](*args)
    else:
        kernel[blocks, tpb, stream](*args)


def launch_pack_bits(flags, out, n: int, stream=None) -> None:
    """``flags``: n bytes (0 or not); ``out``: ceil(n/8) bytes."""
    launch_region_bits(flags, out, n, 0.0, math.inf, stream)


def launch_pack_words(words, out, stream=None) -> None:
    """``words``: a 0/1 byte mask of 8 * len(out) bytes viewed as int64; ``out``: its bits."""
    _launch(_pack_words, out.shape[0], stream, words, out)


def launch_region_bits(x, out, n: int, low: float, high: float, stream=None) -> None:
    """``x``: n elements; ``out``: ceil(n/8) bytes."""
    _launch(_region_bits, (n + 7) // 8, stream, x, out, n, np.float32(low), np.float32(high))


def launch_unpack_bits(bits, out, n: int, stream=None) -> None:
    _launch(_unpack_bits, n, stream, bits, out, n)


def launch_unpack_words(bits, words, stream=None) -> None:
    """``words``: the 0/1 byte mask of 8 * len(bits) bytes, viewed as int64."""
    _launch(_unpack_words, words.shape[0], stream, bits, words)


def launch_masked_grad(grad, bits, out, n: int, slope: float, stream=None) -> None:
    _launch(_masked_grad, n, stream, grad, bits, out, n, np.float32(slope))


def launch_masked_grad_inplace(grad, bits, n: int, slope: float, stream=None) -> None:
    _launch(_masked_grad_inplace, n, stream, grad, bits, n, np.float32(slope))


def launch_apply_bits(x, bits, out, n: int, scale: float, stream=None) -> None:
    _launch(_apply_bits, n, stream, x, bits, out, n, np.float32(scale))


def launch_bn_backward_from_output(grad, y, weight, bias, invstd, sums, out, shape, stream=None) -> None:
    """``grad``, ``y``, ``out``: flat (N*C*S); ``sums``: a (2, C) float64 scratch array of zeros.
    ``weight``/``bias`` may be ``None`` (a one-element dummy is passed instead)."""
    n_outer, channels = int(shape[0]), int(shape[1])
    inner = 1
    for d in shape[2:]:
        inner *= int(d)
    has_w, has_b = weight is not None, bias is not None
    w = weight if has_w else invstd
    b = bias if has_b else invstd
    rows = n_outer * channels
    if _simulating():
        parts, tpb, row_blocks = min(n_outer, 2), 8, 1
    else:  # about 2048 blocks for the sums; blocks of threads sized to the rows' length, a
        # power of two (the sums' tree reduction halves the block)
        parts, tpb, row_blocks = max(1, min(n_outer, 2048 // channels)), min(THREADS, max(32, 1 << (inner - 1).bit_length())), min(rows, 1 << 20)
    for kernel, blocks, args in ((_bn_channel_sums, channels * parts, (grad, y, w, b, sums, n_outer, channels, inner, has_w, has_b)),
                                 (_bn_dx, row_blocks, (grad, y, w, b, invstd, sums, out, rows, channels, inner, float(n_outer * inner), has_w, has_b))):
        if stream is None:
            kernel[blocks, tpb](*args)
        else:
            kernel[blocks, tpb, stream](*args)


def _pool_args(attrs) -> tuple:
    out_h, out_w = attrs["out_shape"][-2:]
    width = attrs["shape"][-1]
    (sh, sw), (ph, pw), (dh, dw) = attrs["stride"], attrs["padding"], attrs["dilation"]
    return out_h, out_w, width, sh, sw, ph, pw, dh, dw, attrs["kernel"][1]


def launch_window_from_indices(indices, out, n: int, attrs: dict, stream=None) -> None:
    _launch(_window_from_indices, n, stream, indices, out, n, *_pool_args(attrs))


def launch_indices_from_window(window, out, n: int, attrs: dict, stream=None) -> None:
    _launch(_indices_from_window, n, stream, window, out, n, *_pool_args(attrs))
