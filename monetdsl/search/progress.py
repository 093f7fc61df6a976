"""Live progress of long searches, on stderr.

Searching methods call a *progress callback* with a :class:`ProgressInfo` whenever the
solver reports (HiGHS calls back many times a second during branch and bound). The CLI
and ``monetdsl.optimize`` pass a :class:`StderrProgress`, which stays silent for the first
second (most solves of small specs finish before) and then rewrites one line on the
terminal, twice a second: the method, its stage, elapsed time, incumbent, bound and gap.
It writes nothing when stderr is not a terminal (a log file or a pipe would fill with
rewritten lines), and the CLI passes none under ``--quiet`` or ``--json``; nothing here
writes to stdout.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from ..units import human_bytes

__all__ = ["ProgressInfo", "ProgressCallback", "StderrProgress", "format_value"]


@dataclass(frozen=True)
class ProgressInfo:
    """One report: ``incumbent``/``bound`` in ``unit`` ("us" or "bytes"); None if unknown."""

    method: str
    phase: str
    elapsed: float
    incumbent: float | None
    bound: float | None
    gap: float | None
    unit: str


ProgressCallback = Callable[[ProgressInfo], None]


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return human_bytes(int(round(value)))
    return f"{value:.6g} us"


class StderrProgress:
    """A progress callback rewriting one line of ``stream`` (stderr) after ``after``
    seconds, when ``stream`` is a terminal; silent otherwise."""

    def __init__(self, stream: TextIO | None = None, *, after: float = 1.0, every: float = 0.5):
        self.stream = stream if stream is not None else sys.stderr
        self.after = after
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            self.tty = False
        self.every = every
        self._last = -1e9
        self._open_line = False

    def __call__(self, info: ProgressInfo) -> None:
        if not self.tty or info.elapsed < self.after:
            return
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        gap = "-" if info.gap is None else f"{info.gap:.2%}"
        line = (
            f"{info.method}: {info.phase} {info.elapsed:6.1f} s  incumbent {format_value(info.incumbent, info.unit)}"
            f"  bound {format_value(info.bound, info.unit)}  gap {gap}"
        )
        self.stream.write("\r" + line + "\033[K")
        self._open_line = True
        self.stream.flush()

    def close(self) -> None:
        """End the rewritten line (call once the search is over)."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
