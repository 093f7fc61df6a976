"""Searches stop at their time limit, and say what they know when they stop.

A 400-node Checkmate-format graph (200 forward ops, seeded): Chen's greedy checkpointing
finds nothing to checkpoint at 0.8x the store-all peak, and the exact minimum budget
over all schedules needs a MILP whose model alone takes longer to build than the limit.
The answer is then the least peak found and a proved lower bound, said as such. The
wall-clock figures live in benchmarks/monet_table.py's companion (no timed asserts here).
"""
from __future__ import annotations

import pytest

from monetdsl.search.simulator import simulate
from monetdsl.search.solve import solve
from monetdsl.synth import layered_spec


@pytest.fixture(scope="module")
def layered400():
    spec = layered_spec(200, 0)
    return spec, solve(spec, "store-all").simulation.peak_bytes


def test_a_heuristic_that_misses_the_budget_reports_a_best_found_minimum_and_a_bound(layered400):
    spec, store = layered400
    result = solve(spec, "chen-greedy", memory_budget=int(0.8 * store), time_limit=1.0)
    assert result.status == "infeasible"
    assert not result.min_feasible_budget_exact
    assert "not proved within the time limit" in result.details["exact_min_budget"]
    assert "best found" in result.message and "(proved)" in result.message
    lower = result.details["min_budget_lower_bound"]
    assert 0 < lower <= result.min_feasible_budget < result.details["method_min_budget"]


def test_the_milp_past_its_time_limit_while_building_returns_the_best_heuristic(layered400):
    spec, store = layered400
    result = solve(spec, "milp", memory_budget=int(0.8 * store), time_limit=1.0)
    assert result.status in ("time_limit", "infeasible")
    assert result.details["model"] == "not built"
    if result.schedule is not None:
        replay = simulate(spec.network, result.schedule)
        assert replay.valid
        if result.status == "time_limit":
            assert replay.peak_bytes <= int(0.8 * store)
