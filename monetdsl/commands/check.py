"""``monetdsl check SPEC [--schedule SCHED] [--json]``: is the spec (or the schedule) valid?"""
from __future__ import annotations

import json
import sys

from ..grammar import load_spec
from .common import add_parser, describe_spec, load_schedule_for


def register(subparsers) -> None:
    parser = add_parser(
        subparsers,
        "check",
        help="validate a spec, or a schedule against its spec",
        description="Validate a spec; with --schedule, replay the schedule in the simulator and report its"
        " peak memory, compute and any problem (an edited schedule included). Exit 0 when valid, 1 when not.",
        examples=[
            "monetdsl check specs/resblock.monet",
            "monetdsl check specs/resblock.monet --schedule specs/resblock.schedule.monet --json",
        ],
    )
    parser.add_argument("spec", help="the .monet spec file")
    parser.add_argument("--schedule", help="a schedule file to check against the spec")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.set_defaults(run=run)


def run(args) -> int:
    spec = load_spec(args.spec)
    if args.schedule is None:
        if args.json:
            print(json.dumps({"ok": True, "errors": []}))
        else:
            print(f"{args.spec}: ok; {describe_spec(spec)}")
        return 0
    _, sim = load_schedule_for(spec, args.schedule)
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
            state = "valid" if sim.ok else "valid, but it breaks the spec's constraints"
            print(f"{args.schedule}: {state}")
            print(f"  {sim.summary()}")
        else:
            count = len(sim.errors)
            print(f"{args.schedule}: invalid ({count} problem{'s' if count != 1 else ''})")
    return 0 if sim.ok else 1
