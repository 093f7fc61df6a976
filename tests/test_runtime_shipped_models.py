"""The shipped CNN families train under every kind of alternative with each step's memory
exactly as planned (heavy: marked ``slow``, run with ``pytest -m slow``).

MobileNetV2 (depthwise convolutions, ReLU6), VGG-16, GoogLeNet (concatenations, ceil-mode
pooling) and ResNet-50 (bottlenecks) at small inputs, with a fixed linear loss inside so
the whole step is planned; the first four implementation choices of
``impl_combinations`` (between them most alternatives of every op), keeping everything
and keeping nothing: every step allocates as planned (``assert_steps_allocate_as_planned``).
"""
from __future__ import annotations

import pytest
import torch

from monetdsl.models import cnn
from monetdsl.runtime.plan import trace_for_runtime
from .runtime_helpers import Reduced, assert_steps_allocate_as_planned, impl_combinations

MODELS = {
    "mobilenet_v2": (cnn.mobilenet_v2, (2, 3, 32, 32)),
    "vgg16": (cnn.vgg16, (2, 3, 32, 32)),
    "googlenet": (cnn.googlenet, (2, 3, 64, 64)),
    "resnet50": (cnn.resnet50, (2, 3, 32, 32)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_step_of_a_shipped_family_allocates_as_planned(name):
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    model = factory(num_classes=10).train()
    x = torch.randn(shape)
    with torch.no_grad():
        reduced = Reduced(model, tuple(model(x).shape))
    trace = trace_for_runtime(reduced, [x], optimizer="adam")
    for impls in impl_combinations(trace.spec.network)[:4]:
        assert_steps_allocate_as_planned(reduced, x, trace, impls, name)
