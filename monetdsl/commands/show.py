"""``monetdsl show SCHED``: a per-stage summary of a schedule and its memory timeline."""
from __future__ import annotations

import sys
from pathlib import Path

from ..grammar import load_schedule, load_spec
from ..ir import Schedule, Spec
from ..search.simulator import Simulation
from ..units import human_bytes
from .common import add_parser, load_schedule_for, usage_error


def register(subparsers) -> None:
    parser = add_parser(
        subparsers,
        "show",
        help="summarise a schedule stage by stage, with its memory timeline",
        description="Print a per-stage summary of a schedule and its memory timeline. The spec is found"
        ' through the schedule\'s `for "PATH"` line (relative to the schedule) unless --spec is given.',
        examples=["monetdsl show specs/tiny_chain.schedule.monet"],
    )
    parser.add_argument("schedule", help="the schedule file")
    parser.add_argument("--spec", help="the spec file (default: the one the schedule names)")
    parser.add_argument("--width", type=int, default=40, help="width of the memory bars (default 40)")
    parser.set_defaults(run=run)


def run(args) -> int:
    schedule = load_schedule(args.schedule)
    spec_path = args.spec or str(Path(args.schedule).resolve().parent / schedule.spec_path)
    if not Path(spec_path).exists():
        raise usage_error(f"cannot find the spec {spec_path} named by {args.schedule}; pass --spec")
    spec = load_spec(spec_path)
    _, sim = load_schedule_for(spec, args.schedule)
    for diag in sim.errors + sim.violations + sim.warnings:
        print(diag.format(), file=sys.stderr)
    if not sim.valid:
        print(f"{args.schedule}: invalid, nothing to show", file=sys.stderr)
        return 1
    print(format_show(spec, schedule, sim, width=max(args.width, 10)))
    return 0 if sim.ok else 1


def format_show(spec: Spec, schedule: Schedule, sim: Simulation, *, width: int = 40) -> str:
    """Per-stage table (recomputations, keeps, frees, peak, time) and a memory timeline."""
    lines = [
        f"schedule for {spec.network.name} ({spec.path})",
        f"  {sim.summary()}",
        f"  fixed memory {human_bytes(sim.fixed_bytes)}",
    ]
    if schedule.impls:
        lines.append("  implementations: " + ", ".join(f"{k}={v}" for k, v in schedule.impls.items()))
    lines += ["", f"{'stage':<32} {'recompute':>9} {'keep':>5} {'free':>5} {'peak':>12} {'time us':>10}"]
    per_stage: dict[int, list] = {}
    for step in sim.steps:
        per_stage.setdefault(step.stage, []).append(step)
    plans = [None, *schedule.stages]
    for t, steps in sorted(per_stage.items()):
        plan = plans[t] if t < len(plans) else None
        name = "forward" if t == 0 else steps[-1].stage_name
        recomputed = sum(1 for s in steps if s.kind == "recompute")
        keep = len(schedule.forward_keep) if t == 0 else len(plan.keep) if plan else 0
        free = len(plan.free) if plan else 0
        peak = max(s.peak for s in steps)
        time_us = sum(s.time_us for s in steps)
        lines.append(f"{name[:32]:<32} {recomputed:>9} {keep:>5} {free:>5} {human_bytes(peak):>12} {time_us:>10.4g}")
    lines += ["", "memory timeline (peak during each step; '#' fixed memory, '=' tensors and workspace):"]
    top = max(sim.peak_bytes, 1)
    for step in sim.steps:
        fixed = round(width * sim.fixed_bytes / top)
        total = round(width * step.peak / top)
        bar = "#" * fixed + "=" * max(total - fixed, 0)
        mark = " <- peak" if step is sim.peak_step else ""
        label = f"{ {'forward': 'fwd', 'recompute': 'rec', 'backward': 'bwd'}[step.kind]} {step.op}"
        lines.append(f"  {label[:34]:<34} {bar:<{width}} {human_bytes(step.peak):>11}{mark}")
    return "\n".join(lines)
