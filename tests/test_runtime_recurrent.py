"""Recurrent layers (``nn.GRU``, ``nn.LSTM``): captured as their per-step cells, planned,
and trained like eager PyTorch.

A schedule that recomputes (``chen-sqrt``: keep about every square-root-th activation)
must give eager's loss and gradients, and the activations a recurrent layer keeps across
time steps must be what the plan counts (the live probe equals the plan).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import monetdsl


class Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase], layers: int):
        super().__init__()
        self.rnn = kind(6, 8, num_layers=layers, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("kind, layers", [(nn.GRU, 1), (nn.LSTM, 2)])
def test_a_recurrent_model_trains_like_eager_under_recomputation(kind, layers):
    torch.manual_seed(0)
    model = Recurrent(kind, layers)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 5, 6)
    optimized = monetdsl.optimize(model, (x,), method="chen-sqrt", cache_dir=None, profile=False)
    plan = optimized.plan_for(x)
    assert any(stage.recompute for stage in plan.schedule.stages), "chen-sqrt recomputes some cell activations"
    live = monetdsl.measure(optimized, (x,), probe="live")
    assert live.peak == live.planned
    for _ in range(2):
        loss = optimized(x).sum()
        loss.backward()
        expected = reference(x).sum()
        expected.backward()
        torch.testing.assert_close(loss, expected)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        model.zero_grad()
        reference.zero_grad()


@pytest.mark.parametrize("kind, layers", [(nn.GRU, 1), pytest.param(nn.LSTM, 2, marks=pytest.mark.slow)])  # LSTM: 30 s
def test_a_budget_below_store_all_peaks_as_planned(kind, layers):
    """Under a budget that makes the plan recompute, each cell's gradient of its time step
    of the input projection is written into a zero projection-sized gradient, as the plan
    charges it: the live and the allocator peaks equal the plan, the gradients eager's, and
    the runs of cells left to autograd's engine hold no more than the plan (the engine
    forms that gradient through the backward of ``split`` and ``unbind``, whose scratch the
    plan does not charge; an LSTM cell whose backward reads the zero initial state, which
    the schedule recomputes, runs step by step, as autograd's graph would hold it)."""
    torch.manual_seed(0)
    model = Recurrent(kind, layers)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 12, 6)
    full = monetdsl.optimize(model, (x,), method="store-all", cache_dir=None, profile=False).plan_for(x)
    optimized = monetdsl.optimize(model, (x,), budget=int(full.planned_peak * 0.9), cache_dir=None, profile=False)
    plan = optimized.plan_for(x)
    assert any(stage.recompute for stage in plan.schedule.stages)
    assert any(step.part_gradients for step in plan.program.backward.values()), "a cell reads one time step"
    for probe in ("live", "allocator"):
        measured = monetdsl.measure(optimized, (x,), probe=probe)
        assert measured.planned == plan.planned_activation_peak
        assert measured.peak == measured.planned, (probe, measured.summary())
    loss = optimized(x).sum()
    loss.backward()
    reference(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
