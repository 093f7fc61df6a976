"""Measure the peak rates behind the ``cpu`` roofline preset (run once, copy into costs.py).

    python benchmarks/cpu_preset.py

Prints the median over 15 runs (after 2 warm-ups) of: a 1024x1024 matmul in f32, bf16
and f64 (GFLOP/s), a 64 MiB copy (GB/s, read + write) and a one-element add (launch
overhead, microseconds). The machine is shared: run it when it is quiet.
"""
import statistics
import time

import torch


def median_seconds(fn, repeats=15):
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    n = 1024
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = median_seconds(lambda: a @ b)
        print(f"matmul {str(dtype).replace('torch.', ''):>8}: {2 * n**3 / t / 1e9:8.1f} GFLOP/s")
    x = torch.randn(64 * 1024 * 1024 // 4)
    y = torch.empty_like(x)
    t = median_seconds(lambda: y.copy_(x))
    print(f"copy 64 MiB     : {2 * x.numel() * 4 / t / 1e9:8.1f} GB/s")
    s = torch.empty(1)
    t = median_seconds(lambda: torch.add(s, 1), 200)
    print(f"1-element add   : {t * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
