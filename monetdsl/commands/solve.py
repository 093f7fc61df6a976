"""``monetdsl solve SPEC``: find a schedule, replay it, write it atomically next to the spec."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from .. import __version__
from ..errors import OutputError
from ..grammar import format_schedule, load_spec
from ..ir import Schedule, Spec
from ..options import CLI_SPELLING
from ..search.milp.engine import DEFAULT_GAP, DEFAULT_TIME_LIMIT
from ..search.milp.highs import BACKENDS
from ..search.progress import StderrProgress
from ..search.simulator import Simulation
from ..search.solve import METHODS, SEARCHERS, solve
from ..units import human_bytes
from .common import EXIT_INVALID, EXIT_OK, EXIT_USAGE, add_parser, check_output, cli_search_options, usage_error, write_after_work
from .interrupt import INTERRUPTED, stop_on_interrupt


def register(subparsers) -> None:
    parser = add_parser(
        subparsers,
        "solve",
        help="find a schedule for a spec",
        description="Find a schedule under the spec's constraints (or those given here), replay it in the"
        " simulator and write it next to the spec as NAME.schedule.monet (or -o). Exit 0 when a schedule"
        " was found, 1 when none fits, 2 on a bad option or an output that cannot be written (the result is"
        " still printed), 130 on Ctrl-C (the best schedule so far is reported and written).",
        examples=[
            "monetdsl solve specs/resblock.monet --budget 150MiB",
            "monetdsl solve specs/resblock.monet --budget 160MiB --method milp --time-limit 30",
            "monetdsl solve specs/resnet50.monet --budget 8GiB --method hybrid --time-limit 60",
            "monetdsl solve specs/transformer_block.monet --min-memory --max-overhead 10%",
            "monetdsl solve specs/transformer_block.monet --max-overhead 40% --method chen-sqrt -o plan.monet --json",
        ],
    )
    parser.add_argument("spec", help="the .monet spec file")
    parser.add_argument("--budget", help="memory budget, e.g. 6GiB (overrides the spec's `memory <=`)")
    parser.add_argument("--max-overhead", help="compute overhead cap, e.g. 10%% (overrides the spec's `overhead <=`)")
    parser.add_argument("--method", default="auto", help=f"search method: auto (default: milp up to 16 forward ops, hybrid above) or one of {', '.join(METHODS)}")
    parser.add_argument(
        "--time-limit", type=float,
        help=f"seconds a searching method ({', '.join(sorted(SEARCHERS))}) may take (default {DEFAULT_TIME_LIMIT:g})",
    )
    parser.add_argument(
        "--min-memory", action="store_true",
        help="find the smallest peak (within --max-overhead, if given) and report the exact minimum budget;"
        " implies --method milp unless a searching method is named",
    )
    parser.add_argument(
        "--gap", help=f"relative optimality gap at which the MILP stops, e.g. 1%% (default {100 * DEFAULT_GAP:g}%%)"
    )
    parser.add_argument("--solver", choices=BACKENDS, default="highspy", help="HiGHS interface for the MILPs (default highspy)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("-o", "--output", help="where to write the schedule (default: the spec's NAME.schedule.monet; - for standard output)")
    parser.add_argument("--no-write", action="store_true", help="do not write the schedule file")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.set_defaults(run=run)


def default_output(spec_path: str) -> Path:
    """``dir/NAME.monet`` -> ``dir/NAME.schedule.monet``."""
    path = Path(spec_path)
    stem = path.name[: -len(".monet")] if path.name.endswith(".monet") else path.stem
    return path.with_name(f"{stem}.schedule.monet")


def run(args) -> int:
    started = time.perf_counter()  # --time-limit bounds the command: reading the spec counts
    gap = {} if args.gap is None else {"gap": args.gap}
    checked = cli_search_options(args, methods=METHODS, options={"backend": args.solver, **gap})
    if args.output and args.no_write:
        raise usage_error("-o and --no-write contradict each other; give one")
    # "-" is standard output, as for most command-line tools
    output = Path("/dev/stdout" if args.output == "-" else args.output) if args.output else default_output(args.spec)
    spec = load_spec(args.spec)
    if not args.no_write:
        if output.resolve() == Path(args.spec).resolve():
            raise usage_error(f"refusing to write the schedule over the spec {args.spec}; choose another -o")
        try:
            check_output(output, flag="-o" if args.output else None, stdout_is_json=args.json)
        except OutputError as exc:
            if args.output:
                raise
            raise OutputError(replace(exc.diagnostics[0], message=exc.diagnostics[0].message + "; choose another place with -o,"
                                      " or pass --no-write")) from None
    progress = None if args.quiet or args.json else StderrProgress()
    time_limit = checked.time_limit
    if time_limit is not None:  # what reading the spec left (a large spec takes about a second)
        time_limit = max(0.1, math.floor(10 * (time_limit - (time.perf_counter() - started))) / 10)
    try:
        with stop_on_interrupt() as stop:
            result = solve(
                spec, checked.method, memory_budget=checked.memory_budget, max_overhead=checked.max_overhead,
                time_limit=time_limit, options=checked.options, objective="memory" if args.min_memory else None,
                progress=progress, spelling=CLI_SPELLING, stop=stop,
            )
    finally:
        if progress is not None:
            progress.close()
    data = result.as_json()
    written = None
    if result.success and not args.no_write:
        spec_ref = os.path.relpath(Path(args.spec).resolve(), output.resolve().parent)
        schedule = result.schedule
        schedule = Schedule(spec_ref, schedule.fingerprint, schedule.impls, schedule.forward_keep, schedule.stages)
        text = render_schedule(schedule, spec, result.simulation, method=result.details.get("chosen", result.method))
        written = write_after_work(output, text, data, checksum=True)
    if args.json:
        print(json.dumps(data))
    elif result.success:
        print(result.message)
        if written is not None:
            print(f"wrote {output}")
    else:
        print(f"{args.spec}: {result.message}", file=sys.stderr)
    if result.status == "interrupted":
        return INTERRUPTED
    if "output_error" in data:
        return EXIT_USAGE
    return EXIT_OK if result.success else EXIT_INVALID


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
