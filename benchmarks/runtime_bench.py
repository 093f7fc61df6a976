"""Training with schedules on this CPU: measured peak vs planned, and against PyTorch.

Models (``monetdsl.models.bench``, the loss inside so a step's whole memory is planned):
a GPT-2-like decoder (6 layers, width 384, 6 heads, vocabulary 8192; batch 4 x 256 tokens)
and a ResNet-18-like CNN (batch 8 x 3 x 64 x 64, 100 classes).

Strategies: eager PyTorch; ``torch.utils.checkpoint`` on every block; ``checkpoint_sequential``
with 3 segments; monetdsl schedules run by the runtime: store-all with PyTorch's own
implementations (the runtime's own overhead), Chen's sqrt(n) checkpoints, one segment
per block (the block outputs kept, each block recomputed once, the leanest
implementations; on the GPT also with the attention outputs kept), and the smallest peak the baseline methods reach; and schedules from the
search engine on the same spec: the hybrid engine and the joint MILP (implementation
choice) for the lowest peak within a 10 % planned overhead, ``hybrid``, ``milp`` and ``checkmate`` for the fastest
schedule within the per-block peak, each with ``--solver-seconds`` (default 60; the best
incumbent when the limit is reached); with ``--profile``, also the hybrid engine on costs
timed on this machine, lowest peak within a planned 10 % and 15 %, and the fastest within
an activation-peak target (35 % of eager's for the GPT, 40 % for the ResNet).

"planned overhead" is the simulator's compute over the no-recompute baseline on the spec's
costs (the CPU roofline preset; with ``--profile``, also on costs timed on this machine),
to compare with the measured step-time ratio.

Memory: peak bytes above the memory at the start of a step (parameters, their
pre-allocated gradients and the batch), measured with the live-tensor probe (what the
memory model models) and with the counting CPU allocator (every byte, oneDNN's scratch
included). Time: all strategies interleaved in one process, ``--rounds`` rounds, medians,
ratios to eager. Prints markdown tables.

    python benchmarks/runtime_bench.py --rounds 7 [--model gpt|resnet|both] [--solver-seconds 60] [--profile]
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
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import monetdsl  # noqa: E402
from monetdsl.graph import index  # noqa: E402
from monetdsl.models.bench import GPTLike, ResNet18Like  # noqa: E402
from monetdsl.runtime.memory import AllocatorProbe, CudaProbe, LiveTensorProbe  # noqa: E402
from monetdsl.runtime.plan import trace_for_runtime  # noqa: E402
from monetdsl.search import solve  # noqa: E402
from monetdsl.search.schedule_builder import build_schedule  # noqa: E402
from monetdsl.search.simulator import simulate  # noqa: E402
from monetdsl.units import human_bytes  # noqa: E402


def make(which: str, device: str = "cpu", batch: int | None = None):
    """The model and a batch on ``device``; batch 4 (GPT) / 8 (ResNet) unless given."""
    torch.manual_seed(0)
    if which == "gpt":
        model, b = GPTLike(), batch or 4
        inputs = (torch.randint(0, 8192, (b, 256)), torch.randint(0, 8192, (b, 256)))
    else:
        model, b = ResNet18Like(), batch or 8
        inputs = (torch.randn(b, 3, 64, 64), torch.randint(0, 100, (b,)))
    return model.train().to(device), tuple(t.to(device) for t in inputs)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PerBlockCheckpoint(torch.nn.Module):
    """``torch.utils.checkpoint`` around every block (non-reentrant)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._forwards = {}
        for block in model.blocks():
            original = block.forward
            block.forward = (lambda f: (lambda *a: checkpoint(f, *a, use_reentrant=False)))(original)
            self._forwards[block] = original

    def forward(self, *inputs):
        return self.model(*inputs)

    def restore(self):
        for block, original in self._forwards.items():
            block.forward = original


class Sequential3(torch.nn.Module):
    """``checkpoint_sequential`` with 3 segments over the model's children, then the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.seq = model.as_sequential()

    def forward(self, x, target):
        out = checkpoint_sequential(self.seq, 3, x, use_reentrant=False)
        out = out.view(-1, out.shape[-1]) if out.dim() == 3 else out
        return torch.nn.functional.cross_entropy(out, target.view(-1))


def lean_impls(network) -> dict[str, str]:
    """Per forward op the alternative keeping the fewest bytes (out of place), per backward
    op the one reading the fewest bytes among those its forward choice allows."""
    idx = index(network)
    size = lambda names: sum(network.tensors[n].nbytes for n in names)  # noqa: E731
    impls = {}
    for op in network.forward_ops:
        candidates = [i for i in op.impls if i.overwrites is None] or list(op.impls)
        impl = min(candidates, key=lambda i: (size(i.derived), i.time_us))
        impls[op.name] = impl.name
        for b in idx.backward_of.get(op.name, ()):
            bop = idx.backward_ops[b]
            usable = [x for x in bop.impls if all(r not in idx.derived_by or r in impl.derived for r in x.reads)]
            impls[b] = min(usable, key=lambda x: (size(r for r in x.reads if r in idx.derived_by or r not in network.tensors or not network.tensors[r].is_fixed), x.time_us)).name
    return impls


def block_outputs(network, model) -> list[str]:
    """The tensors the blocks end with: the last forward op whose name is in a block."""
    prefixes = [f"{name}." for name, module in model.named_modules() if any(module is b for b in model.blocks())]
    last = {}
    for op in network.forward_ops:
        for p in prefixes:
            if op.name.startswith(p):
                last[p] = op.outputs[0]
    return list(last.values())


def monetdsl_schedules(model, inputs, solver_seconds: float = 60.0):
    trace = trace_for_runtime(model, list(inputs), optimizer="sgd")
    spec, network = trace.spec, trace.spec.network
    first = {op.name: op.impls[0].name for op in (*network.forward_ops, *network.backward_ops)}
    out = {}
    notes: list[str] = []

    def add(name, schedule):
        sim = simulate(network, schedule)
        assert sim.valid, [d.message for d in sim.errors[:3]]
        out[name] = (schedule, sim)

    idx = index(network)
    keep_all = set()
    for bop in network.backward_ops:
        keep_all |= {r for r in bop.impls[0].reads if idx.is_forward_tensor(r)}
    add("monetdsl store-all (PyTorch impls)", build_schedule(network, first, forward_keep=keep_all, spec_path="", fingerprint=spec.fingerprint))
    add("monetdsl chen-sqrt", solve(spec, "chen-sqrt").schedule)
    lean = lean_impls(network)
    blocks = block_outputs(network, model)
    add("monetdsl per-block (PyTorch impls)", build_schedule(network, first, forward_keep=blocks, promote="needed",
                                                              spec_path="", fingerprint=spec.fingerprint))
    leaner_loss = {"cross_entropy": ("from_output", "from_output"), "linear_cross_entropy": ("chunked", "by chunks")}
    kinds = {op.name: trace.ops[op.of].kind.name for op in network.backward_ops
             if op.of and trace.ops[op.of].kind is not None and trace.ops[op.of].kind.name in leaner_loss}
    if kinds:
        loss_backward = {name: leaner_loss[kind][0] for name, kind in kinds.items()}
        how = "/".join(sorted({leaner_loss[kind][1] for kind in kinds.values()}))
        add(f"monetdsl per-block (PyTorch impls, loss backward {how})", build_schedule(
            network, {**first, **loss_backward}, forward_keep=blocks, promote="needed", spec_path="", fingerprint=spec.fingerprint))
    add("monetdsl per-block (lean impls)", build_schedule(network, lean, forward_keep=blocks, promote="needed",
                                                           spec_path="", fingerprint=spec.fingerprint))
    attention = {t for op in network.forward_ops if trace.ops[op.name].kind is not None and trace.ops[op.name].kind.name == "sdpa"
                 for t in op.outputs if t in keep_all}
    if attention:
        add("monetdsl per-block + attention outputs kept (lean impls)",
            build_schedule(network, lean, forward_keep=set(blocks) | attention, promote="needed", spec_path="", fingerprint=spec.fingerprint))
    expensive = {t for op in network.forward_ops if trace.ops[op.name].kind is not None
                 and trace.ops[op.name].kind.name in ("conv", "matmul", "sdpa") for t in op.outputs}
    add("monetdsl selective (keep conv/matmul/attention outputs)",
        build_schedule(network, first, forward_keep=(keep_all & expensive) | set(blocks), spec_path="", fingerprint=spec.fingerprint))
    peaks = {m: solve(spec, m) for m in ("store-all", "chen-sqrt", "recompute-all")}
    smallest = min(peaks.values(), key=lambda r: (r.simulation.peak_bytes, r.simulation.compute_us))
    add(f"monetdsl minimum peak ({smallest.details.get('chosen', smallest.method)})", smallest.schedule)
    if solver_seconds > 0:
        solved = [(f"{m}: lowest peak, planned overhead <= 10 %", m, dict(max_overhead=0.10, objective="memory")) for m in ("hybrid", "milp")]
        per_block = out["monetdsl per-block (lean impls)"][1].peak_bytes
        for method in ("hybrid", "milp", "checkmate"):
            solved.append((f"{method}: fastest within the per-block (lean) peak", method, dict(memory_budget=per_block)))
        for label, method, kwargs in solved:
            result = solve(spec, method, time_limit=solver_seconds, exact_min_budget=False, **kwargs)
            if not (result.success and result.simulation.ok):
                notes.append(f"{method} ({label}): no schedule: {result.message}")
                continue
            sim = result.simulation
            same = next((n for n, (_, s) in out.items() if (s.peak_bytes, s.compute_us) == (sim.peak_bytes, sim.compute_us)), None)
            if same is not None:  # measured already: say so instead of a duplicate row
                notes.append(f"{method} ({label}), {result.status} after {result.solve_seconds:.0f} s: the schedule of the"
                             f" '{same}' row (same planned peak and compute)")
            else:
                add(f"monetdsl {label} [{result.status}, {result.solve_seconds:.0f} s]", result.schedule)
    return trace, out, notes


#: the activation-peak targets, as a fraction of eager's: the "fastest within" row
PEAK_AIMS = {"gpt": 0.35, "resnet": 0.40}


def timed_cost_schedules(profiled, network, solver_seconds: float, notes: list[str], peak_budget: int | None = None,
                         peak_label: str = ""):
    """The hybrid engine on the spec whose costs were timed on this machine (``--profile``):
    the lowest peak within a planned 10 % and 15 % overhead, and (``peak_budget``, bytes
    including fixed memory) the fastest schedule within the aim's peak. Both specs describe
    one graph (one fingerprint), so the schedules are replayed on the roofline ``network``
    for the table's memory and run with the profiled trace."""
    if solver_seconds <= 0:
        return
    runs = [(f"lowest peak, planned overhead <= {cap:.0%}", dict(max_overhead=cap, objective="memory")) for cap in (0.10, 0.15)]
    if peak_budget is not None:
        runs.append((f"fastest within {peak_label}", dict(memory_budget=peak_budget)))
    for what, kwargs in runs:
        result = solve(profiled.spec, "hybrid", time_limit=solver_seconds, exact_min_budget=False, **kwargs)
        label = f"hybrid on timed costs: {what}"
        if not (result.success and result.simulation.ok):
            notes.append(f"{label}: no schedule: {result.message}")
            continue
        yield result.schedule, f"monetdsl {label} [{result.status}, {result.solve_seconds:.0f} s]", simulate(network, result.schedule)


def step(module, inputs):
    loss = module(*inputs)
    loss.backward()


def measure_peak(module, inputs, probe_cls):
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    step(module, inputs)  # warm-up
    probe = probe_cls().start()
    step(module, inputs)
    return probe.stop()


def probes_for(device: str):
    """Live tensor bytes (what the memory model models), then every byte: the counting CPU
    allocator, or ``torch.cuda.max_memory_allocated`` on a GPU."""
    return (LiveTensorProbe, CudaProbe if device.startswith("cuda") else AllocatorProbe)


def planned_ratios(network, schedules) -> dict[str, float]:
    """Planned compute of each schedule on ``network``'s costs, over the store-all schedule's
    (PyTorch's implementations): the simulator's prediction of the measured time ratio."""
    base = simulate(network, schedules["monetdsl store-all (PyTorch impls)"][0]).compute_us
    return {name: simulate(network, schedule).compute_us / base for name, (schedule, _) in schedules.items()}


def run(which: str, rounds: int, solver_seconds: float = 60.0, profile: bool = False, device: str = "cpu",
        batch: int | None = None) -> tuple[list[str], dict]:
    model, inputs = make(which, device, batch)
    live_probe, all_probe = probes_for(device)
    trace, schedules, notes = monetdsl_schedules(model, inputs, solver_seconds)
    trace_of = dict.fromkeys(schedules, trace)
    if profile:
        profiled = trace_for_runtime(model, list(inputs), optimizer="sgd", profile=True)
        aim = PEAK_AIMS[which]
        fixed = next(iter(schedules.values()))[1].fixed_bytes
        budget = fixed + int(aim * measure_peak(model, inputs, live_probe))
        for schedule, row, sim in timed_cost_schedules(profiled, trace.spec.network, solver_seconds, notes, budget,
                                                       f"{aim:.0%} of eager's peak"):
            schedules[row] = (schedule, sim)
            trace_of[row] = profiled
    planned = {"roofline": planned_ratios(trace.spec.network, schedules)}
    if profile:
        planned["profiled"] = planned_ratios(profiled.spec.network, schedules)
    strategies = {"eager": model, "checkpoint every block": None, "checkpoint_sequential (3)": Sequential3(model)}
    for name, (schedule, sim) in schedules.items():
        opt = monetdsl.optimize(model, schedule=schedule)
        opt.plan_for(*inputs, trace=trace_of[name])
        strategies[name] = opt
    memory = {}
    for name in strategies:
        if name == "checkpoint every block":
            wrapped = PerBlockCheckpoint(model)
            memory[name] = (measure_peak(wrapped, inputs, live_probe), measure_peak(wrapped, inputs, all_probe))
            wrapped.restore()
        else:
            module = strategies[name]
            memory[name] = (measure_peak(module, inputs, live_probe), measure_peak(module, inputs, all_probe))
    times = {name: [] for name in strategies}
    for _ in range(rounds + 1):
        for name in strategies:
            wrapped = PerBlockCheckpoint(model) if name == "checkpoint every block" else None
            module = wrapped or strategies[name]
            for p in model.parameters():
                p.grad = None
            synchronize(device)
            start = time.perf_counter()
            step(module, inputs)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if wrapped is not None:
                wrapped.restore()
    med = {name: statistics.median(v[1:]) for name, v in times.items()}
    eager_live, eager_alloc = memory["eager"]
    costs = list(planned)
    every = "max_memory_allocated" if device.startswith("cuda") else "allocator"
    rows = [f"| strategy | planned peak above fixed | measured (live tensors) | measured / planned | measured ({every}) | {every} / planned | peak vs eager (live) | step s | time vs eager | "
            + " | ".join(f"planned time ({c})" for c in costs) + " |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(costs)]
    summary = {}
    for name in strategies:
        live, alloc = memory[name]
        peak = ratio = ratio_all = ""
        if name in schedules:
            sim = schedules[name][1]
            p = sim.peak_bytes - sim.fixed_bytes
            peak = human_bytes(p)
            ratio, ratio_all = f"{live / p:.4f}", f"{alloc / p:.4f}"
        times_planned = " | ".join(f"x{planned[c][name]:.2f}" if name in schedules else "" for c in costs)
        rows.append(f"| {name} | {peak} | {human_bytes(live)} | {ratio} | {human_bytes(alloc)} | {ratio_all} | {live / eager_live:.1%} |"
                    f" {med[name]:.3f} | x{med[name] / med['eager']:.2f} | {times_planned} |")
        summary[name] = (live, med[name] / med["eager"])
    rows.extend(["", *(f"* {n}" for n in notes)] if notes else [])
    return rows, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--model", choices=["gpt", "resnet", "both"], default="both")
    parser.add_argument("--solver-seconds", type=float, default=60.0, help="time limit of each solver row (0: no solver rows)")
    parser.add_argument("--profile", action="store_true", help="also give the planned time on costs timed on this machine")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the cost model follows: CPU roofline or the GPU's preset)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 4 sequences for the GPT, 8 images for the ResNet)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{datetime.date.today()}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__},"
          f" {torch.get_num_threads()} threads, load average {load:.1f} at start; {args.rounds} interleaved rounds, medians")
    for which in (["gpt", "resnet"] if args.model == "both" else [args.model]):
        rows, _ = run(which, args.rounds, args.solver_seconds, args.profile, args.device, args.batch)
        batch = args.batch or (4 if which == "gpt" else 8)
        title = f"GPT-2-like decoder, {batch} x 256 tokens" if which == "gpt" else f"ResNet-18-like CNN, {batch} x 3 x 64 x 64"
        print(f"\n### {title} ({args.device})\n")
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
