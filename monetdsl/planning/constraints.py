"""What a caller of ``monetdsl.optimize`` or ``monetdsl.backend`` asked the plan to meet.

One immutable value, built once by the runtime's front after
:func:`monetdsl.options.check_search_options` has checked every option, and passed down
unchanged: the schedule cache keys on it, the search reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir import Schedule
from ..units import human_bytes

__all__ = ["Constraints"]


@dataclass(frozen=True)
class Constraints:
    """What the caller asked for: a budget (bytes), an overhead cap, a schedule file, a method,
    the searching methods' time limit (seconds; None: their default, 60 s). ``eager``: the
    plan is PyTorch's own step (``schedule`` is then store-all with PyTorch's
    implementations, what autograd keeps), run by the model itself: set when no schedule
    that recomputes meets the overhead cap against eager's step
    (:mod:`monetdsl.runtime.eager_reference`). ``engine_room``: ``schedule`` is one
    monetdsl made to time what a solved plan of it runs (calibration, the eager
    reference), so its stretches get a solved plan's room above the simulated peak
    (:data:`monetdsl.runtime.stretches.ENGINE_ROOM`); a caller's schedule gets none."""

    budget: int | None = None
    max_overhead: float | None = None
    schedule: str | Schedule | None = None  # a .monet file, or a Schedule object
    method: str = "auto"
    time_limit: float | None = None
    eager: bool = False
    engine_room: bool = False

    def describe(self) -> str:
        parts = []
        if self.budget is not None:
            parts.append(f"budget {human_bytes(self.budget)}")
        if self.max_overhead is not None:
            parts.append(f"overhead <= {self.max_overhead:.1%}")
        return ", ".join(parts) or "no constraint"
