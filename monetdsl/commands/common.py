"""Helpers the sub-commands share: option parsing, loading, reporting."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import Diagnostic, MonetError
from ..grammar import load_schedule
from ..ir import Schedule, Spec
from ..search.simulator import Simulation, simulate
from ..units import UnitError, human_bytes, parse_bytes, parse_fraction
from ..validate import resolve_constraints

__all__ = [
    "usage_error",
    "parse_budget",
    "parse_overhead",
    "load_schedule_for",
    "describe_spec",
    "report_errors",
    "add_parser",
]


def add_parser(subparsers, name: str, *, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A sub-command parser whose help ends with worked examples."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples)
    return subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def usage_error(message: str) -> MonetError:
    return MonetError(Diagnostic(message, "monetdsl"))


def parse_budget(text: str | None, flag: str = "--budget") -> int | None:
    if text is None:
        return None
    try:
        return parse_bytes(text)
    except UnitError as exc:
        raise usage_error(f"{flag}: {exc}") from None


def parse_overhead(text: str | None, flag: str = "--max-overhead") -> float | None:
    if text is None:
        return None
    try:
        return parse_fraction(text)
    except UnitError as exc:
        raise usage_error(f"{flag}: {exc}") from None


def load_schedule_for(spec: Spec, path: str) -> tuple[Schedule, Simulation]:
    """Parse a schedule and replay it on ``spec`` with the spec's constraints."""
    schedule = load_schedule(path)
    constraints = resolve_constraints(spec.network, spec.constraints, path=spec.path, source=spec.source)
    return schedule, simulate(spec.network, schedule, constraints=constraints, fingerprint=spec.fingerprint)


def describe_spec(spec: Spec) -> str:
    net = spec.network
    return (
        f"network {net.name}: {len(net.tensors)} tensors, {len(net.forward_ops)} forward ops,"
        f" {len(net.backward_ops)} backward ops; fixed memory {human_bytes(net.fixed_bytes)}"
    )


def report_errors(diagnostics: list[Diagnostic], as_json: bool) -> int:
    """Print diagnostics (and, with --json, the JSON error object); exit status 1."""
    if as_json:
        print(json.dumps({"ok": False, "errors": [d.as_json() for d in diagnostics]}))
    for diag in diagnostics:
        print(diag.format(), file=sys.stderr)
    return 1
