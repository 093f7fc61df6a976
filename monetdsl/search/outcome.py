"""What a searching method receives and returns.

Plain methods (store-all, chen-sqrt, ...) are functions ``(network, constraints, *,
spec_path, fingerprint) -> Schedule``. *Searching* methods (the MILPs) need more: a time
limit, an objective, solver options, a progress callback, and they know more than a
schedule: whether it is proved optimal, a lower bound, a gap, the minimum feasible budget.
They take a :class:`SearchContext` and return a :class:`MethodOutcome`, which
:func:`~monetdsl.search.solve.solve` turns into a :class:`~monetdsl.search.solve.SolveResult`
after replaying the schedule in the simulator.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Schedule
from ..options import OBJECTIVES
from .progress import ProgressCallback

__all__ = ["SearchContext", "MethodOutcome", "OBJECTIVES"]


@dataclass
class SearchContext:
    """Everything a searching method may need besides the network and the constraints."""

    spec_path: str
    fingerprint: str
    baseline_us: float
    objective: str = "compute"
    time_limit: float | None = None
    options: dict = field(default_factory=dict)
    progress: ProgressCallback | None = None
    #: anything with ``is_set()`` (a :class:`threading.Event`): once set, the search stops
    #: at its next check (a HiGHS callback, a phase boundary) and returns its best so far
    stop: object | None = None

    @property
    def stopped(self) -> bool:
        """True once the caller asked the search to stop (Ctrl-C on the command line)."""
        return self.stop is not None and self.stop.is_set()


@dataclass
class MethodOutcome:
    """A searching method's answer.

    ``status``: ``optimal`` (proved within the relative gap), ``feasible`` (a schedule, no
    proof sought), ``time_limit`` (the best schedule found when time ran out, or None), or
    ``infeasible`` (proved: no schedule meets the constraints). ``lower_bound`` is in the
    objective's unit: microseconds of compute, or bytes of peak memory.
    """

    schedule: Schedule | None
    status: str
    message: str = ""
    lower_bound: float | None = None
    gap: float | None = None
    min_feasible_budget: int | None = None
    min_feasible_budget_exact: bool = False
    min_budget_schedule: Schedule | None = None
    details: dict = field(default_factory=dict)
