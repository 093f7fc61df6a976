"""When a search that cannot prove its result should stop anyway.

A time limit is an upper bound, not a duration. A search stops as soon as it proves its
result within its relative gap (HiGHS's ``mip_rel_gap``, the ``gap`` option), or when it
has *stopped paying*: no improvement of at least :data:`MIN_GAIN` (relative) of its
incumbent for :data:`STALL_SHARE` of the time spent so far (and at least
:data:`MIN_STALL_SECONDS`). The longer a search has run, the longer it is given to find
the next improvement; one that found its last improvement after 8 s stops at 10.7 s (8 s
is 3/4 of 10.7 s), one still improving at 40 s runs on.

A search that knows a lower bound every schedule obeys also stops once its best is within
:data:`TOLERANCE` of it (``best <= (1 + TOLERANCE) x bound``): no schedule, a full search's
included, is then more than that share better, and the targets are about 1 %.

    >>> watch = StallWatch(StopRule(), begin=0.0, bound=400.0)
    >>> watch.observe(405.0, now=1.0)
    >>> watch.reason(now=1.0) is None    # 1.25 % above the bound
    True
    >>> watch.observe(403.0, now=2.0)
    >>> watch.reason(now=2.0)
    'within 0.75 % of the lower bound (tolerance 1 %)'

The clock need not count seconds. A rule counted in seconds ends a search earlier on a
busy machine, where each second does less; counted in work (solves, evaluations), the
search stops at the same point whatever the machine's speed, and only its time limit
depends on it. ``clock`` gives the watch its own measure and ``unit`` names it:

    >>> work = StallWatch(StopRule(min_stall_seconds=4), begin=0, clock=lambda: 0, unit="solves")
    >>> work.observe(100.0, now=30)        # the last improvement, after 30 solves
    >>> work.reason(now=38) is None        # 8 quiet solves, of 38: under a quarter
    True
    >>> work.reason(now=40)
    'no improvement in the last 10 solves of 40'

The incumbent the rule watches is the best value of the whole search, phases before the
current one included (a refinement that only restates the local search's schedule is not
an improvement). The rule never changes which schedule is returned; it only decides when
to stop looking for a better one.

    >>> watch = StallWatch(StopRule(stall_share=0.25, min_stall_seconds=1.0), begin=0.0)
    >>> watch.observe(100.0, now=8.0)      # the last improvement, at 8 s
    >>> watch.observe(99.995, now=10.0)    # 0.005 %: less than the minimum gain
    >>> watch.reason(now=9.0) is None
    True
    >>> watch.reason(now=11.0)
    'no improvement in the last 3.0 s of 11.0 s'
"""
from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["StopRule", "StallWatch", "StallStop", "STALL_SHARE", "MIN_STALL_SECONDS", "LOCAL_MIN_STALL_SECONDS", "EXACT_MIN_STALL_SECONDS",
           "MIN_GAIN", "TOLERANCE"]

#: a search stops after this share of its running time without an improvement
STALL_SHARE = 0.25
#: ... but is always given this many seconds to find the next one
MIN_STALL_SECONDS = 1.0
#: the minimum of the hybrid engine's local search (its own clock, from each start): on
#: the shipped tiny_gpt spec (33 ops, 10 % cap) a 1-s minimum ended each start just before
#: the moves that lower the peak 1.8 % (to the full 60-s search's), a 4-s one found them
LOCAL_MIN_STALL_SECONDS = 4.0
#: the minimum of the hybrid engine's refinement MILP (its own clock): HiGHS finds its
#: incumbents in bursts, seconds apart (the exact MILP on tiny_resnet, 21 ops, measured
#: costs: 0.6 s, 2.6 s, then the proved optimum at 5.5 s), and a MILP that just started
#: should not end on its first quiet second
EXACT_MIN_STALL_SECONDS = 5.0
#: improvements smaller than this (relative) do not reset the clock: the targets are
#: about 1 %, and HiGHS polishes the last microsecond for minutes
MIN_GAIN = 1e-4
#: a best within this share above a proved lower bound is good enough (``tolerance`` option)
TOLERANCE = 0.01


@dataclass(frozen=True)
class StopRule:
    """The tolerances of the stop rule (see the module docstring)."""

    stall_share: float = STALL_SHARE
    min_stall_seconds: float = MIN_STALL_SECONDS  # in the watch's unit (seconds unless it counts work)
    min_gain: float = MIN_GAIN
    tolerance: float = TOLERANCE

    @classmethod
    def from_options(cls, options: dict, min_stall_seconds: float = MIN_STALL_SECONDS) -> "StopRule":
        """The rule a search's ``options`` ask for (``stall_share``, ``min_stall``, by
        default ``min_stall_seconds``, ``tolerance``); ``stall_share=None`` turns the rule
        off, the tolerance included (the search runs to its limit)."""
        share = options.get("stall_share", STALL_SHARE)
        tolerance = options.get("tolerance", TOLERANCE)
        return cls(
            stall_share=float("inf") if share is None else float(share),
            min_stall_seconds=float(options.get("min_stall", min_stall_seconds)),
            tolerance=0.0 if share is None or tolerance is None else float(tolerance),
        )


class StallWatch:
    """One search's best value against the clock (minimisation)."""

    def __init__(self, rule: StopRule, begin: float | None = None, bound: float | None = None, clock=None, unit: str = "s"):
        self.rule = rule
        #: what "now" is when the caller does not say (seconds by default; any count of work)
        self.clock = time.perf_counter if clock is None else clock
        self.unit = unit
        self.begin = self.clock() if begin is None else begin
        self.best: float | None = None
        self.improved_at = self.begin
        #: a lower bound every schedule obeys, when known (the tolerance is measured from it)
        self.bound = bound

    def observe(self, value: float | None, now: float | None = None) -> None:
        """Record a value found (an improvement when lower than the best by the minimum gain)."""
        if value is None:
            return
        now = self.clock() if now is None else now
        if self.best is None or value < self.best - self.rule.min_gain * max(abs(self.best), 1e-12):
            self.improved_at = now
        if self.best is None or value < self.best:
            self.best = value

    def good_enough(self) -> str | None:
        """Why the best is good enough (within the tolerance above the bound), or None."""
        if self.best is None or self.bound is None or self.bound <= 0 or self.rule.tolerance <= 0:
            return None
        above = self.best / self.bound - 1.0
        if above > self.rule.tolerance:
            return None
        return f"within {max(0.0, above):.2%} of the lower bound (tolerance {self.rule.tolerance:.0%})".replace("%", " %")

    def reason(self, now: float | None = None) -> str | None:
        """Why the search should stop now, or None to go on."""
        enough = self.good_enough()
        if enough is not None:
            return enough
        now = self.clock() if now is None else now
        elapsed = now - self.begin
        quiet = now - self.improved_at
        if self.best is not None and quiet >= max(self.rule.min_stall_seconds, self.rule.stall_share * elapsed):
            if self.unit == "s":
                return f"no improvement in the last {quiet:.1f} s of {elapsed:.1f} s"
            return f"no improvement in the last {quiet:g} {self.unit} of {elapsed:g}"
        return None


class StallStop:
    """What a solver's callbacks ask (``is_set()``): stop once the caller's ``stop`` is set
    or ``watch`` says the search has stopped paying; ``reason`` then says why (None while
    it runs, and when the caller stopped it)."""

    def __init__(self, watch: StallWatch, stop=None):
        self.watch, self.stop = watch, stop
        self.reason: str | None = None

    def is_set(self) -> bool:
        if self.stop is not None and self.stop.is_set():
            return True
        if self.reason is None:
            self.reason = self.watch.reason()
        return self.reason is not None
