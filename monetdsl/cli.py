"""The ``monetdsl`` command: argument parsing and error reporting around the sub-commands.

Exit status: 0 success (a valid spec or schedule, a schedule found), 1 invalid input or
no feasible schedule, 2 usage error (a bad option, an output that cannot be written), 130
interrupted (Ctrl-C; a search reports its best schedule so far). With ``--json`` the only
thing on stdout is one JSON object; messages go to stderr. Bad input is reported as
``file:line:column: message``, never as a Python traceback.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace

from . import __version__
from .commands import COMMANDS
from .commands.common import EXIT_INVALID, EXIT_USAGE, report_errors
from .commands.interrupt import INTERRUPTED
from .errors import Diagnostic, MonetError, OptionError, OutputError, SolveError

__all__ = ["main", "build_parser"]

EPILOG = """\
examples:
  monetdsl check specs/tiny_chain.monet
  monetdsl solve specs/tiny_chain.monet --budget 21MiB
  monetdsl check specs/tiny_chain.monet --schedule specs/tiny_chain.schedule.monet
  monetdsl show specs/tiny_chain.schedule.monet
  monetdsl trace monetdsl.models:resnet50 --input 184x3x224x224 -o resnet50.monet
  monetdsl bench monetdsl.models:small_cnn --input 64x3x32x32 --max-overhead 30%

exit status:
  0    ok: the spec or schedule is valid, a schedule was found (and written)
  1    invalid input (a spec, schedule or model with a problem, located) or no schedule fits
  2    usage error: a bad option or option value, or an output that cannot be written
       (checked before the work; if writing still fails, the result is printed anyway)
  130  interrupted by Ctrl-C: a search stops and reports (and writes) its best schedule
       so far; a second Ctrl-C exits at once
"""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A value such as `--budget -5MiB` must reach the option checks, which say what is
        # wrong with it; argparse would otherwise read `-5MiB` as an unknown flag and report
        # "expected one argument". No monetdsl flag starts with a digit.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="monetdsl",
        description="Plan which activations to keep and recompute, and how to implement each operator,"
        " so that training fits a memory budget.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"monetdsl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        as_json = getattr(args, "json", False)
        try:
            return args.run(args)
        except SolveError as exc:  # before MonetError (its base): the message names the spec
            return report_errors([Diagnostic(exc.message, getattr(args, "spec", "monetdsl"))], as_json)
        except (OptionError, OutputError) as exc:
            return report_errors(exc.diagnostics, as_json, EXIT_USAGE)
        except MonetError as exc:
            return report_errors(_named(exc.diagnostics, getattr(args, "spec", None)), as_json, EXIT_INVALID)
    except KeyboardInterrupt:  # Ctrl-C outside a search (which handles its own): no traceback
        print("\nmonetdsl: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # e.g. `monetdsl show ... | head`
        return 0


def _named(diagnostics: list[Diagnostic], spec: str | None) -> list[Diagnostic]:
    """A search refusing a spec reports it as ``<input>`` (it has no file name): name it."""
    if spec is None:
        return diagnostics
    return [replace(d, file=spec) if d.file == "<input>" else d for d in diagnostics]
