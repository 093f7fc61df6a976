"""A capped schedule that recomputes is timed against eager's step before it is used; one
that measures over the cap gives way to store-all, with a warning.

The timing is injected (``measure``): what is tested is the decision and that a verdict
is measured once per schedule and machine, not the machine's speed.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import monetdsl
from monetdsl.errors import CapWarning
from monetdsl.planning import Constraints
from monetdsl.runtime.cap_check import CAP_SLACK, schedule_holding_cap
from monetdsl.runtime.eager_reference import EagerReference


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


def _hold(recomputing, tmp_path, measure, budget=None):
    model, x, plan = recomputing
    constraints = Constraints(budget, 0.05, None, "auto")
    return schedule_holding_cap(model, (x,), plan.trace, plan.spec, constraints, (plan.schedule, plan.simulation), 0.10,
                                optimizer="adam", schedule_dir=None, cache_dir=tmp_path, measure=measure)


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


def test_with_a_budget_the_schedule_stays_and_the_warning_says_what_it_measured(recomputing, tmp_path):
    with pytest.warns(CapWarning, match="kept, as the budget needs it"):
        schedule, _ = _hold(recomputing, tmp_path, _measured(2.0, []), budget=recomputing[2].planned_peak)
    assert schedule is recomputing[2].schedule
