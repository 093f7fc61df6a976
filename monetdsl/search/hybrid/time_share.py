"""How long the hybrid engine searches when the caller gave no time limit: a share sized
to the network, not the whole default minute.

The phases of the hybrid engine each take a share of its time limit (the restricted
search, the block menus, the local search), so the limit sets how long the whole search
runs even when the stop rule (:mod:`..stopping`) would let it end sooner: the menus'
completion and the local search keep finding improvements of a few hundredths of a
percent for most of a minute. Those are far below the 1 % the plans are judged by. On
the costed graphs of a ResNet-18-like model (68 forward ops) and of ResNet-50 (174), the
schedules found in a tenth of a second per forward op planned peaks 0.3 % and 0.4-0.6 %
above a full 60-s search's (1.7 % on another costing of the first; the eviction start
does most of the work), in a fifth of the time, so without an explicit ``time_limit`` the
engine gets :data:`SECONDS_PER_FORWARD_OP` per forward op, at least
:data:`MIN_SIZED_SECONDS` and at most :data:`~..milp.engine.DEFAULT_TIME_LIMIT`. The
minimum is short: on the ResNet-18-like graph the phases end on their own after about
5 s of their 6.8 s (every phase done; planned peaks 185.8 MiB, against 185.3-185.8 MiB
in 10 s, 185.8-186.0 MiB in 3.4 s and 184.6 MiB in the minute: one costing, two runs
each, a loaded machine), so a graph of 41-99 ops no longer waits for a 10-s floor.

Networks small enough for the engine's refinement MILP (up to 40 forward ops) keep the
default minute: there the MILP, warm-started, finds what the phases before it miss, and
it stops on its own once it proves its gap or stalls. On the costed graph of a small GPT
(31 forward ops, measured costs) 10 s ended 2.6 % above the planned peak of a full
60-s search, 20 s 1.1 %.

A time limit the caller gives is used as it is (an upper bound, the stop rule ends the
search sooner when it stops paying); so is the default minute when the stop rule is off
(``stall_share=None``: a reference search), or with ``options={"seconds_per_op": None}``.
"""
from __future__ import annotations

from ...ir import Network
from ..milp.engine import DEFAULT_TIME_LIMIT

__all__ = ["SECONDS_PER_FORWARD_OP", "MIN_SIZED_SECONDS", "DEFAULT_TIME_LIMIT", "sized_time_limit"]

#: seconds of search per forward op when no time limit was given (``seconds_per_op`` option)
SECONDS_PER_FORWARD_OP = 0.1
#: ... but at least this many (the eviction start and one local-search start)
MIN_SIZED_SECONDS = 3.0


def sized_time_limit(network: Network, time_limit: float | None, options: dict, refines: bool = False) -> tuple[float, str | None]:
    """``(seconds, why)``: the hybrid engine's time limit, and, when it was sized to the
    network rather than given, a phrase saying so (for the result's stop reason).

    ``refines``: the engine will refine its schedule with the whole network's MILP (small
    networks); such a search keeps the default minute, which the stop rule ends when the
    MILP proves its gap or stalls."""
    if time_limit is not None:
        return float(time_limit), None
    if refines:
        return DEFAULT_TIME_LIMIT, None
    per_op = options.get("seconds_per_op", SECONDS_PER_FORWARD_OP)
    if per_op is None or per_op <= 0 or options.get("stall_share", 0.0) is None:
        return DEFAULT_TIME_LIMIT, None
    ops = len(network.forward_ops)
    seconds = min(DEFAULT_TIME_LIMIT, max(MIN_SIZED_SECONDS, float(per_op) * ops))
    if seconds >= DEFAULT_TIME_LIMIT:
        return DEFAULT_TIME_LIMIT, None
    return seconds, f"the time share sized to the network ({seconds:.1f} s for {ops} forward ops)"
