"""A convolution's input gradient, computed alone, is the transposed convolution of the
output gradient (a transposed convolution's, the plain one): bit for bit PyTorch's
gradient, with no read of the input and no copy.

``convolution_backward`` makes its input contiguous even when it computes only the input
gradient (it needs only the input's shape there), so the stand-in the runtime used to pass
was copied to an input-sized temporary on every step. ``lowering.graphs`` now lowers that
step to ``convolution(..., transposed=True)`` with the output padding that restores the
input's size; these tests run it over strides, paddings, dilations, groups, 1-d to 3-d
channels-last and transposed convolutions, against eager PyTorch.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import monetdsl
from monetdsl.runtime.plan import trace_for_runtime
from .runtime_helpers import eager_step, first_impls, schedule_with, twins

CONV = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d, -2: torch.nn.ConvTranspose2d}
CASES = {  # dims (negative: transposed), input size, kernel, stride, padding, dilation, groups, channels-last
    "2d": (2, (9, 8), 3, 1, 1, 1, 1, False),
    "2d-stride2-odd": (2, (9, 8), 3, 2, 1, 1, 1, False),  # output padding 0 in height, 1 in width
    "2d-dilated": (2, (11, 10), 3, 1, 2, 2, 1, False),
    "2d-grouped": (2, (8, 8), 3, 2, 0, 1, 2, False),
    "2d-pointwise-stride2": (2, (8, 7), 1, 2, 0, 1, 1, False),
    "2d-channels-last": (2, (9, 8), 3, 2, 1, 1, 1, True),
    "1d-stride3": (1, (17,), 5, 3, 2, 1, 1, False),
    "3d": (3, (5, 6, 5), 3, 2, 1, 1, 1, False),
    # a transposed convolution's backward is one call unless its weight is frozen
    "2d-transposed-frozen": (-2, (5, 4), 3, 2, 1, 1, 1, False),
    "2d-transposed-up2-grouped-frozen": (-2, (4, 4), 2, 2, 0, 1, 2, False),
}


class TwoConvs(torch.nn.Module):
    """A first convolution whose weight gradient needs the second one's input gradient."""

    def __init__(self, dims, kernel, stride, padding, dilation, groups):
        super().__init__()
        self.first = CONV[abs(dims)](3, 4, 3, padding=1)
        self.second = CONV[dims](4, 6, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=dims > 0)
        if dims < 0:
            self.second.weight.requires_grad_(False)

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


class ConvCalls(TorchDispatchMode):
    """Records every convolution call and every copy the step makes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "convolution_backward":
            self.calls.append((name, tuple(args[10])))
        elif name in ("convolution", "clone", "copy_", "contiguous"):
            self.calls.append((name, args[6] if name == "convolution" else None))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", sorted(CASES))
def test_input_gradient_is_a_transposed_convolution(case):
    dims, size, kernel, stride, padding, dilation, groups, channels_last = CASES[case]
    model, reference = twins(lambda: TwoConvs(dims, kernel, stride, padding, dilation, groups))
    x = torch.randn(2, 3, *size)
    if channels_last:
        for m in (model, reference):
            m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    trace = trace_for_runtime(model, [x], optimizer="sgd")
    schedule = schedule_with(trace.spec, first_impls(trace.spec.network), keep="all")
    optimized = monetdsl.optimize(model, schedule=schedule)
    optimized.plan_for(x, trace=trace)
    eager_step(optimized, [x], 3)  # warm-up: the gradient adapters trace themselves on first use
    out, grads = eager_step(optimized, [x], 3)
    want_out, want_grads = eager_step(reference, [x], 3)
    assert torch.equal(out, want_out)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        assert torch.equal(grads[name], want_grads[name]), name
    # the second convolution's input gradient: one convolution, transposed or (for a
    # transposed one) plain; no backward call computes an input gradient, nothing is copied
    loss = optimized(x).sum()
    calls = ConvCalls()
    with calls:
        loss.backward()
    assert ("convolution", dims > 0) in calls.calls
    assert all(mask[0] is False for name, mask in calls.calls if name == "convolution_backward"), calls.calls
    assert not [c for c in calls.calls if c[0] in ("clone", "copy_", "contiguous")], calls.calls
