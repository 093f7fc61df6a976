"""Planned vs measured time of every step of a schedule, grouped by op kind and implementation.

The runtime benchmark compares whole steps; this one says where a gap between planned and
measured time comes from. It traces a benchmark model (``--profile``: costs timed on this
machine, else the CPU roofline), solves it with the hybrid engine (lowest peak within
``--overhead``, or the fastest schedule within ``--peak`` of eager's activation peak),
trains ``--rounds`` steps with an executor observer that times every step, and prints per
(phase, kind, implementation) the steps per training step, the measured and the planned
milliseconds and their ratio; then the step's wall time against the sum of its steps.
(This table is how the profiler's reference-formula timings were caught: layer norm
planned at 15x its kernel's time.)

Eager PyTorch's step is timed interleaved with the schedule's (``schedule / eager`` is the
measured time ratio), and ``--store-all`` runs PyTorch's implementations keeping
everything instead of a solved schedule: the base the planned overhead is measured from.

    python benchmarks/step_costs.py [--model gpt|resnet] [--profile] [--overhead 0.10 | --peak 0.35 | --store-all] [--rounds 5]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime_bench import make, measure_peak, step  # noqa: E402

from monetdsl.graph import index  # noqa: E402

from monetdsl.runtime.api import _constraints  # noqa: E402
from monetdsl.runtime.calibrate import StepClock as StepTimer  # noqa: E402
from monetdsl.runtime.memory import LiveTensorProbe  # noqa: E402
from monetdsl.runtime.module import OptimizedModule  # noqa: E402
from monetdsl.runtime.plan import trace_for_runtime  # noqa: E402
from monetdsl.search import solve  # noqa: E402
from monetdsl.search.schedule_builder import build_schedule  # noqa: E402
from monetdsl.search.simulator import chosen_impls, simulate  # noqa: E402


def solve_schedule(trace, model, inputs, overhead: float | None, peak: float | None, seconds: float):
    if peak is None:
        return solve(trace.spec, "hybrid", max_overhead=overhead, objective="memory", time_limit=seconds, exact_min_budget=False)
    fixed = solve(trace.spec, "store-all").simulation.fixed_bytes
    budget = fixed + int(peak * measure_peak(model, inputs, LiveTensorProbe))
    return solve(trace.spec, "hybrid", memory_budget=budget, time_limit=seconds, exact_min_budget=False)


def store_all_pytorch(trace):
    """PyTorch's implementation of every op, everything the backward reads kept: what eager
    does, run by the runtime."""
    spec, network = trace.spec, trace.spec.network
    first = {op.name: op.impls[0].name for op in (*network.forward_ops, *network.backward_ops)}
    idx = index(network)
    keep = {r for bop in network.backward_ops for r in bop.impls[0].reads if idx.is_forward_tensor(r)}
    return build_schedule(network, first, forward_keep=keep, spec_path="", fingerprint=spec.fingerprint)


def table(trace, schedule, timer: StepTimer, rounds: int) -> list[str]:
    network = trace.spec.network
    impls = chosen_impls(network, schedule)
    kind_of = {name: (record.kind.name if record.kind is not None else "other") for name, record in trace.ops.items()}
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for (phase, name), samples in timer.samples.items():
        op = network.op(name)
        impl = op.impl(impls.get(name, op.impls[0].name))
        planned = impl.time_us if phase != "recompute" else impl.effective_recompute_time_us
        kind = kind_of.get(name, kind_of.get(getattr(op, "of", None), "other"))
        row = rows[(phase, kind, impl.name)]
        row[0] += len(samples) // rounds
        row[1] += sum(samples) / rounds
        row[2] += planned * len(samples) / rounds
    lines = ["| phase | kind | implementation | steps | measured ms | planned ms | measured / planned |",
             "|---|---|---|---:|---:|---:|---:|"]
    for (phase, kind, impl), (count, measured, planned) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        ratio = f"{measured / planned:.2f}" if planned > 0 else ""
        lines.append(f"| {phase} | {kind} | {impl} | {count} | {measured / 1e3:.2f} | {planned / 1e3:.2f} | {ratio} |")
    measured = sum(r[1] for r in rows.values())
    planned = sum(r[2] for r in rows.values())
    lines.append(f"| all | | | {sum(r[0] for r in rows.values())} | {measured / 1e3:.2f} | {planned / 1e3:.2f} | {measured / planned:.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt", "resnet"], default="gpt")
    parser.add_argument("--profile", action="store_true", help="costs timed on this machine (else the CPU roofline)")
    parser.add_argument("--overhead", type=float, default=0.10, help="lowest peak within this planned overhead")
    parser.add_argument("--peak", type=float, default=None, help="instead: fastest within this fraction of eager's peak")
    parser.add_argument("--store-all", action="store_true", help="instead: PyTorch's implementations, everything kept")
    parser.add_argument("--fastest", action="store_true", help="instead: the planner's baseline (the fastest implementations, everything kept)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--solver-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    model, inputs = make(args.model)
    trace = trace_for_runtime(model, list(inputs), optimizer="sgd", profile=args.profile)
    if args.store_all:
        schedule = store_all_pytorch(trace)
        sim, how = simulate(trace.spec.network, schedule), "store-all with PyTorch's implementations"
    elif args.fastest:
        result = solve(trace.spec, "store-all")
        schedule, sim, how = result.schedule, result.simulation, "store-all with the fastest implementations"
    else:
        result = solve_schedule(trace, model, inputs, args.overhead, args.peak, args.solver_seconds)
        if not result.success:
            print(f"no schedule: {result.message}")
            return 1
        schedule, sim, how = result.schedule, result.simulation, f"{result.method} {result.status}"
    timer = StepTimer()
    module = OptimizedModule(model, _constraints(None, None, schedule, "auto"), optimizer="sgd", observe=timer)
    module.plan_for(*inputs, trace=trace)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(2):
        step(module, inputs)  # warm-up
    timer.samples.clear()
    step(model, inputs)  # eager's warm-up
    walls, eager_walls = [], []
    for _ in range(args.rounds):  # interleaved with eager's steps, which the observer does not see
        for module_or_model, times in ((module, walls), (model, eager_walls)):
            start = time.perf_counter()
            step(module_or_model, inputs)
            times.append(time.perf_counter() - start)
    print(f"{args.model}, costs: {trace.cost_model}; schedule: {how}, planned overhead"
          f" {sim.overhead:+.1%}, peak {(sim.peak_bytes - sim.fixed_bytes) / 2**20:.2f} MiB above fixed\n")
    print("\n".join(table(trace, schedule, timer, args.rounds)))
    inside = sum(sum(s) for s in timer.samples.values()) / args.rounds / 1e6
    wall, eager = statistics.median(walls), statistics.median(eager_walls)
    print(f"\nstep wall time (median of {args.rounds}): {wall * 1e3:.1f} ms; inside the steps: {inside * 1e3:.1f} ms;"
          f" eager's step {eager * 1e3:.1f} ms; schedule / eager x{wall / eager:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
