"""The zoo trains with schedules exactly as eager PyTorch, and as the simulator planned.

Models: a CNN with batch norm, max-pool and dropout; a residual net; a UNet-like net
with a concatenation and a transposed convolution; a GPT with layer norm, GELU,
attention and dropout. Schedules: PyTorch's own implementations with everything kept,
nothing kept and Chen's checkpoints (bit-exact with eager, batch-norm statistics
included), and solved schedules from the store-all peak down to the smallest peak any
method reaches (the cheapest implementations, compared within float32 rounding).
"""
from __future__ import annotations

import pytest
import torch

import monetdsl
from monetdsl.models import SmallCNN, TinyResNet, TinyUNet, tiny_gpt
from monetdsl.runtime.plan import trace_for_runtime
from monetdsl.search import solve
from monetdsl.search.simulator import simulate
from monetdsl.search.baselines import chen_sqrt_checkpoints
from .runtime_helpers import budget_ladder, Reduced, eager_step, first_impls, measured_step_peaks, patch_dropout, schedule_with, twins, widest_impls

ZOO = {
    "cnn": (SmallCNN, lambda: torch.randn(8, 3, 32, 32)),
    "resnet": (TinyResNet, lambda: torch.randn(4, 3, 16, 16)),
    "unet": (TinyUNet, lambda: torch.randn(2, 3, 16, 16)),
    "gpt": (tiny_gpt, lambda: torch.randint(0, 512, (4, 32))),
}
_TRACED: dict = {}


# the attention and residual models plan and run slowest: test_runtime_training trains
# both against eager in every suite run, these ladders run with -m slow
SLOW_ZOO = ("gpt", "resnet")


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW_ZOO else n for n in sorted(ZOO)])
def zoo(request):
    if request.param not in _TRACED:
        factory, make_input = ZOO[request.param]
        model, reference = twins(factory)
        torch.manual_seed(2)
        x = make_input()
        _TRACED[request.param] = (request.param, model, reference, x, trace_for_runtime(model, [x], optimizer="adam"))
    return _TRACED[request.param]


def _optimized(model, x, trace, schedule, observe=None):
    optimized = monetdsl.optimize(model, schedule=schedule)
    optimized._observe = observe
    optimized.plan_for(x, trace=trace)
    return optimized


@pytest.mark.parametrize("keep", ["all", "none", "chen"])
def test_pytorch_implementations_are_exact(zoo, keep):
    name, model, reference, x, trace = zoo
    network = trace.spec.network
    if keep == "chen":
        schedule = schedule_with(trace.spec, first_impls(network), keep=set(chen_sqrt_checkpoints(network)), promote="needed")
    else:
        schedule = schedule_with(trace.spec, first_impls(network), keep=keep)
    patch_dropout(reference, {})
    (out1, grads1) = eager_step(_optimized(model, x, trace, schedule), [x], 11)
    (out2, grads2) = eager_step(reference, [x], 11)
    assert torch.equal(out1, out2)
    assert grads1.keys() == grads2.keys() and all(torch.equal(grads1[n], grads2[n]) for n in grads2)
    for (n1, b1), (n2, b2) in zip(model.named_buffers(), reference.named_buffers()):
        assert n1 == n2 and torch.equal(b1, b2), n1  # running statistics updated exactly once


def test_solved_schedules_down_to_the_minimum_budget(zoo):
    """Each schedule: gradients as eager's, the executor's live tensors after every step
    exactly the simulator's, and the measured peak (live tensor bytes) as planned."""
    name, model, reference, x, trace = zoo
    network = trace.spec.network
    for budget in budget_ladder(trace.spec):
        result = solve(trace.spec, memory_budget=budget, time_limit=4, options={"kicks": 3, "refine": False})
        assert result.success, result.message
        simulation = result.simulation
        live = []

        def observe(planned, env):
            live.append(sum(network.tensors[n].storage_bytes for n in env if not network.tensors[n].is_fixed))

        optimized = _optimized(model, x, trace, result.schedule, observe)
        patch_dropout(reference, result.schedule.impls)
        (out1, grads1), (out2, grads2) = eager_step(optimized, [x], 3), eager_step(reference, [x], 3)
        torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-6)
        scale = max(g.abs().max().item() for g in grads2.values())
        for n in grads2:
            torch.testing.assert_close(grads1[n], grads2[n], rtol=1e-4, atol=1e-5 * scale, msg=n)
        assert live == [step.live_after for step in simulation.steps]


_REDUCED: dict = {}


def _reduced(zoo):
    """The zoo model with a fixed linear loss inside (the whole step planned), traced once."""
    name, model, reference, x, _ = zoo
    if name not in _REDUCED:
        with torch.no_grad():
            shape = tuple(model(x).shape)
        reduced = Reduced(model, shape)
        _REDUCED[name] = (reduced, trace_for_runtime(reduced, [x], optimizer="adam"))
    return _REDUCED[name]


def test_measured_peak_is_the_planned_peak(zoo):
    """With the loss inside the model the whole step is planned: the measured peak of
    live tensor bytes is within 2 % of the simulator's, from store-all to the minimum.

    One over-count of the plan is known: a backward step that passes its incoming
    gradient on as an input's gradient (a residual add: PyTorch returns the same tensor)
    allocates nothing, while the memory model counts a new gradient, alive until its last
    reader. The measured peak may be lower by at most those bytes (the trace records them
    per step), never higher."""
    name, model, reference, x, _ = zoo
    reduced, trace = _reduced(zoo)
    aliased = trace.built.workspace.aliased
    for budget in budget_ladder(trace.spec):
        result = solve(trace.spec, memory_budget=budget, time_limit=4, options={"kicks": 3, "refine": False})
        optimized = monetdsl.optimize(reduced, schedule=result.schedule)
        optimized.plan_for(x, trace=trace)
        measured = monetdsl.measure(optimized, x, probe="live", warmup=0)
        assert measured.planned == result.simulation.peak_bytes - result.simulation.fixed_bytes
        passed_on = sum(aliased.get((s.op, s.impl, s.kind), 0) for s in result.simulation.steps if s.kind == "backward")
        peak = measured.peaks[0]
        assert measured.planned * 0.98 - passed_on <= peak <= measured.planned * 1.02, (name, budget, passed_on, measured.summary())


def test_every_step_peaks_as_planned(zoo):
    """Every step's own peak of live tensor bytes (above the bytes live when it starts) is
    the simulator's (its peak above its live bytes: new outputs plus the measured workspace),
    under PyTorch's own implementations with everything kept or nothing kept and under
    hybrid schedules near the smallest budget, where schedules peak inside backward steps.
    The one exception is exact and known in advance: a step whose outputs are partly not
    new storages (a gradient that is the incoming one) allocates that much less."""
    name, model, reference, x, _ = zoo
    reduced, trace = _reduced(zoo)
    spec, network = trace.spec, trace.spec.network
    aliased = trace.built.workspace.aliased
    smallest = min(solve(spec, m).simulation.peak_bytes for m in ("recompute-all", "chen-sqrt"))
    schedules = [schedule_with(spec, first_impls(network), keep=keep) for keep in ("all", "none")]
    schedules.append(schedule_with(spec, widest_impls(network), keep="all"))  # each model's steps with a workspace
    for budget in (smallest, smallest + (smallest - network.fixed_bytes) // 10):
        result = solve(spec, "hybrid", memory_budget=budget, time_limit=4, options={"kicks": 3, "refine": False})
        if result.success:
            schedules.append(result.schedule)
    assert len(schedules) >= 4, name
    with_workspace = 0  # steps whose peak includes a workspace: the property is not vacuous
    for schedule in schedules:
        simulation = simulate(network, schedule)
        optimized = monetdsl.optimize(reduced, schedule=schedule)
        optimized.plan_for(x, trace=trace)
        observed = measured_step_peaks(optimized, x, network)
        assert len(observed.peaks) == len(simulation.steps)
        for step, measured in zip(simulation.steps, observed.increments):
            planned = step.peak - simulation.fixed_bytes - step.live_before
            fewer = aliased.get((step.op, step.impl, step.kind), 0)
            assert measured == planned - fewer, (name, step.describe(), measured, planned, fewer)
            with_workspace += network.op(step.op).impl(step.impl).workspace > 0
    assert with_workspace > 0, name
