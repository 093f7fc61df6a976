"""Forward steps written into the pass with each argument view made once
(``monetdsl/runtime/forward_code.py``).

What must hold: the inline code computes what the steps called one by one compute, bit
for bit, under schedules that store, recompute and mix stretches with steps; a view made
once does not outlive its owner (the live peak stays the plan's); a call entered through
a Python binding reaches the overload that was captured; an unrolled recurrent layer's
autograd graph slices its input projection once for the sequence (not once per reader),
and trains as eager does.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import monetdsl
from monetdsl.runtime.plan import trace_for_runtime
from monetdsl.runtime.straight_line import generate
from monetdsl.search.baselines import chen_sqrt_checkpoints
from torch.utils._python_dispatch import TorchDispatchMode
from .runtime_helpers import eager_step, first_impls, schedule_with, twins
from .runtime_models import GRUHead as _GRU


@pytest.fixture(scope="module")
def gru():
    model, reference = twins(_GRU)
    torch.manual_seed(3)
    x = torch.randn(4, 7, 6)
    return model, reference, x, trace_for_runtime(model, [x], optimizer="adam")


def _nodes(out: torch.Tensor) -> Counter:
    """Autograd nodes reachable from ``out``, by type."""
    seen, stack, count = set(), [out.grad_fn], Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count[type(node).__name__] += 1
        stack.extend(f for f, _ in node.next_functions)
    return count


def _step_with(optimized, plan, code, x, seed):
    plan.steps.code = code
    plan.steps.stepwise_code = None
    return eager_step(optimized, [x], seed)


def test_a_recurrent_layer_is_sliced_once_as_eager(gru):
    model, reference, x, trace = gru
    network = trace.spec.network
    optimized = monetdsl.optimize(model, schedule=schedule_with(trace.spec, first_impls(network), keep="all"))
    plan = optimized.plan_for(x, trace=trace)
    assert plan.steps.whole_autograd
    unbinds = _nodes(optimized(x))["UnbindBackward0"]
    # the input projection is unbound once per gate for the whole sequence (eager unbinds it
    # once and chunks each step in C++), not once per reader
    assert unbinds == 3 and _nodes(reference(x))["UnbindBackward0"] == 1
    out1, grads1 = eager_step(optimized, [x], 4)
    out2, grads2 = eager_step(reference, [x], 4)
    torch.testing.assert_close(out1, out2)
    for name in grads2:
        torch.testing.assert_close(grads1[name], grads2[name], msg=name)


@pytest.mark.parametrize("keep", ["all", "none", "chen"])
def test_inline_steps_compute_what_called_steps_compute(gru, keep):
    """Store-all (one autograd graph), recompute-all (every step on its own, recomputed
    views made again in the backward) and Chen's checkpoints (stretches meeting recomputed
    steps): the same outputs and gradients bit for bit, and the live peak within the plan."""
    model, _, x, trace = gru
    network = trace.spec.network
    kept = set(chen_sqrt_checkpoints(network)) if keep == "chen" else keep
    schedule = schedule_with(trace.spec, first_impls(network), keep=kept, promote="needed")
    optimized = monetdsl.optimize(model, schedule=schedule)
    plan = optimized.plan_for(x, trace=trace)
    fixed = {n for n, t in network.tensors.items() if t.is_fixed}
    inline, called = generate(plan.steps, fixed), generate(plan.steps, fixed, inline=False)
    assert "w0 = " in inline.source and "w0 = " not in called.source, "views are made in the pass"
    out1, grads1 = _step_with(optimized, plan, called, x, 5)
    out2, grads2 = _step_with(optimized, plan, inline, x, 5)
    assert torch.equal(out1, out2)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name
    measured = monetdsl.measure(optimized, x, probe="live", warmup=0)
    assert measured.peak <= measured.planned * 1.02, measured.summary()


class _Overloads(TorchDispatchMode):
    """The aten overloads called inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func)
        return func(*args, **(kwargs or {}))


def test_python_bindings_reach_the_captured_overloads(gru):
    """The inline pass enters ``add``, ``addmm``, ``split``, ``view``... through their Python
    bindings: it must call the overloads the steps called one by one call, no other."""
    model, _, x, trace = gru
    network = trace.spec.network
    optimized = monetdsl.optimize(model, schedule=schedule_with(trace.spec, first_impls(network), keep="all"))
    plan = optimized.plan_for(x, trace=trace)
    fixed = {n for n, t in network.tensors.items() if t.is_fixed}
    seen = []
    for inline in (True, False):
        plan.steps.code = generate(plan.steps, fixed, inline=inline)
        with _Overloads() as overloads:
            optimized(x)
        seen.append(overloads.seen)
    assert seen[0] == seen[1]
    assert {str(op) for op in seen[0]} >= {"aten.addmm.default", "aten.split.Tensor", "aten.unbind.int", "aten.sigmoid.default"}
