"""Peaks in the two ways a training loop holds gradients, on the runtime benchmark's models.

``runtime_bench.py`` and the memory model count parameter gradients as fixed memory:
allocated before the step (gradient accumulation, ``zero_grad(set_to_none=False)``), so a
peak is activation memory (plus temporaries). With ``zero_grad()``'s default the
gradients are ``None`` when the step starts and are allocated during the backward; this
script measures both: live tensor bytes above the memory at the start of the step, for
eager PyTorch, the runtime's store-all (PyTorch's and the fastest implementations) and the
hybrid's fastest schedules within ``--peaks`` of eager's peak (pre-allocated regime).

    python benchmarks/grad_regimes.py [--model resnet|gpt] [--peaks 0.40,0.30]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_bench import make, step  # noqa: E402
from step_costs import solve_schedule, store_all_pytorch  # noqa: E402

import monetdsl  # noqa: E402
from monetdsl.runtime.memory import LiveTensorProbe  # noqa: E402
from monetdsl.runtime.plan import trace_for_runtime  # noqa: E402
from monetdsl.search import solve  # noqa: E402

MIB = 2**20


def peak(module, model, inputs, pre_allocated: bool) -> int:
    """Live bytes above the start of one step (after a warm-up step), gradients None or zeros."""
    def reset():
        for p in model.parameters():
            p.grad = torch.zeros_like(p) if pre_allocated else None

    reset()
    step(module, inputs)
    reset()
    probe = LiveTensorProbe().start()
    step(module, inputs)
    return probe.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt", "resnet"], default="resnet")
    parser.add_argument("--peaks", default="0.40,0.30")
    parser.add_argument("--solver-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    model, inputs = make(args.model)
    trace = trace_for_runtime(model, list(inputs), optimizer="sgd")

    def runtime(schedule):
        module = monetdsl.optimize(model, schedule=schedule)
        module.plan_for(*inputs, trace=trace)
        return module

    rows = {"eager": model, "monetdsl store-all, PyTorch's implementations": runtime(store_all_pytorch(trace)),
            "monetdsl store-all, the fastest implementations": runtime(solve(trace.spec, "store-all").schedule)}
    for fraction in (float(v) for v in args.peaks.split(",") if v):
        result = solve_schedule(trace, model, inputs, None, fraction, args.solver_seconds)
        if result.success:
            rows[f"hybrid, fastest within {fraction:.0%} of eager's peak (pre-allocated)"] = runtime(result.schedule)
    gradients = sum(p.numel() * p.element_size() for p in model.parameters())
    eager = {regime: peak(model, model, inputs, regime) for regime in (True, False)}
    print(f"{args.model}: parameter gradients {gradients / MIB:.2f} MiB; peaks above the start of a step (live tensors)\n")
    print("| strategy | gradients pre-allocated | vs eager | `.grad` None at the start | vs eager |")
    print("|---|---:|---:|---:|---:|")
    for name, module in rows.items():
        kept, none = peak(module, model, inputs, True), peak(module, model, inputs, False)
        print(f"| {name} | {kept / MIB:.2f} MiB | {kept / eager[True]:.1%} | {none / MIB:.2f} MiB | {none / eager[False]:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
