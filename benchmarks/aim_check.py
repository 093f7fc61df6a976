"""The activation-peak and step-time targets, measured with few strategies per process.

``runtime_bench.py`` interleaves seventeen strategies in one process; its time ratios for
the runtime's rows come out 5-15 points above the same schedules timed against eager
alone (its store-all row, which runs eager's own kernels, has measured x1.04-x1.08 there
and x0.97-x0.98 here). This script measures only what the aims are about, interleaved,
with more rounds: eager PyTorch, the runtime's store-all with PyTorch's implementations
(the runtime's own cost) and with the fastest implementations (the baseline the planned
overheads are relative to), and the hybrid engine on costs timed on this machine: the
fastest schedule within each ``--peaks`` fraction of eager's activation peak and the
lowest peak within each ``--overheads`` planned overhead.

Peaks are live tensor bytes above the memory at the start of a step, as % of eager's;
times are medians of ``--rounds`` interleaved steps over eager's median ("time vs eager")
and the median of the per-round ratios. ``--grad none`` sets every ``.grad`` to None
before each step (``zero_grad``'s default); ``--grad keep`` accumulates into
pre-allocated gradients (as ``runtime_bench.py``'s memory columns assume).

``--malloc retain`` calls :func:`monetdsl.runtime.host_malloc.retain_freed_memory` before the
model is built: glibc then keeps freed memory in the process for every strategy,
eager included, so no step faults pages in and eager's step time stops depending on the
process's allocation history (56-77 ms between processes with glibc's defaults).

    python benchmarks/aim_check.py [--model gpt|resnet] [--rounds 15] [--grad none|keep]
        [--peaks 0.35,0.30] [--overheads 0.10] [--malloc default|retain] [--out benchmarks/results/aim_check_gpt.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_bench import make, measure_peak, step  # noqa: E402
from step_costs import solve_schedule, store_all_pytorch  # noqa: E402

import monetdsl  # noqa: E402
from monetdsl.runtime.host_malloc import retain_freed_memory  # noqa: E402
from monetdsl.runtime.memory import LiveTensorProbe  # noqa: E402
from monetdsl.runtime.plan import trace_for_runtime  # noqa: E402
from monetdsl.search import solve  # noqa: E402


def strategies(model, inputs, peaks: list[float], overheads: list[float], seconds: float):
    """(name, module) pairs: eager, the runtime's store-all, then one row per aim (a note
    instead of a module when no schedule reaches it)."""
    timed = trace_for_runtime(model, list(inputs), optimizer="sgd", profile=True)

    def runtime(schedule):
        module = monetdsl.optimize(model, schedule=schedule)
        module.plan_for(*inputs, trace=timed)
        return module

    yield "eager", model
    yield "monetdsl store-all, PyTorch's implementations", runtime(store_all_pytorch(timed))
    fastest = solve(timed.spec, "store-all")  # the planner's baseline: every op's fastest implementation, nothing recomputed
    yield "monetdsl store-all, the fastest implementations (the planned-overhead baseline)", runtime(fastest.schedule)
    aims = [(f"fastest within {p:.0%} of eager's peak", None, p) for p in peaks]
    aims += [(f"lowest peak within planned +{o:.0%}", o, None) for o in overheads]
    for label, overhead, peak in aims:
        result = solve_schedule(timed, model, inputs, overhead, peak, seconds)
        if not result.success:
            yield f"hybrid on timed costs, {label}: no schedule ({result.message})", None
            continue
        yield f"hybrid on timed costs, {label} (planned +{result.simulation.overhead:.1%})", runtime(result.schedule)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt", "resnet"], default="gpt")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--grad", choices=["none", "keep"], default="none")
    parser.add_argument("--peaks", default="0.35,0.30", help="fractions of eager's activation peak")
    parser.add_argument("--overheads", default="0.10", help="planned overhead caps")
    parser.add_argument("--solver-seconds", type=float, default=60.0)
    parser.add_argument("--malloc", choices=["default", "retain"], default="default",
                        help="retain: glibc keeps freed memory in the process (every strategy, eager included)")
    parser.add_argument("--out", default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    malloc_note = "glibc malloc defaults"
    if args.malloc == "retain":
        malloc_note = retain_freed_memory().message
    fractions = lambda text: [float(v) for v in text.split(",") if v]  # noqa: E731
    model, inputs = make(args.model)
    eager_peak = measure_peak(model, inputs, LiveTensorProbe)
    rows, notes = {}, []
    for name, module in strategies(model, inputs, fractions(args.peaks), fractions(args.overheads), args.solver_seconds):
        if module is None:
            notes.append(name)
        else:
            rows[name] = module
    peaks = {name: measure_peak(module, inputs, LiveTensorProbe) / eager_peak for name, module in rows.items()}
    if args.grad == "keep":
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    load = os.getloadavg()[0]
    times = {name: [] for name in rows}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, module in rows.items():
            if args.grad == "none":
                for p in model.parameters():
                    p.grad = None
            start = time.perf_counter()
            step(module, inputs)
            times[name].append(time.perf_counter() - start)
    eager = times["eager"][1:]
    lines = [f"{datetime.date.today()}, {args.model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, load average"
             f" {load:.1f} before timing, {os.getloadavg()[0]:.1f} after; {args.rounds} interleaved rounds; .grad {args.grad}; malloc: {malloc_note}",
             "", "| strategy | peak vs eager (live) | step s | time vs eager | median per-round ratio |", "|---|---:|---:|---:|---:|"]
    for name in rows:
        mine = times[name][1:]
        per_round = statistics.median(a / b for a, b in zip(mine, eager))
        lines.append(f"| {name} | {peaks[name]:.1%} | {statistics.median(mine):.3f} | x{statistics.median(mine) / statistics.median(eager):.2f}"
                     f" | x{per_round:.2f} |")
    lines += [""] + [f"* {n}" for n in notes] if notes else []
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        previous = out.read_text() + "\n\n" if out.exists() else ""
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(previous + text + "\n")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
