"""The numba.cuda kernels of the compact forms on a GPU: throughput against its memory bandwidth.

Every kernel only moves memory, so the figure of merit is bytes moved per second: the
bytes each one must read and write at least (the mask bits included; a write counted in
full even where a masked kernel skips elements, since DRAM writes whole 32-byte sectors
and a random mask touches nearly all of them), divided by the kernel's time. Two
references: the card's datasheet bandwidth (from its name) and a device-to-device copy
timed here (``Tensor.copy_``, read + write), which is what a memory-bound kernel can
reach in practice. Beside each kernel, the torch operation it replaces, on the same data.

Two timings per kernel: ``kernel`` launches it back to back ``--launches`` times between
two CUDA events (the GPU never waits for Python), ``op`` calls the ``torch.ops.monetdsl``
operator once per timing, as the runtime does (numba's launch and torch's dispatch
included). Medians of ``--repeats``.

    python benchmarks/kernels_bench.py [--elements 268435456] [--out results.md]
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monetdsl.lowering import kernels  # noqa: E402
from monetdsl.lowering import ops  # noqa: E402

mops = torch.ops.monetdsl

#: datasheet memory bandwidth, bytes/s, by a fragment of torch.cuda.get_device_name()
DATASHEET = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
             ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("V100", 0.9e12)]


def datasheet_bandwidth(name: str) -> float | None:
    for fragment, bandwidth in DATASHEET:
        if fragment in name:
            return bandwidth
    return None


def gpu_seconds(run, repeats: int, launches: int = 1) -> float:
    """Median seconds of one ``run()``: ``launches`` calls between two events, ``repeats`` times."""
    for _ in range(3):
        run()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(launches):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / launches)
    return statistics.median(samples)


def copy_bandwidth(n: int, repeats: int, launches: int) -> float:
    """Bytes/s of a device-to-device copy of ``n`` float32 (read + write)."""
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    return 8 * n / gpu_seconds(lambda: dst.copy_(src), repeats, launches)


def cases(n: int):
    """(name, bytes moved, kernel-only callable, op callable, torch equivalent or None)."""
    torch.manual_seed(0)
    from numba import cuda

    x = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda")
    mask = x > 0
    bits = mops.pack_bits(mask)
    nb = bits.numel()
    out_bits = torch.empty_like(bits)
    out_f = torch.empty_like(x)
    out_u8 = torch.empty(n, dtype=torch.uint8, device="cuda")
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    arr = cuda.as_cuda_array
    xa, ga, ba = arr(x), arr(g), arr(bits)
    oba, ofa = arr(out_bits), arr(out_f)
    scale = 1 / 0.7
    y = torch.relu(x)
    words = arr(mask.view(torch.uint8).view(torch.int64))
    yield ("pack_bits (bool mask -> bits)", n + nb, lambda: kernels.launch_pack_words(words, oba, stream),
           lambda: mops.pack_bits(mask), None)
    yield ("region_bits (ReLU mask of float32 x)", 4 * n + nb, lambda: kernels.launch_region_bits(xa, oba, n, 0.0, float("inf"), stream),
           lambda: mops.region_bits(x, 0.0, float("inf")), ("x > 0 (bool mask)", 4 * n + n, lambda: torch.gt(x, 0)))
    out_words = arr(out_u8.view(torch.int64))
    yield ("unpack_bits", nb + n, lambda: kernels.launch_unpack_words(ba, out_words, stream),
           lambda: mops.unpack_bits(bits, [n]), None)
    yield ("masked_grad (ReLU backward from bits)", 4 * n + nb + 4 * n, lambda: kernels.launch_masked_grad(ga, ba, ofa, n, 0.0, stream),
           lambda: mops.masked_grad(g, bits, 0.0), ("threshold_backward (from the output)", 12 * n, lambda: torch.ops.aten.threshold_backward(g, y, 0)))
    inplace = g.clone()
    ia = arr(inplace)
    yield ("masked_grad_ (in place)", 4 * n + nb + 4 * n, lambda: kernels.launch_masked_grad_inplace(ia, ba, n, 0.0, stream),
           lambda: mops.masked_grad_(inplace, bits, 0.0), None)
    yield ("apply_bits (dropout from bits)", 4 * n + nb + 4 * n, lambda: kernels.launch_apply_bits(xa, ba, ofa, n, scale, stream),
           lambda: mops.apply_bits(x, bits, scale), ("native_dropout_backward (bool mask)", 9 * n, lambda: torch.ops.aten.native_dropout_backward(x, mask, scale)))
    shape = (64, 256, n // (64 * 256 * 64), 64) if n >= 64 * 256 * 64 else (1, 1, 1, n)
    m = shape[0] * shape[1] * shape[2] * shape[3]
    yb = torch.randn(shape, device="cuda")
    gb = torch.randn(shape, device="cuda")
    invstd = torch.rand(shape[1], device="cuda") + 0.5
    w = torch.rand(shape[1], device="cuda") + 0.5
    b = torch.randn(shape[1], device="cuda")
    # the reference: eager batch norm's backward from its input and saved statistics (cuDNN)
    xin = torch.randn(shape, device="cuda")
    mean = torch.zeros(shape[1], device="cuda")
    yield ("bn_backward_from_output (2 kernels, N x 256 x H x 64)", 16 * m + 4 * m, None,
           lambda: mops.bn_backward_from_output(gb, yb, invstd, w, b),
           ("native_batch_norm_backward (from the input)", 12 * m, lambda: torch.ops.aten.native_batch_norm_backward(
               gb, xin, w, None, None, mean, invstd, True, 1e-5, [True, True, True])))


def pool_cases():
    """The max-pool index conversions on a 64 x 128 x 112 x 112 input (3 x 3, stride 2)."""
    from numba import cuda

    arr = cuda.as_cuda_array
    stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    pooled = torch.randn(64, 128, 112, 112, device="cuda")
    _, indices = torch.ops.aten.max_pool2d_with_indices(pooled, [3, 3], [2, 2], [1, 1], [1, 1])
    del pooled
    args = ([3, 3], [2, 2], [1, 1], [1, 1], [64, 128, 112, 112])
    attrs = ops._pool_attrs(*args[:4], args[4], indices.shape)
    k = indices.numel()
    window = mops.window_from_indices(indices, *args)
    back = torch.empty_like(indices)
    ia, wa, bka = arr(indices.view(-1)), arr(window.view(-1)), arr(back.view(-1))
    yield (f"window_from_indices (int64 -> int8, {k / 1e6:.0f}M)", 9 * k, lambda: kernels.launch_window_from_indices(ia, wa, k, attrs, stream),
           lambda: mops.window_from_indices(indices, *args), None)
    yield (f"indices_from_window (int8 -> int64, {k / 1e6:.0f}M)", 9 * k, lambda: kernels.launch_indices_from_window(wa, bka, k, attrs, stream),
           lambda: mops.indices_from_window(window, *args), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 28, help="elements per tensor (default 2^28: 1 GiB of float32)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_bench: no CUDA device here (the kernels are tested on numba's simulator instead)")
        return 1
    name = torch.cuda.get_device_name()
    n = args.elements
    copy = copy_bandwidth(n, args.repeats, args.launches)
    sheet = datasheet_bandwidth(name)
    from importlib.metadata import version

    lines = [f"GPU: {name}; torch {torch.__version__}, numba-cuda {version('numba-cuda')}; {n:,} elements per tensor;"
             f" medians of {args.repeats}; ops with numba kernels: {', '.join(ops.CUDA_OPS)}",
             f"device-to-device copy (read + write): {copy / 1e9:,.0f} GB/s"
             + (f" = {copy / sheet:.0%} of the datasheet's {sheet / 1e9:,.0f} GB/s" if sheet else ""), "",
             "| kernel | bytes moved | kernel GB/s | of copy | of datasheet | op (one call) GB/s | torch equivalent | its GB/s | kernel vs torch time |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for label, moved, kernel, op, torch_eq in itertools.chain(cases(n), pool_cases()):
        t_op = gpu_seconds(op, args.repeats)
        t_kernel = gpu_seconds(kernel, args.repeats, args.launches) if kernel else None
        rate = moved / (t_kernel or t_op)
        eq_cells = ["", "", ""]
        if torch_eq:
            eq_label, eq_moved, eq_run = torch_eq
            t_eq = gpu_seconds(eq_run, args.repeats, args.launches)
            eq_cells = [eq_label, f"{eq_moved / t_eq / 1e9:,.0f}", f"x{(t_kernel or t_op) / t_eq:.2f}"]
        lines.append(f"| {label} | {moved / 2**20:,.0f} MiB | {rate / 1e9:,.0f} | {rate / copy:.0%} | "
                     + (f"{rate / sheet:.0%}" if sheet else "") + f" | {moved / t_op / 1e9:,.0f} | " + " | ".join(eq_cells) + " |")
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
