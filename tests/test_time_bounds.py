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


@pytest.fixture(scope="module")
def layered100():
    spec = layered_spec(50, 0)
    return spec, int(0.8 * solve(spec, "store-all").simulation.peak_bytes)


def _replayed(spec, result) -> int:
    """The result's simulation is the replay of its schedule: its peak."""
    replay = simulate(spec.network, result.schedule)
    assert replay.valid
    assert (replay.peak_bytes, replay.compute_us) == (result.simulation.peak_bytes, result.simulation.compute_us)
    return replay.peak_bytes


@pytest.mark.parametrize("method", ["milp", "checkmate"])
def test_a_milp_whose_limit_ends_before_its_model_is_built_returns_a_replayed_heuristic(layered100, method):
    spec, budget = layered100
    result = solve(spec, method, memory_budget=budget, time_limit=0.05)
    assert result.status == "time_limit"
    assert result.details["model"] == "not built" and "time limit came before the MILP was built" in result.message
    assert result.details["fallback"] in ("eviction", "recompute-all", "chen-sqrt", "chen-greedy", "revolve")
    assert _replayed(spec, result) <= budget


def test_the_hybrid_stopped_by_its_limit_says_so_and_returns_a_replayed_schedule(layered100):
    spec, budget = layered100
    result = solve(spec, "hybrid", memory_budget=budget, time_limit=0.05)
    assert result.status == "feasible"
    assert result.details["stopped"] == "time limit" and "stopped: time limit" in result.message
    assert _replayed(spec, result) <= budget


def test_checkmate_lp_without_time_for_its_lp_says_so(layered100):
    spec, budget = layered100
    result = solve(spec, "checkmate-lp", memory_budget=budget, time_limit=0.05)
    assert result.status == "time_limit" and result.schedule is None
    assert result.message == "checkmate-lp: the time limit came before Checkmate's LP was built"


@pytest.mark.parametrize("method", ["chen-sqrt", "chen-greedy", "revolve", "store-all"])
def test_a_plain_method_past_its_limit_leaves_the_exact_minimum_out_and_says_why(layered100, method):
    spec, budget = layered100
    result = solve(spec, method, memory_budget=budget, time_limit=0.05)
    assert result.status == "infeasible" and not result.min_feasible_budget_exact
    assert result.details["exact_min_budget"] == "not computed: the time limit was spent"
    assert result.min_feasible_budget == _replayed(spec, result) > budget


def test_recompute_all_has_no_search_to_stop(layered100):
    spec, budget = layered100
    result = solve(spec, "recompute-all", memory_budget=budget, time_limit=0.05)
    assert result.status == "feasible" and _replayed(spec, result) <= budget


def test_a_large_model_left_little_time_runs_without_presolve_and_no_second_model():
    from types import SimpleNamespace

    from monetdsl.search.milp.engine import PRESOLVE_ROOM, presolve_fits, room_for_another

    built_in_10s = SimpleNamespace(stats={"build_seconds": 10.0})
    assert presolve_fits(built_in_10s, PRESOLVE_ROOM * 10.0) and not presolve_fits(built_in_10s, 20.0)
    assert not room_for_another(built_in_10s, 20.0) and room_for_another(built_in_10s, 30.0)
    small = SimpleNamespace(stats={"build_seconds": 0.01})
    assert presolve_fits(small, 0.1) and room_for_another(small, 0.3) and not room_for_another(small, 0.1)
