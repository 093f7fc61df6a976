"""The ``monetdsl`` command.

Exit status: 0 success (a valid spec or schedule, a schedule found), 1 invalid input or
no feasible schedule, 2 usage error. With ``--json`` the only thing on stdout is one JSON
object; messages go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import Diagnostic, MonetError
from .grammar import format_schedule, load_schedule, load_spec
from .ir import Schedule, Spec
from .search.simulator import Simulation, simulate
from .search.solve import METHODS, solve
from .units import UnitError, human_bytes, parse_bytes, parse_fraction
from .validate import resolve_constraints

__all__ = ["main", "build_parser"]

EPILOG = """\
examples:
  monetdsl check specs/tiny_chain.monet
  monetdsl solve specs/tiny_chain.monet --budget 40KiB
  monetdsl check specs/tiny_chain.monet --schedule specs/tiny_chain.schedule.monet
  monetdsl show specs/tiny_chain.schedule.monet

exit status: 0 ok, 1 invalid input or infeasible, 2 usage error
"""


class _Parser(argparse.ArgumentParser):
    """argparse that names the sub-command in usage errors and exits with status 2."""

    def error(self, message: str):  # pragma: no cover - exercised through the CLI tests
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="monetdsl",
        description="Plan which activations to keep, recompute and how to implement each operator,"
        " so that training fits a memory budget.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"monetdsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    check = sub.add_parser(
        "check",
        help="validate a spec, or a schedule against its spec",
        description="Validate a spec; with --schedule, replay the schedule in the simulator and report its"
        " peak memory, compute and any problem (an edited schedule included).",
        epilog="example:\n  monetdsl check specs/resblock.monet --schedule specs/resblock.schedule.monet --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("spec", help="the .monet spec file")
    check.add_argument("--schedule", help="a schedule file to check against the spec")
    check.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    check.set_defaults(run=_cmd_check)

    solve_p = sub.add_parser(
        "solve",
        help="find a schedule for a spec",
        description="Find a schedule under the spec's constraints (or those given here), replay it in the"
        " simulator and write it next to the spec as NAME.schedule.monet (or -o).",
        epilog="examples:\n  monetdsl solve specs/resblock.monet --budget 6MiB\n"
        "  monetdsl solve specs/resblock.monet --max-overhead 10% --method chen-sqrt -o plan.monet --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    solve_p.add_argument("spec", help="the .monet spec file")
    solve_p.add_argument("--budget", help="memory budget, e.g. 6GiB (overrides the spec's `memory <=`)")
    solve_p.add_argument("--max-overhead", help="compute overhead cap, e.g. 10%% (overrides the spec's `overhead <=`)")
    solve_p.add_argument(
        "--method",
        default="auto",
        help=f"search method: auto (default) or one of {', '.join(METHODS)}",
    )
    solve_p.add_argument("--time-limit", type=float, help="seconds the search may take")
    solve_p.add_argument("-o", "--output", help="where to write the schedule (default: SPEC's NAME.schedule.monet)")
    solve_p.add_argument("--no-write", action="store_true", help="do not write the schedule file")
    solve_p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    solve_p.set_defaults(run=_cmd_solve)

    show = sub.add_parser(
        "show",
        help="summarise a schedule stage by stage, with its memory timeline",
        description="Print a per-stage summary of a schedule and its memory timeline. The spec is found"
        " through the schedule's `for \"PATH\"` line (relative to the schedule) unless --spec is given.",
        epilog="example:\n  monetdsl show specs/tiny_chain.schedule.monet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("schedule", help="the schedule file")
    show.add_argument("--spec", help="the spec file (default: the one the schedule names)")
    show.add_argument("--width", type=int, default=40, help="width of the memory bars (default 40)")
    show.set_defaults(run=_cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except MonetError as exc:
        return _report_errors(exc.diagnostics, getattr(args, "json", False))
    except BrokenPipeError:  # pragma: no cover - e.g. `monetdsl show ... | head`
        return 0


# --------------------------------------------------------------------------- helpers
def _report_errors(diagnostics: list[Diagnostic], as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "errors": [d.as_json() for d in diagnostics]}))
    for diag in diagnostics:
        print(diag.format(), file=sys.stderr)
    return 1


def _usage(message: str) -> MonetError:
    return MonetError(Diagnostic(message, "monetdsl"))


def _parse_budget(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_bytes(text)
    except UnitError as exc:
        raise _usage(f"--budget: {exc}") from None


def _parse_overhead(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parse_fraction(text)
    except UnitError as exc:
        raise _usage(f"--max-overhead: {exc}") from None


def _load_schedule_for(spec: Spec, path: str) -> tuple[Schedule, Simulation]:
    schedule = load_schedule(path)
    constraints = resolve_constraints(spec.network, spec.constraints, path=spec.path, source=spec.source)
    return schedule, simulate(spec.network, schedule, constraints=constraints, fingerprint=spec.fingerprint)


def _describe_spec(spec: Spec) -> str:
    net = spec.network
    return (
        f"network {net.name}: {len(net.tensors)} tensors, {len(net.forward_ops)} forward ops,"
        f" {len(net.backward_ops)} backward ops; fixed memory {human_bytes(net.fixed_bytes)}"
    )


# --------------------------------------------------------------------------- check
def _cmd_check(args) -> int:
    spec = load_spec(args.spec)
    if args.schedule is None:
        if args.json:
            print(json.dumps({"ok": True, "errors": []}))
        else:
            print(f"{args.spec}: ok; {_describe_spec(spec)}")
        return 0
    schedule, sim = _load_schedule_for(spec, args.schedule)
    problems = sim.errors + sim.violations
    if args.json:
        data = {"ok": sim.ok, "errors": [d.as_json() for d in problems], "warnings": [d.as_json() for d in sim.warnings]}
        if sim.valid:
            data.update(peak_bytes=sim.peak_bytes, compute=sim.compute_us, overhead=sim.overhead)
        print(json.dumps(data))
    for diag in problems + sim.warnings:
        print(diag.format(), file=sys.stderr)
    if not args.json:
        if sim.valid:
            state = "valid" if sim.ok else "valid, but breaks the spec's constraints"
            print(f"{args.schedule}: {state}")
            print(f"  {sim.summary()}")
        else:
            print(f"{args.schedule}: invalid ({len(sim.errors)} problem{'s' if len(sim.errors) != 1 else ''})")
    return 0 if sim.ok else 1


# --------------------------------------------------------------------------- solve
def _default_output(spec_path: str) -> Path:
    path = Path(spec_path)
    stem = path.name[: -len(".monet")] if path.name.endswith(".monet") else path.stem
    return path.with_name(f"{stem}.schedule.monet")


def _cmd_solve(args) -> int:
    spec = load_spec(args.spec)
    budget = _parse_budget(args.budget)
    overhead = _parse_overhead(args.max_overhead)
    output = Path(args.output) if args.output else _default_output(args.spec)
    if not args.no_write and output.resolve() == Path(args.spec).resolve():
        raise _usage(f"refusing to write the schedule over the spec {args.spec}; choose another -o")
    result = solve(spec, args.method, memory_budget=budget, max_overhead=overhead, time_limit=args.time_limit)
    data = result.as_json()
    wrote = None
    if result.success and not args.no_write:
        schedule = result.schedule
        spec_ref = os.path.relpath(Path(args.spec).resolve(), output.resolve().parent)
        schedule = Schedule(spec_ref, schedule.fingerprint, schedule.impls, schedule.forward_keep, schedule.stages)
        text = render_schedule(schedule, spec, result.simulation, method=result.details.get("chosen", result.method))
        from .io import write_preserving

        backup = write_preserving(output, text)
        wrote = str(output)
        data["output"] = wrote
        if backup is not None:
            data["backup"] = str(backup)
            print(f"note: {output} had been edited (or was not written by monetdsl); kept it as {backup}", file=sys.stderr)
    if args.json:
        print(json.dumps(data))
    else:
        if result.success:
            print(result.message)
            if wrote:
                print(f"wrote {wrote}")
        else:
            print(f"{args.spec}: {result.message}", file=sys.stderr)
    return 0 if result.success else 1


def render_schedule(schedule: Schedule, spec: Spec, sim: Simulation, *, method: str) -> str:
    """Schedule text with the simulator's predictions as comments."""
    header = [
        f"schedule written by monetdsl {__version__} (method {method}) for network {spec.network.name}",
        f"predicted peak {human_bytes(sim.peak_bytes)} ({sim.peak_bytes} B) at {sim.where()}",
        f"predicted compute {sim.compute_us:.6g} us = {1 + sim.overhead:.4f}x the no-recompute baseline"
        f" ({sim.baseline_us:.6g} us)",
        "edit freely; `monetdsl check SPEC --schedule THIS` says whether an edit is valid and what it costs",
    ]
    notes = {i: f"peak {human_bytes(p)}" for i, p in enumerate(sim.stage_peaks())}
    return format_schedule(schedule, spec.network, header=header, stage_notes=notes)


# --------------------------------------------------------------------------- show
def _cmd_show(args) -> int:
    schedule = load_schedule(args.schedule)
    spec_path = args.spec or str(Path(args.schedule).resolve().parent / schedule.spec_path)
    if not Path(spec_path).exists():
        raise _usage(f"cannot find the spec {spec_path} named by {args.schedule}; pass --spec")
    spec = load_spec(spec_path)
    _, sim = _load_schedule_for(spec, args.schedule)
    for diag in sim.errors + sim.violations + sim.warnings:
        print(diag.format(), file=sys.stderr)
    if not sim.valid:
        print(f"{args.schedule}: invalid, nothing to show", file=sys.stderr)
        return 1
    print(format_show(spec, schedule, sim, width=max(args.width, 10)))
    return 0 if sim.ok else 1


def format_show(spec: Spec, schedule: Schedule, sim: Simulation, *, width: int = 40) -> str:
    """The human summary ``monetdsl show`` prints: per-stage table and memory timeline."""
    lines = [f"schedule for {spec.network.name} ({spec.path})", f"  {sim.summary()}", f"  fixed memory {human_bytes(sim.fixed_bytes)}"]
    if schedule.impls:
        lines.append("  implementations: " + ", ".join(f"{k}={v}" for k, v in schedule.impls.items()))
    lines.append("")
    lines.append(f"{'stage':<32} {'recompute':>9} {'keep':>5} {'free':>5} {'peak':>12} {'time us':>10}")
    per_stage: dict[int, list] = {}
    for step in sim.steps:
        per_stage.setdefault(step.stage, []).append(step)
    plans = [None, *schedule.stages]
    for t, steps in sorted(per_stage.items()):
        plan = plans[t] if t < len(plans) else None
        name = "forward" if t == 0 else steps[-1].stage_name
        n_re = sum(1 for s in steps if s.kind == "recompute")
        keep = len(schedule.forward_keep) if t == 0 else len(plan.keep) if plan else 0
        free = len(plan.free) if plan else 0
        peak = max(s.peak for s in steps)
        time_us = sum(s.time_us for s in steps)
        lines.append(f"{name[:32]:<32} {n_re:>9} {keep:>5} {free:>5} {human_bytes(peak):>12} {time_us:>10.4g}")
    lines.append("")
    lines.append("memory timeline (peak during each step; '#' fixed, '=' live tensors and workspace):")
    top = max(sim.peak_bytes, 1)
    for step in sim.steps:
        fixed = round(width * sim.fixed_bytes / top)
        total = round(width * step.peak / top)
        bar = "#" * fixed + "=" * max(total - fixed, 0)
        mark = " <- peak" if step is sim.peak_step else ""
        label = f"{'fwd' if step.kind == 'forward' else 'rec' if step.kind == 'recompute' else 'bwd'} {step.op}"
        lines.append(f"  {label[:34]:<34} {bar:<{width}} {human_bytes(step.peak):>11}{mark}")
    return "\n".join(lines)
