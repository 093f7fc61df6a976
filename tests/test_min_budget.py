"""The minimum budget an infeasible solve reports is a budget that works when passed back.

It is the peak of a schedule the simulator has replayed (exact, or the best found with the
proved lower bound beside it); the searches are time-limited, so the schedule is kept for
the process's next search of the graph (``monetdsl.search.known``)."""
from __future__ import annotations

import pytest
import torch

import monetdsl
from monetdsl.errors import SolveError
from monetdsl.grammar.parser import parse_spec
from monetdsl.search import known
from monetdsl.search.simulator import simulate
from monetdsl.search.solve import solve
from monetdsl.synth import random_spec, resnet_stack
from monetdsl.units import human_bytes
from monetdsl.validate import resolve_constraints


def _graph(which: str):
    if which == "random-18":
        # one block for the hybrid, so the joint MILP: before the fix it reported 2,068 B
        # (336 B below every heuristic) and then found no schedule at 2,068 B
        return random_spec(11, forward_ops=18), 3
    return parse_spec(resnet_stack(3, batch=2, channels=8, side=8), path="resnet3.monet"), 4  # three blocks, the chain DP


@pytest.mark.parametrize("which", ["random-18", pytest.param("resnet-3", marks=pytest.mark.slow)])
def test_infeasible_budget_reports_a_minimum_that_solves_when_passed_back(which):
    spec, limit = _graph(which)
    assert len(spec.network.forward_ops) > 16
    known.forget()  # nothing from earlier tests: this solve's own report must be enough
    low = solve(spec, "auto", memory_budget=1, time_limit=limit)
    assert low.details["chosen"] == "hybrid" and low.status == "infeasible" and not low.success
    budget = low.min_feasible_budget
    assert budget is not None and budget > 1
    # the number is the replayed peak of the schedule returned with it
    cap_only = resolve_constraints(spec.network, spec.constraints)
    replay = simulate(spec.network, low.schedule, constraints=cap_only)
    assert replay.ok and replay.peak_bytes == budget == low.simulation.peak_bytes
    if low.min_feasible_budget_exact:
        assert f"exactly {human_bytes(budget)} ({budget} B)" in low.message
    else:
        assert "was not proved" in low.message and f"({budget} B; pass it as the budget, e.g. '{budget}B')" in low.message
        assert low.details["min_budget_lower_bound"] <= budget
    back = solve(spec, "auto", memory_budget=budget, time_limit=limit)
    assert back.success and back.simulation.ok and back.simulation.peak_bytes <= budget
    assert back.details["chosen"] == "hybrid"


class _Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                          torch.nn.Linear(64, 4))

    def forward(self, x):
        return self.layers(x)


def test_optimize_takes_a_time_limit_and_its_reported_minimum_works():
    torch.manual_seed(0)
    model, x = _Chain(), torch.randn(32, 16)
    with pytest.raises(SolveError) as info:
        monetdsl.optimize(model, x, budget=1, time_limit=2)
    error = info.value
    assert error.min_feasible_budget is not None and "min_feasible_budget_exact" in error.details
    fast = monetdsl.optimize(model, x, budget=error.min_feasible_budget, time_limit=2)
    assert fast.plans[0].planned_peak <= error.min_feasible_budget
    fast(x).sum().backward()
    for bad in (0, -1.0, "5s", True):
        with pytest.raises(monetdsl.MonetError, match="time_limit"):
            monetdsl.optimize(model, x, budget="1MiB", time_limit=bad)
