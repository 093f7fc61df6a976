"""Helpers the sub-commands share: option checks, loading, reporting, writing outputs."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import Diagnostic, OptionError, OutputError
from ..grammar import load_schedule
from ..io import Written, check_output, write_output
from ..ir import Schedule, Spec
from ..options import CLI_SPELLING, SearchOptions, check_search_options, option_error
from ..search.simulator import Simulation, simulate
from ..units import human_bytes
from ..validate import resolve_constraints

__all__ = [
    "EXIT_OK",
    "EXIT_INVALID",
    "EXIT_USAGE",
    "usage_error",
    "cli_search_options",
    "load_schedule_for",
    "describe_spec",
    "report_errors",
    "add_parser",
    "check_output",
    "write_after_work",
]

#: exit statuses (``monetdsl --help`` lists them; 130 is Ctrl-C, see :mod:`.interrupt`)
EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers, name: str, *, help: str, description: str, examples: list[str]) -> argparse.ArgumentParser:
    """A sub-command parser whose help ends with worked examples."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples)
    return subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def usage_error(message: str) -> OptionError:
    """A mistake on the command line (exit status 2)."""
    return option_error(message)


def cli_search_options(args, *, methods=None, options: dict | None = None) -> SearchOptions:
    """The search flags of ``args`` (those it has), checked as the API checks them."""
    return check_search_options(
        method=getattr(args, "method", "auto"),
        memory_budget=getattr(args, "budget", None),
        max_overhead=getattr(args, "max_overhead", None),
        time_limit=getattr(args, "time_limit", None),
        options=options,
        methods=methods,
        spelling=CLI_SPELLING,
    )


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


def report_errors(diagnostics: list[Diagnostic], as_json: bool, status: int = EXIT_INVALID) -> int:
    """Print diagnostics (and, with --json, the JSON error object); return ``status``."""
    if as_json:
        print(json.dumps({"ok": False, "errors": [d.as_json() for d in diagnostics]}))
    for diag in diagnostics:
        print(diag.format(), file=sys.stderr)
    return status


def write_after_work(path, text: str, data: dict, *, checksum: bool = False, flag: str = "-o", key: str = "output") -> Written | None:
    """Write an output once the work is done, recording it in ``data`` (the JSON result).

    When writing fails anyway (the disk filled up, the folder went away), the work is not
    lost: ``data[key + "_error"]`` says why, the reason goes to stderr, and the caller
    still prints its result; None is returned and the command exits with status 2.
    """
    try:
        written = write_output(path, text, checksum=checksum, flag=flag)
    except OutputError as exc:
        message = exc.diagnostics[0].message
        data[f"{key}_error"] = message
        print(f"monetdsl: not written: {message}", file=sys.stderr)
        return None
    data[key] = str(path)
    if written.backup is not None:
        data["backup" if key == "output" else f"{key}_backup"] = str(written.backup)
        print(f"note: {path} had been edited (or was not written by monetdsl); kept it as {written.backup}", file=sys.stderr)
    return written
