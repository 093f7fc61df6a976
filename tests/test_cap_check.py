"""A capped schedule that recomputes is timed against eager's step before it is used; one
that measures over its plan has its recomputations charged what they measured and is
re-planned; one still over the cap gives way to store-all, with a warning.

The timing is injected (``measure``): what is tested is the decision and that a verdict
is measured once per schedule and machine, not the machine's speed.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import monetdsl
from monetdsl.errors import CapWarning
from monetdsl.planning import Constraints, schedule_for
from monetdsl.runtime.cap_check import CAP_SLACK, RECHARGE_ROUNDS, recomputations, schedule_holding_cap
from monetdsl.runtime.eager_reference import EagerReference
from monetdsl.search.simulator import simulate
from .runtime_helpers import assert_steps_match_eager


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.fixture(scope="module")
def recomputing():
    torch.manual_seed(0)
    model, x = Cell(), torch.randn(3, 5, 6)
    plan = monetdsl.optimize(model, (x,), method="chen-sqrt", cache_dir=None, profile=False).plan_for(x)
    assert any(stage.recompute for stage in plan.schedule.stages)
    return model, x, plan


def _measured(ratio, calls):
    def measure(model, inputs, trace, schedule, *, optimizer):
        calls.append(schedule)
        return EagerReference(1000.0, 1000.0 * ratio, ratio)
    return measure


def _hold(recomputing, tmp_path, measure, budget=None, found=None, max_overhead=0.05):
    model, x, plan = recomputing
    constraints = Constraints(budget, max_overhead, None, "auto", time_limit=2)
    found = found if found is not None else (plan.schedule, plan.simulation)
    return schedule_holding_cap(model, (x,), plan.trace, plan.spec, constraints, found, 0.10, optimizer="adam",
                                schedule_dir=None, cache_dir=tmp_path, measure=measure, store_all_ratio=1.0)


def test_a_schedule_within_its_cap_is_kept_and_measured_once(recomputing, tmp_path):
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapWarning)
        for _ in range(2):
            schedule, _ = _hold(recomputing, tmp_path, _measured(1.10 * CAP_SLACK, calls))
            assert schedule is recomputing[2].schedule
    assert len(calls) == 1, "the verdict is kept in the measurement store"


def test_a_schedule_over_its_cap_gives_way_to_store_all(recomputing, tmp_path):
    calls = []
    with pytest.warns(CapWarning, match="x2.00 of eager.*keeps every tensor"):
        schedule, simulation = _hold(recomputing, tmp_path, _measured(2.0, calls))
    assert not any(stage.recompute for stage in schedule.stages)
    assert simulation.valid and simulation.overhead == 0
    assert 1 <= len(calls) <= 1 + RECHARGE_ROUNDS, "re-planned a bounded number of times"


def test_recomputation_measured_over_its_plan_is_charged_and_re_planned(recomputing, tmp_path):
    """On a machine where every recomputation costs 5 us more than the plan says (the
    stretch it cuts), the schedule solved for a 10 % cap measures over it; the excess is
    charged to its recomputations, the search re-plans with fewer of them, and that
    schedule measures as planned and is kept: no warning, it replays in the simulator on
    the uncharged costs, and training through it gives eager PyTorch's gradients."""
    model, x, plan = recomputing
    network, cut_us, calls = plan.spec.network, 5.0, []

    def measure(model, inputs, trace, schedule, *, optimizer):
        calls.append(schedule)
        replay = simulate(network, schedule)
        runtime = replay.compute_us + cut_us * recomputations(schedule)
        return EagerReference(replay.baseline_us, runtime, runtime / replay.baseline_us)

    first = schedule_for(plan.spec, Constraints(None, 0.10, None, "auto", time_limit=2))
    assert measure(model, (x,), None, first[0], optimizer="adam").ratio > 1.10 * CAP_SLACK
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapWarning)
        schedule, simulation = _hold(recomputing, tmp_path, measure, found=first, max_overhead=0.10)
    assert len(calls) == 2 and calls[1] is schedule
    assert 0 < recomputations(schedule) < recomputations(first[0])
    assert simulation.valid and simulation.overhead <= 0.10 + 1e-9
    assert simulation.compute_us == pytest.approx(simulate(network, schedule).compute_us + cut_us * recomputations(schedule))
    assert simulate(network, schedule).valid
    optimized = monetdsl.optimize(model, (x,), schedule=schedule)
    reference = copy.deepcopy(model)
    assert_steps_match_eager(optimized, reference, [x])


def test_with_a_budget_the_schedule_stays_and_the_warning_says_what_it_measured(recomputing, tmp_path):
    with pytest.warns(CapWarning, match="kept, as the budget needs it"):
        schedule, _ = _hold(recomputing, tmp_path, _measured(2.0, []), budget=recomputing[2].planned_peak)
    assert schedule is recomputing[2].schedule
