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


@pytest.mark.parametrize("stage", ["decisions", "legality", "gradients", "memory", "in_place", "objective_rows"])
def test_the_model_build_stops_inside_a_stage_whose_run_passes_the_deadline(layered100, stage, monkeypatch):
    """The deadline is checked within each stage's loops, not only between stages: a
    deadline that passes as a stage starts ends the build before that stage finishes."""
    from monetdsl.search.milp import model as milp_model

    spec, budget = layered100
    original = getattr(milp_model._Builder, stage)
    finished = []

    def passing_the_deadline(self, *args, **kwargs):
        self.deadline = float("-inf")
        result = original(self, *args, **kwargs)
        finished.append(stage)
        return result

    monkeypatch.setattr(milp_model._Builder, stage, passing_the_deadline)
    with pytest.raises(milp_model.BuildTimeout):
        milp_model.build_model(spec.network, memory_budget=budget, deadline=float("inf"))
    assert finished == []


def test_a_milp_left_less_time_than_its_setup_needs_answers_with_its_best_start_and_says_why(layered100, monkeypatch):
    """A model that took long to build is not handed to HiGHS with less time left than
    its setup takes (the setup stops for no limit): the best heuristic is the answer,
    replayed, and the message says why."""
    from monetdsl.search.milp import engine

    spec, budget = layered100
    build = engine.build_model

    def slow_to_build(*args, **kwargs):
        model = build(*args, **kwargs)
        model.stats["build_seconds"] = 1e6
        return model

    monkeypatch.setattr(engine, "build_model", slow_to_build)
    result = solve(spec, "checkmate", memory_budget=budget, time_limit=30.0)
    assert result.status == "time_limit"
    assert "HiGHS was not started" in result.message and "best heuristic schedule" in result.message
    assert result.details["solver_not_started"].startswith("HiGHS was not started")
    assert _replayed(spec, result) <= budget


def test_a_run_without_room_for_its_setup_is_not_started():
    from types import SimpleNamespace

    from monetdsl.search.milp.engine import ROOT_ROOM, root_fits

    built_in_10s = SimpleNamespace(stats={"build_seconds": 10.0})
    assert root_fits(built_in_10s, ROOT_ROOM * 10.0) and not root_fits(built_in_10s, ROOT_ROOM * 10.0 - 0.5)
