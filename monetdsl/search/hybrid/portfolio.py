"""More choice is never worse: the hybrid method's portfolio around :func:`.engine.run_hybrid`.

With more implementations to choose from, every block MILP is larger and fewer finish in
the same time; on ResNet-50 the full search alone ended up to 14 % above the same search
restricted to PyTorch's implementations. So the search restricted to each op's first
implementation (:mod:`..restrict`) runs first, within a quarter of the time and without
the local search, and the full search starts from its block options and its schedule: it
ends no worse than the restricted one did (its block options seed the full search's
menus even when it found no schedule of its own). When the restricted search's schedule is
within the stop rule's tolerance of a lower bound on the full network
(:mod:`..stopping`), no schedule is more than that better and the full search is skipped.
"""
from __future__ import annotations

import time
from dataclasses import replace

from ...errors import SpecError
from ...ir import Network
from ...validate import ResolvedConstraints
from ..milp.engine import DEFAULT_TIME_LIMIT
from ..outcome import SearchContext
from ..restrict import first_impl_pins, has_alternatives
from ..stopping import StallWatch, StopRule
from .engine import HybridRun, block_kinds, menus_out_of_reach, run_hybrid, simple_lower_bound

__all__ = ["restricted_first", "RESTRICTED_SHARE"]

#: share of the time the search restricted to the first implementations gets
#: (``options={"restricted_share": 0}`` skips it)
RESTRICTED_SHARE = 0.25


def restricted_first(network: Network, constraints: ResolvedConstraints, ctx: SearchContext, short: bool = False) -> HybridRun:
    """The search restricted to each op's first implementation, then the full search
    started from what it found (networks without a choice run the full search only).

    ``short``: the time limit is a share sized to the network (:mod:`.time_share`), not
    the caller's; when the full search's block menus are out of its reach (it then skips
    its blocks for the eviction's schedule when that fits), the restricted search, whose
    purpose is to seed those menus, is skipped too: its own menus would take several
    times its share (24 kinds of block on ResNet-50, 12 s or more against 4 s)."""
    allowed = constraints.allowed_impls
    share = float(ctx.options.get("restricted_share", RESTRICTED_SHARE))
    if share <= 0 or not has_alternatives(network, allowed):
        return run_hybrid(network, constraints, ctx)
    begin = time.perf_counter()
    limit = ctx.time_limit or DEFAULT_TIME_LIMIT
    if short:
        kinds = block_kinds(network, constraints, ctx.options)
        if menus_out_of_reach(kinds, limit):
            full = run_hybrid(network, constraints, ctx)
            full.details["restricted"] = {"skipped": f"{kinds} kinds of block: the menus are out of reach of {limit:.1f} s"}
            return full
    narrow = replace(constraints, allowed_impls={**allowed, **first_impl_pins(network, allowed)})
    try:
        # no local search here: the full search polishes the best start it has, this
        # one's schedule included, and the time goes to its block menus instead
        inner = replace(ctx, time_limit=share * limit, options={**ctx.options, "polish": False})
        first = run_hybrid(network, narrow, inner, may_skip_blocks=False)  # its block options seed the full search
    except SpecError as exc:  # e.g. a first implementation that overwrites a block's input
        first, note = None, exc.diagnostics[0].message
    if first is not None and ctx.stopped:  # asked to stop: the restricted search's best is the answer
        first.details["restricted"] = {"stopped": "before the full search"}
        return first
    enough = _good_enough(network, constraints, ctx, first)
    if enough is not None:  # no schedule is more than the tolerance better: the full search is not needed
        first.details["restricted"] = {"stopped": f"before the full search: {enough}"}
        first.message = first.message.replace(f"stopped: {first.details.get('stopped')}", f"stopped: {enough}")
        first.details["stopped"] = enough
        return first
    left = limit - (time.perf_counter() - begin)
    if first is not None and first.schedule is not None and left < 2 * first.details.get("setup_seconds", 0.0):
        # the full search would spend what is left before its first menu (its heuristics,
        # eviction and blocks took the restricted one this long) and run past the limit:
        # on a busy machine ResNet-50's restricted search overran its quarter of 19 s to 11 s
        first.details["restricted"] = {"stopped": f"before the full search: {left:.1f} s left, its setup took"
                                                  f" {first.details['setup_seconds']:.1f} s in the restricted search"}
        return first
    left = max(0.5, left)
    full = run_hybrid(network, constraints, replace(ctx, time_limit=left), prior=first, reach_limit=limit)
    if first is None:
        full.details["restricted"] = {"skipped": note}
    else:
        full.details["restricted"] = {
            "seconds": first.details.get("seconds"), "origin": first.origin,
            "peak": None if first.simulation is None else first.simulation.peak_bytes,
            "compute": None if first.simulation is None else first.simulation.compute_us,
        }
    return full


def _good_enough(network: Network, constraints: ResolvedConstraints, ctx: SearchContext, run: HybridRun | None) -> str | None:
    """Why ``run``'s schedule is good enough for the whole network (within the stop rule's
    tolerance of a lower bound on every implementation), or None."""
    if run is None or run.simulation is None or not run.simulation.ok or StopRule.from_options(ctx.options).tolerance <= 0:
        return None
    watch = StallWatch(StopRule.from_options(ctx.options), bound=simple_lower_bound(network, constraints, ctx, cheap=True))
    watch.observe(float(run.simulation.peak_bytes) if ctx.objective == "memory" else run.simulation.compute_us)
    return watch.good_enough()
