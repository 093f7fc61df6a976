"""Stretches: stored ops with PyTorch's own implementations run under autograd, their
backward one call into the engine (``monetdsl/runtime/stretches.py``).

What must hold: gradients, outputs and buffers equal eager's bit for bit; the measured peak
stays the plan's (autograd saves only what the plan keeps, the engine holds no gradient the
plan does not); an observer still sees every step; an op whose graph would save more than
its backward implementations read stays out.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

import monetdsl
from monetdsl.lowering.autograd_saves import saves_only
from monetdsl.models import SmallCNN, tiny_gpt
from monetdsl.models.small import TinyUNet
from monetdsl.runtime.executor import plan_steps
from monetdsl.runtime.plan import trace_for_runtime
from monetdsl.search import solve
from monetdsl.search.baselines import chen_sqrt_checkpoints
from .runtime_helpers import Reduced, budget_ladder, eager_step, first_impls, schedule_with, twins


def _optimized(model, x, trace, schedule, observe=None):
    optimized = monetdsl.optimize(model, schedule=schedule)
    optimized._observe = observe
    return optimized, optimized.plan_for(x, trace=trace)


def _assert_same_step(optimized, reference, x, seed):
    out1, grads1 = eager_step(optimized, [x], seed)
    out2, grads2 = eager_step(reference, [x], seed)
    assert torch.equal(out1, out2)
    assert grads1.keys() == grads2.keys()
    for name in grads2:
        assert torch.equal(grads1[name], grads2[name]), name


class _MLP(nn.Module):
    """Linear layers, layer norms, GELU and dropout: every op autograd's own."""

    def __init__(self, width: int = 32, blocks: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Dropout(0.1))
                                    for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class _Scales(nn.Module):
    """Scales, layer norms, GELU and dropout: ops with one backward op each, so autograd's
    node for each makes what the plan's step makes, and store-all is one graph."""

    def __init__(self, width: int = 32, blocks: int = 3):
        super().__init__()
        self.scales = nn.ParameterList(nn.Parameter(torch.randn(width)) for _ in range(blocks))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        for scale, norm in zip(self.scales, self.norms):
            x = self.drop(torch.nn.functional.gelu(norm(x * scale)))
        return x


@pytest.fixture(scope="module")
def mlp():
    model, reference = twins(_MLP)
    torch.manual_seed(3)
    x = torch.randn(16, 32)
    return model, reference, x, trace_for_runtime(model, [x], optimizer="adam")


def test_store_all_of_pytorch_implementations_is_one_autograd_graph():
    model, reference = twins(_Scales)
    torch.manual_seed(3)
    x = torch.randn(16, 32)
    trace = trace_for_runtime(model, [x], optimizer="adam")
    network = trace.spec.network
    optimized, plan = _optimized(model, x, trace, schedule_with(trace.spec, first_impls(network), keep="all"))
    assert plan.steps.whole_autograd
    (stretch,) = plan.steps.stretches
    assert set(stretch.ops) == {op.name for op in network.forward_ops}
    out = optimized(x)
    assert out.grad_fn is not None, "the output carries autograd's graph to the caller's backward"
    del out
    reference(x)  # the same random draws
    for seed in (5, 6):  # .grad None, then gradients present
        _assert_same_step(optimized, reference, x, seed)
        model.zero_grad(set_to_none=False)
        reference.zero_grad(set_to_none=False)
    measured = monetdsl.measure(optimized, x, probe="live", warmup=0)
    assert measured.planned * 0.98 <= measured.peak <= measured.planned * 1.02, measured.summary()


def test_recomputing_schedules_mix_stretches_and_steps(mlp):
    """Recompute-all: every op recomputed is in no stretch; with Chen's checkpoints the
    stored segments run under autograd and meet the recomputed ones at entered tensors."""
    model, reference, x, trace = mlp
    network = trace.spec.network
    for keep in ("none", set(chen_sqrt_checkpoints(network))):
        schedule = schedule_with(trace.spec, first_impls(network), keep=keep, promote="needed")
        optimized, plan = _optimized(model, x, trace, schedule)
        recomputed = {n for stage in schedule.stages for n in stage.recompute}
        assert recomputed and not recomputed & {op for s in plan.steps.stretches for op in s.ops}
        for seed in (7, 8):
            _assert_same_step(optimized, reference, x, seed)
        measured = monetdsl.measure(optimized, x, probe="live", warmup=0)
        assert measured.peak <= measured.planned * 1.02, measured.summary()


def test_an_observer_sees_every_step(mlp):
    model, reference, x, trace = mlp
    network = trace.spec.network
    seen = []
    optimized, plan = _optimized(model, x, trace, schedule_with(trace.spec, first_impls(network), keep="all"),
                                 observe=lambda planned, env: seen.append(planned.step.op))
    assert plan.steps.stretches
    _assert_same_step(optimized, reference, x, 9)
    assert set(seen) >= {bop.name for bop in network.backward_ops}


def _assert_close_step(optimized, reference, x, seed):
    """Outputs and gradients within rounding of eager's (other implementations)."""
    out1, grads1 = eager_step(optimized, [x], seed)
    out2, grads2 = eager_step(reference, [x], seed)
    torch.testing.assert_close(out1, out2)
    for name in grads2:
        torch.testing.assert_close(grads1[name], grads2[name], msg=name)


def _store_all_of_pytorch_implementations(factory, batch: int, profile: bool):
    """Store-all of PyTorch's implementations for ``factory``'s model (on measured costs
    when ``profile``), checked: two steps equal eager's twin's, and the allocator's peak
    (the kernels' scratch included) is within the plan. Returns the plan and the ops
    with a weight gradient (convolutions, linear layers) that are in its stretches."""
    model, reference = twins(factory)
    torch.manual_seed(3)
    x = torch.randn(batch, 3, 32, 32)
    trace = trace_for_runtime(model, [x], optimizer="adam", profile=profile)
    network = trace.spec.network
    optimized, plan = _optimized(model, x, trace, schedule_with(trace.spec, first_impls(network), keep="all"))
    weighted = {b.of for b in network.backward_ops if "wgrad" in b.name}
    for seed in (4, 5):
        _assert_same_step(optimized, reference, x, seed)
    model.zero_grad(set_to_none=False)
    measured = monetdsl.measure(optimized, x, probe="allocator", warmup=1)
    assert measured.peak <= measured.planned * 1.02, measured.summary()
    return plan, weighted & {op for s in plan.steps.stretches for op in s.ops}


def test_convolutions_run_under_autograd_within_the_plan():
    """A CNN (convolutions, batch norm, ReLU, max-pool, dropout, linear): with PyTorch's
    implementations store-all is one autograd graph, every convolution's backward is
    autograd's combined kernel, the step is eager's bit for bit, and the allocator sees
    the planned peak."""
    plan, in_stretches = _store_all_of_pytorch_implementations(SmallCNN, 8, profile=False)
    assert plan.steps.whole_autograd and {"conv1", "conv2"} <= in_stretches


def test_convolutions_in_a_stretch_allocate_as_measured_costs_plan():
    """A UNet (convolutions, a transposed convolution, a skip ``cat`` whose backward hands
    the convolutions slices of its gradient): at store-all with PyTorch's implementations,
    planned on this machine's measured costs (the workspaces the allocator saw), the
    convolutions in the stretch run autograd's combined backward kernel, the allocator's
    peak is the plan's and the step is eager's."""
    _, in_stretches = _store_all_of_pytorch_implementations(TinyUNet, 4, profile=True)
    assert in_stretches


def test_solved_schedules_keep_their_planned_peak():
    """A GPT with its loss inside: from store-all to a hybrid budget the solver's schedules
    cut stretches at recomputations and at residual joins, and the engine holds no
    gradient the plan does not (the measured peak of live tensors is the plan's)."""
    model, reference = twins(tiny_gpt)
    torch.manual_seed(2)
    x = torch.randint(0, 512, (4, 32))
    with torch.no_grad():
        shape = tuple(model(x).shape)
    reduced = Reduced(model, shape)
    trace = trace_for_runtime(reduced, [x], optimizer="adam")
    for budget in budget_ladder(trace.spec)[:2]:
        result = solve(trace.spec, memory_budget=budget, time_limit=4, options={"kicks": 3, "refine": False})
        optimized = monetdsl.optimize(reduced, schedule=result.schedule)
        plan = optimized.plan_for(x, trace=trace)
        measured = monetdsl.measure(optimized, x, probe="live", warmup=0)
        assert measured.peak <= measured.planned * 1.02, (budget, measured.summary())


class _GRUHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(6, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


def test_gradients_added_across_stretches_stay_as_planned():
    """A GRU whose hidden-state products add their weight gradients into ``.grad``
    (``into_grad``, no stretch) splits into a stretch per time step; the input
    projection's gradient is added into by every one. The engine would hold each
    stretch's part from its first contribution to the stretch's end: only the stage that
    writes last stays in the stretch, and the measured peak is the plan's."""
    model, reference = twins(_GRUHead)
    torch.manual_seed(4)
    x = torch.randn(4, 6, 6)
    trace = trace_for_runtime(model, [x], optimizer="adam")
    network = trace.spec.network
    impls = first_impls(network)
    impls.update({b.name: "into_grad" for b in network.backward_ops if "into_grad" in b.impl_names and "matmul" in b.name})
    assert any(v == "into_grad" for v in impls.values())
    optimized, plan = _optimized(model, x, trace, schedule_with(trace.spec, impls, keep="all"))
    assert plan.steps.stretches
    for seed in (1, 2):
        _assert_close_step(optimized, reference, x, seed)
    # the allocator: no convolution here, so no library workspace the roofline plan leaves out
    measured = monetdsl.measure(optimized, x, probe="allocator", warmup=0)
    assert measured.peak <= measured.planned * 1.02, measured.summary()


def test_an_op_whose_graph_saves_an_intermediate_stays_out():
    """``sin(exp(x))`` as one step: autograd saves ``exp(x)``, which is neither a read nor
    a write of the step; a convolution saves its input, which a plan that reads only the
    weight does not keep."""
    x = torch.empty(32, 32)

    def fused(v):
        return (torch.sin(torch.exp(v)),)

    assert not saves_only(fused, ("x",), ("y",), {"x": x}, ["x"], {"x", "y"})
    assert saves_only(lambda v: (torch.exp(v),), ("x",), ("y",), {"x": x}, ["x"], {"y"})
    image, weight = torch.empty(2, 3, 8, 8), torch.empty(4, 3, 3, 3)

    def conv(v, w):
        return (torch.nn.functional.conv2d(v, w),)

    examples = {"x": image, "w": weight}
    assert saves_only(conv, ("x", "w"), ("y",), examples, ["x", "w"], {"x", "w"})
    assert not saves_only(conv, ("x", "w"), ("y",), examples, ["x", "w"], {"w"})


def test_a_layer_whose_combined_backward_passes_the_peak_runs_the_plans_steps_in_its_stretch():
    """A UNet at store-all: autograd's combined convolution backward would hold a layer's
    input beside gradients the plan makes after freeing it. With no room above the plan's
    peak (a schedule given, whose budget the runtime does not know), such layers are
    recorded as planned nodes (their backward the plan's own steps, in its order), the
    whole backward stays one autograd graph, the step is eager's bit for bit and the live
    peak is the plan's."""
    model, reference = twins(TinyUNet)
    torch.manual_seed(3)
    x = torch.randn(4, 3, 32, 32)
    trace = trace_for_runtime(model, [x], optimizer="adam")
    network = trace.spec.network
    optimized, plan = _optimized(model, x, trace, schedule_with(trace.spec, first_impls(network), keep="all"))
    unbounded = plan_steps(network, plan.schedule, plan.program, engine_room=plan.planned_peak)
    assert unbounded.engine_overshoot > 0 and not any(s.nodes for s in unbounded.stretches), \
        "autograd's combined backward goes past the plan's peak here"
    nodes = {op for s in plan.steps.stretches for op in s.nodes}
    assert nodes and plan.steps.whole_autograd and plan.steps.engine_overshoot == 0
    assert all(any(b.of == op and "wgrad" in b.name for b in network.backward_ops) for op in nodes)
    for seed in (4, 5):
        _assert_same_step(optimized, reference, x, seed)
    measured = monetdsl.measure(optimized, x, probe="live", warmup=1)
    assert measured.peak == measured.planned, measured.summary()


def test_ops_with_other_backward_implementations_stay_in_the_stretch():
    """A CNN whose pools take their gradient from the indices alone and whose ReLUs from
    their input (autograd's own nodes would save more): each runs in the stretch as a
    planned node, so store-all is still one autograd graph; gradients match eager's and
    the live peak is the plan's."""
    model, reference = twins(SmallCNN)
    torch.manual_seed(3)
    x = torch.randn(8, 3, 32, 32)
    trace = trace_for_runtime(model, [x], optimizer="adam")
    network = trace.spec.network
    impls = first_impls(network)
    chosen = {b.name: alt for b in network.backward_ops for alt in ("from_indices", "from_input")
              if alt in b.impl_names and b.of.startswith(("pool", "relu"))}
    assert len(chosen) == 4
    impls.update(chosen)
    optimized, plan = _optimized(model, x, trace, schedule_with(trace.spec, impls, keep="all"))
    nodes = {op for s in plan.steps.stretches for op in s.nodes}
    assert {network.op(b).of for b in chosen} <= nodes and plan.steps.whole_autograd
    for seed in (6, 7):
        _assert_close_step(optimized, reference, x, seed)
    measured = monetdsl.measure(optimized, x, probe="live", warmup=1)
    assert measured.peak == measured.planned, measured.summary()
