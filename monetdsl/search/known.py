"""Schedules behind the minimum budgets this process has reported, offered to later searches.

A search that cannot meet a budget reports the least peak it found (``min_feasible_budget``)
with the schedule that has it, replayed by the simulator. Passing that number back as the
budget must give a schedule. The searches are time-limited, though: what HiGHS holds when
the clock stops, and how the time is split between the phases, differ from run to run and
from budget to budget, so a second search need not find that schedule again (a 25-op ResNet
reported 577,552 B at budget 1 B and then found nothing at 577,552 B). Every such schedule
is therefore remembered here by the graph's fingerprint, and :func:`recall` hands it to
later searches of the same graph (``milp``, ``hybrid``, the minimum-budget search) as one
more candidate next to the heuristics: replayed again under the new constraints and used
only when it satisfies them, as a MIP start or a result. Results can only improve.
"""
from __future__ import annotations

from ..ir import Schedule

__all__ = ["remember", "recall", "forget", "MAX_PER_GRAPH"]

#: schedules kept per graph (the oldest is dropped first: the latest report must stay usable)
MAX_PER_GRAPH = 8

_KNOWN: dict[str, list[tuple[int, Schedule]]] = {}


def remember(fingerprint: str | None, schedule: Schedule, peak_bytes: int) -> None:
    """Keep ``schedule`` (whose replayed peak is ``peak_bytes``) for later searches of the graph."""
    if not fingerprint:
        return
    entries = _KNOWN.setdefault(fingerprint, [])
    if any(s == schedule for _, s in entries):
        return
    entries.append((int(peak_bytes), schedule))
    del entries[:-MAX_PER_GRAPH]


def recall(fingerprint: str | None) -> list[Schedule]:
    """The remembered schedules of the graph, lowest peak first."""
    if not fingerprint:
        return []
    return [s for _, s in sorted(_KNOWN.get(fingerprint, ()), key=lambda e: e[0])]


def forget() -> None:
    """Drop every remembered schedule."""
    _KNOWN.clear()
