"""Batch-sliced segments through ``monetdsl.optimize``: memory and time against eager.

A VGG-style CNN (``monetdsl.models.tiny_vgg``: three conv-relu-...-pool blocks: 16 channels at 32x32 with two
convolutions, then 48 and 96 channels with eight each; the first block holds the widest
tensors, the later ones most of the compute, as in VGG-16) is trained for one step by
eager PyTorch and by ``monetdsl.optimize`` at store-all and under budgets below what any
schedule of its ops one by one can hold (:func:`monetdsl.slicing.op_by_op_bound`), with and without
segments. Per row: the planned peak above fixed memory and the planned step time over
the store-all plan's (on the measured costs; a segment's forced recomputation is part of
its backward's time, so the search's own overhead figure, against the sliced network's
store-all, leaves it out), the allocator's peak
(``monetdsl.measure(probe="allocator")``) and their ratio, the segment's slice counts,
and the step's time against eager's (eager's own row: its allocator peak): eager and the
plan interleaved in one process,
``--rounds`` rounds, medians of process CPU time and of wall time.

    python benchmarks/segments_runtime.py [--batch 16] [--rounds 9] [--time-limit 20] [--output benchmarks/results/segments_runtime.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monetdsl  # noqa: E402
from monetdsl.errors import SolveError  # noqa: E402
from monetdsl.search.simulator import chosen_impls  # noqa: E402
from monetdsl.models import tiny_vgg  # noqa: E402
from monetdsl.slicing import is_segment, op_by_op_bound, slice_count  # noqa: E402
from monetdsl.units import human_bytes  # noqa: E402


def segments_of(plan) -> str:
    network = plan.spec.network
    impls = chosen_impls(network, plan.schedule)
    found = [f"{op.name}: K={slice_count(impls[op.name])}/{slice_count(impls[op.name + '.backward'])}"
             for op in network.forward_ops if is_segment(op)]
    return ", ".join(found) or "none"


def step(module, x) -> None:
    module(x).square().mean().backward()


def interleaved(model, optimized, x, rounds: int) -> tuple[float, float]:
    """Median process-CPU and wall ratios of the plan's step over eager's, interleaved."""
    cpu, wall = [], []
    for _ in range(rounds + 1):
        times = []
        for module in (model, optimized):
            model.zero_grad(set_to_none=True)
            c, w = time.process_time(), time.perf_counter()
            step(module, x)
            times.append((time.process_time() - c, time.perf_counter() - w))
        cpu.append(times[1][0] / times[0][0])
        wall.append(times[1][1] / times[0][1])
    return statistics.median(cpu[1:]), statistics.median(wall[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--time-limit", type=float, default=20.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    x = torch.randn(args.batch, 3, 32, 32)
    model = tiny_vgg()
    store_all = monetdsl.optimize(model, x, method="store-all")
    plan = store_all.plans[0]
    fixed = plan.simulation.fixed_bytes
    floor = op_by_op_bound(plan.spec.network)
    baseline_us = plan.simulation.compute_us
    rows = [("eager PyTorch", model), ("store-all", store_all)]
    for share in (1.5, 0.97, 0.85):
        budget = fixed + int(share * floor)
        for segments in (True, False):
            name = f"budget {share:.2f} x op-by-op bound, segments={segments}"
            try:
                rows.append((name, monetdsl.optimize(model, x, budget=budget, time_limit=args.time_limit, segments=segments)))
            except SolveError as exc:
                rows.append((name, f"no schedule fits (best found {human_bytes(exc.min_feasible_budget - fixed)} above fixed)"))
    lines = ["| plan | segments (fwd/bwd K) | planned above fixed | allocator above fixed | allocator / planned |"
             " planned time vs store-all | CPU time vs eager | wall vs eager |", "|---|---|---|---|---|---|---|---|"]
    for name, optimized in rows:
        if isinstance(optimized, str):
            lines.append(f"| {name} | | {optimized} | | | | | |")
            continue
        measured = monetdsl.measure(optimized, x, probe="allocator", repeats=2)
        if optimized is model:
            lines.append(f"| {name} | | | {human_bytes(measured.peak)} | | | x1 | x1 |")
            continue
        cpu, wall = interleaved(model, optimized, x, args.rounds)
        lines.append(f"| {name} | {segments_of(optimized.plans[0])} | {human_bytes(measured.planned)} |"
                     f" {human_bytes(measured.peak)} | {measured.ratio:.3f} | x{optimized.plans[0].simulation.compute_us / baseline_us:.2f} |"
                     f" x{cpu:.2f} | x{wall:.2f} |")
    header = [f"# Batch-sliced segments through monetdsl.optimize ({datetime.date.today()})", "",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__};"
              f" load average at the end {os.getloadavg()[0]:.1f} (shared machine: times are medians of interleaved"
              " rounds).",
              f"Model: VGG-style CNN (`monetdsl.models.tiny_vgg`), batch {args.batch}, 3x32x32, one step without"
              f" an optimizer step (loss: mean square of the output), optimizer state counted as Adam; fixed memory {human_bytes(fixed)};"
              f" op-by-op lower bound above fixed {human_bytes(floor)}.",
              f"Command: `python benchmarks/segments_runtime.py --batch {args.batch} --rounds {args.rounds}"
              f" --time-limit {args.time_limit:g}`", ""]
    text = "\n".join(header + lines) + "\n"
    print(text)
    if args.output:
        tmp = args.output.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.output)


if __name__ == "__main__":
    main()
