"""Norm weights with zeros: a backward from the output would divide by them.

torchvision's ``zero_init_residual=True`` starts the last batch norm of every residual
branch at weight zero; a layer-norm weight can hold a zero too. The plan must then use the
backward from the input for those norms, also when the zero appears after planning, and a
schedule file that divides by a zero weight is refused before the step runs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import monetdsl
from monetdsl.catalogue import GammaHasZeros
from monetdsl.models import tiny_gpt
from monetdsl.runtime.plan import trace_for_runtime
from .runtime_helpers import eager_step, first_impls, patch_dropout, schedule_with, twins


class ZeroInitResidual(nn.Module):
    """A residual block whose branch ends in a batch norm initialised at weight zero."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.bn(self.conv(h)))
        return self.head(h.mean((2, 3)))


def _assert_steps_equal(optimized, reference, x, seeds=(1, 2)):
    for seed in seeds:
        patch_dropout(reference, optimized.plans[-1].schedule.impls)  # the twin draws dropout masks as the plan does
        (out1, g1), (out2, g2) = eager_step(optimized, [x], seed), eager_step(reference, [x], seed)
        torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-6)
        assert g1.keys() == g2.keys()
        for name in g2:
            assert torch.isfinite(g1[name]).all(), name
            # float rounding of other kernels (a bias before BN: zero up to rounding; attention from its probabilities)
            assert (g1[name] - g2[name]).abs().max() <= 1e-4 * g2[name].abs().max() + 1e-5, name


@pytest.mark.parametrize("options", [{"method": "store-all"}, {"max_overhead": 0.1}])
def test_a_zero_initialised_batch_norm_is_planned_from_its_input(options):
    model, reference = twins(ZeroInitResidual)
    x = torch.randn(4, 3, 16, 16)
    optimized = monetdsl.optimize(model, x, **options)
    plan = optimized.plans[0]
    assert plan.avoided == {"bn"} and plan.schedule.impls["bn.backward"] == "from_input"
    assert any(pin.pattern.text == "bn.backward" for pin in plan.spec.constraints.impls)
    _assert_steps_equal(optimized, reference, x)


def test_a_weight_that_becomes_zero_switches_to_a_plan_from_the_input():
    """Planned with every weight non-zero (the backward from the output chosen), then a
    weight entry is zeroed: that step runs a second plan, with a warning, and equals eager."""
    model, reference = twins(ZeroInitResidual)
    with torch.no_grad():
        for m in (model, reference):
            m.bn.weight.fill_(0.5)
    x = torch.randn(4, 3, 16, 16)
    optimized = monetdsl.optimize(model, x, method="store-all", profile=False)  # the roofline picks from_output
    first = optimized.plans[0]
    assert first.weight_checks == (("bn", "bn.weight"),) and first.schedule.impls["bn.backward"] == "from_output"
    _assert_steps_equal(optimized, reference, x, seeds=(1,))
    with torch.no_grad():
        for m in (model, reference):
            m.bn.weight[3] = 0.0
    with pytest.warns(UserWarning, match="weight of bn has a zero entry"):
        _assert_steps_equal(optimized, reference, x, seeds=(2,))
    second = [p for p in optimized.plans if p is not first]
    assert len(second) == 1 and second[0].schedule.impls["bn.backward"] == "from_input" and second[0].avoided == {"bn"}
    with torch.no_grad():
        for m in (model, reference):
            m.bn.weight[3] = 0.25
    _assert_steps_equal(optimized, reference, x, seeds=(3,))  # non-zero again: the first plan, no new one
    assert len(optimized.plans) == 2


def test_a_schedule_that_divides_by_a_zero_weight_is_refused_before_the_step():
    model, reference = twins(ZeroInitResidual)
    x = torch.randn(4, 3, 16, 16)
    trace = trace_for_runtime(model, [x], optimizer="sgd")
    impls = first_impls(trace.spec.network) | {"bn.backward": "from_output"}
    optimized = monetdsl.optimize(model, schedule=schedule_with(trace.spec, impls))
    optimized.plan_for(x, trace=trace)
    with pytest.raises(monetdsl.MonetError, match="weight of bn has a zero entry.*from_input"):
        optimized(x)
    assert int(model.bn.num_batches_tracked) == 0  # nothing ran


def test_a_layer_norm_weight_with_a_zero_is_planned_from_its_input():
    model, reference = twins(tiny_gpt)
    with torch.no_grad():
        for m in (model, reference):
            m.h[0].ln_1.weight[0] = 0.0
    x = torch.randint(0, 512, (2, 16))
    optimized = monetdsl.optimize(model, x, method="store-all")
    plan = optimized.plans[0]
    assert plan.avoided == {"h.0.ln_1"}
    assert plan.schedule.impls["h.0.ln_1.backward"] == "from_input"
    _assert_steps_equal(optimized, reference, x, seeds=(1,))


def test_the_cpu_kernel_refuses_a_zero_gamma_rather_than_returning_nan():
    g, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with pytest.raises(GammaHasZeros):
        torch.ops.monetdsl.bn_backward_from_output(g, y, torch.ones(3), torch.tensor([1.0, 0.0, 2.0]), torch.zeros(3))
