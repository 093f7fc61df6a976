"""Errors that monetdsl reports to users: located, readable, never a traceback.

Every problem with user input becomes a :class:`Diagnostic` (file, line, column,
message) collected in a :class:`MonetError`. The CLI prints them as
``file:line:column: message`` followed, where the source is known, by the offending
line and a caret, which is the form compilers use and editors understand.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Diagnostic",
    "PlanningWarning",
    "CapWarning",
    "EstimatedCostsWarning",
    "MonetError",
    "SpecSyntaxError",
    "SpecError",
    "ScheduleError",
    "SolveError",
    "OptionError",
    "OutputError",
]


@dataclass(frozen=True)
class Diagnostic:
    """One located problem. ``line``/``column`` are 1-based; 0 means unknown."""

    message: str
    file: str = "<input>"
    line: int = 0
    column: int = 0
    source_line: str | None = None
    severity: str = "error"

    def format(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        text = f"{where}: {self.severity + ': ' if self.severity != 'error' else ''}{self.message}"
        if self.source_line is not None and self.line:
            caret_at = max(self.column, 1)
            text += f"\n    {self.source_line.rstrip()}\n    {' ' * (caret_at - 1)}^"
        return text

    def as_json(self) -> dict:
        return {"file": self.file, "line": self.line, "column": self.column, "message": self.message}


class MonetError(Exception):
    """Bad user input: one or more diagnostics. The CLI prints them and exits non-zero."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic | str):
        if isinstance(diagnostics, str):
            diagnostics = [Diagnostic(diagnostics)]
        elif isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__("\n".join(d.format() for d in self.diagnostics))


class SpecSyntaxError(MonetError):
    """The text does not follow the .monet grammar."""


class SpecError(MonetError):
    """The text parses but describes an inconsistent network or constraints."""


class ScheduleError(MonetError):
    """A schedule is invalid for its spec (wrong spec, missing tensor, illegal in-place...)."""


class SolveError(MonetError):
    """A solver could not produce a schedule; carries what is known (e.g. the minimum budget).
    A :class:`MonetError` like every other answer to what the user asked for, so one
    ``except monetdsl.MonetError`` catches an impossible budget too."""

    def __init__(self, message: str, *, min_feasible_budget: int | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.min_feasible_budget = min_feasible_budget
        self.details = dict(details or {})


class OptionError(MonetError):
    """An option has a value the tool cannot use (an unknown method, a budget without a
    unit, a negative time limit, an unknown key in ``options``): the command line's usage
    error. Raised by :func:`monetdsl.options.check_search_options`, whoever calls it."""


class OutputError(MonetError):
    """A file cannot be written where asked (a missing or read-only folder, a directory,
    a device that refuses data). Checked before the work starts wherever possible."""


class PlanningWarning(UserWarning):
    """A training call needs a plan that was not made up front (a new input shape, dtype,
    device or autocast state): it traces and solves before the step runs."""


class CapWarning(UserWarning):
    """An overhead cap no schedule that recomputes can keep against eager PyTorch's step
    on this model and machine (the runtime's own fastest step is already that slow): the
    model trains as eager PyTorch."""


class EstimatedCostsWarning(UserWarning):
    """A schedule file given to ``monetdsl.optimize`` was solved on estimated costs (a
    roofline and FakeTensor workspaces), not on this machine's: its peak here can differ
    from the one it was planned for."""


def warn_at_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside monetdsl (the user's line),
    however deep in planning the warning is raised."""
    import os
    import sys
    import warnings

    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    torch_module = sys.modules.get("torch")
    theirs = os.path.dirname(os.path.abspath(torch_module.__file__)) + os.sep if torch_module else ours
    frame, level = sys._getframe(1), 1  # level k: sys._getframe(k) here, stacklevel k + 1 for warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith((ours, theirs)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
