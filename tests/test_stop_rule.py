"""Searches stop when they are done: the stall rule, and the hybrid engine stopped early
never returning a schedule worse than the heuristics it compares with."""
from __future__ import annotations

import pytest

from monetdsl.grammar.parser import parse_spec
from monetdsl.search.solve import HEURISTICS, solve
from monetdsl.search.stopping import StallStop, StallWatch, StopRule
from monetdsl.synth import resnet_stack, transformer_stack


def test_the_stall_clock_grows_with_the_time_spent_and_ignores_tiny_gains():
    watch = StallWatch(StopRule(stall_share=0.5, min_stall_seconds=2.0, min_gain=0.01), begin=0.0)
    assert watch.reason(now=100.0) is None  # nothing found yet: nothing to stop with
    watch.observe(50.0, now=1.0)
    assert watch.reason(now=2.9) is None  # the minimum stall
    assert watch.reason(now=3.0) is not None
    watch.observe(40.0, now=30.0)  # a real improvement resets the clock
    assert watch.reason(now=59.0) is None  # 29 s quiet of 59 s: under half
    watch.observe(39.9, now=59.0)  # 0.25 %: under the minimum gain, the clock runs on
    assert watch.best == 39.9
    assert watch.reason(now=60.0) == "no improvement in the last 30.0 s of 60.0 s"
    assert StallWatch(StopRule.from_options({"stall_share": None}), begin=0.0).rule.stall_share == float("inf")


def _spec(kind: str, n: int):
    return parse_spec((resnet_stack if kind == "resnet" else transformer_stack)(n), path=f"{kind}{n}.monet")


def _between(spec, fraction: float) -> int:
    high = solve(spec, "store-all").simulation.peak_bytes
    low = solve(spec, "recompute-all").simulation.peak_bytes
    return int(low + fraction * (high - low))


@pytest.mark.parametrize("which, fraction", [(("resnet", 4), 0.3), (("resnet", 4), 0.7), (("transformer", 2), 0.4)])
def test_the_hybrid_stopped_at_once_is_never_worse_than_a_heuristic(which, fraction):
    """With a stall rule that stops every search at its first report, the engine still
    returns the best of what it composed and the heuristics."""
    spec = _spec(*which)
    budget = _between(spec, fraction)
    eager = {"target_ops": 7, "stall_share": 0.0, "min_stall": 0.0}
    result = solve(spec, "hybrid", memory_budget=budget, time_limit=20, options=eager)
    assert result.success and result.simulation.peak_bytes <= budget
    assert result.details["stopped"] and "stopped:" in result.message
    for name in HEURISTICS:
        other = solve(spec, name, memory_budget=budget, exact_min_budget=False)
        if other.success:
            assert result.simulation.compute_us <= other.simulation.compute_us + 1e-6, name


def test_the_hybrid_minimum_memory_stopped_early_is_never_above_a_heuristic():
    spec = _spec("resnet", 4)
    cap = 0.2
    result = solve(spec, "hybrid", max_overhead=cap, time_limit=20, options={"target_ops": 7, "stall_share": 0.0, "min_stall": 0.0})
    assert result.success and result.simulation.overhead <= cap + 1e-9
    for name in HEURISTICS:
        other = solve(spec, name, max_overhead=cap, exact_min_budget=False)
        if other.success:
            assert result.simulation.peak_bytes <= other.simulation.peak_bytes, name


@pytest.mark.slow  # a whole search to its natural end: 30-40 s on a loaded 2-core machine
def test_the_hybrid_ends_before_a_generous_limit_and_says_why():
    spec = _spec("resnet", 3)
    result = solve(spec, "hybrid", memory_budget=_between(spec, 0.4), time_limit=600, options={"target_ops": 7})
    assert result.success
    assert result.details["stopped"] != "time limit"
    assert f"stopped: {result.details['stopped']}" in result.message


def test_the_local_search_stops_paying_on_its_own_clock():
    """Under a stop rule the local search ends once its own best has not improved for the
    rule's share of its running time, never worse than its start and saying why; with the
    rule off it runs to its other limits."""
    from monetdsl.search.impl_choice import cheapest_impls, no_recompute_compute_us
    from monetdsl.search.local_search import improve
    from monetdsl.search.simulator import simulate
    from monetdsl.validate import resolve_constraints

    spec = _spec("resnet", 2)
    network = spec.network
    constraints = resolve_constraints(network, spec.constraints, memory_budget=solve(spec, "store-all").simulation.peak_bytes)
    baseline = no_recompute_compute_us(network, cheapest_impls(network))
    start = solve(spec, "recompute-all")
    # a tiny minimum stall: the search ends at its first quiet spell, long before the limit
    quick = improve(network, start.schedule, constraints, baseline_us=baseline, time_limit=600.0,
                    rule=StopRule(stall_share=0.25, min_stall_seconds=0.05))
    assert quick.stalled is not None and quick.stalled.startswith("no improvement")
    replay = simulate(network, quick.schedule, constraints=constraints, baseline_us=baseline)
    assert replay.ok and replay.compute_us == quick.simulation.compute_us < start.simulation.compute_us
    full = improve(network, start.schedule, constraints, baseline_us=baseline, time_limit=600.0,
                   rule=StopRule.from_options({"stall_share": None}), max_kicks=3)
    assert full.stalled is None and full.kicks <= 3


def test_stall_stop_says_why_it_stops():
    watch = StallWatch(StopRule(stall_share=0.25, min_stall_seconds=1.0), begin=0.0)
    watch.observe(10.0, now=0.0)  # long ago: stalled by now
    stalled = StallStop(watch)
    assert stalled.is_set() and stalled.reason.startswith("no improvement")

    class Asked:
        def is_set(self):
            return True

    fresh = StallWatch(StopRule(), begin=None)
    asked = StallStop(fresh, Asked())
    assert asked.is_set() and asked.reason is None  # the caller stopped it, not the rule
    assert not StallStop(StallWatch(StopRule())).is_set()  # nothing found yet: goes on


def test_the_milp_second_phase_stops_paying_and_keeps_the_least_peak():
    """The memory objective's second phase (the fastest schedule at the least peak) runs
    under the stall rule: stopped at its first report it keeps the first phase's peak."""
    spec = _spec("resnet", 1)
    eager = solve(spec, "milp", max_overhead=0.2, time_limit=60, options={"stall_share": 0.0, "min_stall": 0.0})
    assert eager.status == "optimal" and eager.simulation.peak_bytes == eager.min_feasible_budget
    assert eager.details.get("polish_status") == "optimal" or eager.details["polish_stopped"].startswith("no improvement")


def test_a_best_within_the_tolerance_of_the_lower_bound_ends_the_hybrid():
    """A schedule proved within the tolerance of a lower bound is good enough: the hybrid
    stops there, says so, and its result is that close to the bound and no worse than
    any heuristic; the full search (``stall_share=None``) ignores the tolerance."""
    assert StopRule.from_options({}).tolerance == 0.01
    assert StopRule.from_options({"stall_share": None}).tolerance == 0.0
    assert StopRule.from_options({"tolerance": None}).tolerance == 0.0
    spec = _spec("resnet", 4)
    cap = 0.2
    tolerance = 3.0  # wide enough for the first schedule composed (the simple bound is far below the optimum here)
    result = solve(spec, "hybrid", max_overhead=cap, time_limit=60, options={"target_ops": 7, "tolerance": tolerance})
    assert result.success and result.simulation.overhead <= cap + 1e-9
    assert "of the lower bound" in result.details["stopped"] and f"stopped: {result.details['stopped']}" in result.message
    assert result.simulation.peak_bytes <= (1 + tolerance) * result.details["simple_lower_bound"]
    for name in HEURISTICS:
        other = solve(spec, name, max_overhead=cap, exact_min_budget=False)
        if other.success:
            assert result.simulation.peak_bytes <= other.simulation.peak_bytes, name


def test_without_a_time_limit_the_hybrid_searches_a_share_sized_to_the_network():
    """No time limit given: a share of 0.1 s per forward op (at least 3 s, at most 60 s);
    a limit the caller gives, the stall rule off (a reference search), or a network the
    refinement MILP covers keeps its own."""
    from monetdsl.search.hybrid.engine import REFINE_MAX_FORWARD_OPS
    from monetdsl.search.hybrid.time_share import MIN_SIZED_SECONDS, SECONDS_PER_FORWARD_OP, sized_time_limit

    network = _spec("resnet", 8).network
    ops = len(network.forward_ops)
    assert ops > REFINE_MAX_FORWARD_OPS
    sized = max(MIN_SIZED_SECONDS, SECONDS_PER_FORWARD_OP * ops)
    assert sized < 60.0
    assert sized_time_limit(network, None, {}) == (sized, f"the time share sized to the network ({sized:.1f} s for {ops} forward ops)")
    assert sized_time_limit(network, None, {}, refines=True) == (60.0, None)
    assert sized_time_limit(network, None, {"seconds_per_op": 1.0})[0] == min(60.0, max(MIN_SIZED_SECONDS, float(ops)))
    assert sized_time_limit(network, None, {"seconds_per_op": 100.0}) == (60.0, None)
    assert sized_time_limit(network, 7.0, {}) == (7.0, None)
    assert sized_time_limit(network, None, {"stall_share": None}) == (60.0, None)
    assert sized_time_limit(network, None, {"seconds_per_op": None}) == (60.0, None)
    spec, cap = _spec("resnet", 8), 0.2
    result = solve(spec, "hybrid", max_overhead=cap, options={"target_ops": 7})  # no time limit: the sized share
    assert result.success and result.details["time_limit"] == sized
    for name in HEURISTICS:
        other = solve(spec, name, max_overhead=cap, exact_min_budget=False)
        if other.success:
            assert result.simulation.peak_bytes <= other.simulation.peak_bytes, name


def test_a_short_share_skips_the_restricted_search_when_the_menus_are_out_of_reach():
    """Under a share sized to the network that the block menus cannot fit, the search
    restricted to the first implementations is skipped (the full one skips its blocks for
    the eviction's schedule), says so, and the result is still no worse than any heuristic."""
    from dataclasses import replace

    from monetdsl.search.hybrid.engine import block_kinds, menus_out_of_reach
    from monetdsl.search.hybrid.portfolio import restricted_first
    from monetdsl.search.impl_choice import cheapest_impls, no_recompute_compute_us
    from monetdsl.search.outcome import SearchContext
    from monetdsl.search.restrict import has_alternatives
    from monetdsl.validate import resolve_constraints

    spec = _spec("transformer", 2)
    network, cap = spec.network, 0.2
    constraints = resolve_constraints(network, spec.constraints, max_overhead=cap)
    options = {"target_ops": 7}
    assert has_alternatives(network, constraints.allowed_impls) and menus_out_of_reach(block_kinds(network, constraints, options), 1.5)
    ctx = SearchContext("t2.monet", spec.fingerprint, no_recompute_compute_us(network, cheapest_impls(network)), "memory", 1.5, options)
    short = restricted_first(network, constraints, ctx, short=True)
    assert "out of reach" in short.details["restricted"]["skipped"]
    given = restricted_first(network, constraints, replace(ctx, time_limit=1.5))  # the caller's limit: the portfolio as before
    assert "skipped" not in given.details["restricted"]
    for name in HEURISTICS:
        other = solve(spec, name, max_overhead=cap, exact_min_budget=False)
        if other.success:
            assert short.simulation.peak_bytes <= other.simulation.peak_bytes, name
