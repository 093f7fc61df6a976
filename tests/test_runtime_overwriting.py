"""Backward steps written over their incoming gradient run for real and as planned.

A VGG-like block (two shape-keeping convolutions after the first, ReLUs, a max pool)
trains with the ReLU backward from the output or the 1-bit mask written over the output
gradient and the convolutions' input gradients written over theirs, batch slice by batch
slice (slices of two samples, masks in chunks of 64 elements, so the loops really loop):
gradients equal eager PyTorch's, each step allocates exactly what the simulator plans,
and the gradient that arrives is the storage that leaves.
"""
from __future__ import annotations

from unittest import mock

import torch
from torch import nn

import monetdsl
from monetdsl.catalogue import linear
from monetdsl.lowering import overwriting
from monetdsl.runtime.plan import trace_for_runtime
from .runtime_helpers import Reduced, assert_steps_allocate_as_planned, eager_step, schedule_with, twins


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.nn.functional.leaky_relu(self.conv3(h), 0.2)
        return self.fc(torch.flatten(self.pool(h), 1))


SLICE = 2 * 8 * 8 * 8 * 4  # two samples of an 8x8x8 float32 gradient


def _small_pieces():
    return mock.patch.object(linear, "DGRAD_SLICE_BYTES", SLICE), mock.patch.object(overwriting, "MASK_CHUNK", 64)


def _in_place_impls(network, relu_forward: str, relu_backward: str) -> dict[str, str]:
    impls = {}
    for op in network.forward_ops:
        if "mask" in op.impl_names:
            impls[op.name] = relu_forward
    for bop in network.backward_ops:
        if "sliced_inplace" in bop.impl_names:
            impls[bop.name] = "sliced_inplace"
        elif f"{relu_backward}_inplace" in bop.impl_names:
            impls[bop.name] = f"{relu_backward}_inplace"
    return impls


def test_the_tracer_offers_them_where_the_plan_allows():
    x = torch.randn(6, 3, 8, 8)
    network = trace_for_runtime(Block(), [x], optimizer="sgd").spec.network
    sliced = sorted(b.name for b in network.backward_ops if "sliced_inplace" in b.impl_names)
    assert sliced == ["conv2.dgrad", "conv3.dgrad"]  # conv1 changes the channels, and has no input gradient
    in_place = [b for b in network.backward_ops for i in b.impls if i.overwrites is not None]
    assert len(in_place) == 2 + 3 * 2  # two convolutions, three ReLUs with two each


def test_gradients_equal_eager_and_the_gradient_storage_is_reused():
    x = torch.randn(6, 3, 8, 8)
    model, reference = twins(Block)
    slice_patch, chunk_patch = _small_pieces()
    with slice_patch, chunk_patch:
        trace = trace_for_runtime(model, [x], optimizer="sgd")
        network = trace.spec.network
        want = eager_step(reference, [x], 5)
        calls = []
        real = torch.ops.aten.convolution

        def counting(*args):
            calls.append(args[0].shape[0])
            return real(*args)

        for relu_forward, relu_backward in (("inplace_mask", "from_mask"), ("plain", "from_output")):
            impls = _in_place_impls(network, relu_forward, relu_backward)
            for keep in ("all", "none"):
                optimized = monetdsl.optimize(model, schedule=schedule_with(trace.spec, impls, keep=keep))
                optimized.plan_for(x, trace=trace)
                calls.clear()
                with mock.patch.object(torch.ops.aten, "convolution", counting):
                    got = eager_step(optimized, [x], 5)
                assert calls.count(2) >= 6, calls  # both input gradients in three slices of two samples
                torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
                for name in want[1]:
                    torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_each_step_allocates_as_planned():
    x = torch.randn(6, 3, 8, 8)
    model = Block()
    with torch.no_grad():
        shape = tuple(model(x).shape)
    reduced = Reduced(model, shape)
    slice_patch, chunk_patch = _small_pieces()
    with slice_patch, chunk_patch:
        trace = trace_for_runtime(reduced, [x], optimizer="adam")
        network = trace.spec.network
        gradient_bytes = 6 * 8 * 8 * 8 * 4
        for bop in network.backward_ops:  # as measured on the trace: one slice at most, no new gradient
            for impl in bop.impls:
                if impl.overwrites is not None:
                    assert bop.new_output_bytes(impl, network.tensors) == 0
                    assert impl.workspace <= SLICE < gradient_bytes, (bop.name, impl.name, impl.workspace)
        for relu_forward, relu_backward in (("inplace_mask", "from_mask"), ("plain", "from_output")):
            impls = _in_place_impls(network, relu_forward, relu_backward)
            assert sum(1 for n, i in impls.items() if i.endswith("inplace")) == 5
            assert_steps_allocate_as_planned(reduced, x, trace, impls, relu_backward)


def test_a_gradient_with_another_user_is_not_written_over():
    """The runtime's guard: a view, or a gradient whose storage another tensor shares,
    gets the result out of place (the same values)."""
    conv = linear.Convolution()
    inputs, attrs = conv.examples()[3]
    g = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    want = conv.backward("dgrad", "default", {"y": g}, {"w": inputs["w"]}, attrs)["x"]
    ctx = type("Ctx", (), {"attrs": attrs})()
    shared = g.clone()
    other = shared.view(-1)  # another tensor on the same storage
    out = overwriting.conv_dgrad_sliced_inplace(ctx, {"w": inputs["w"]}, {"y": shared})["x"]
    torch.testing.assert_close(out, want)
    assert out.data_ptr() != shared.data_ptr() and torch.equal(other.view_as(g), g)
    alone = g.clone()
    out = overwriting.conv_dgrad_sliced_inplace(ctx, {"w": inputs["w"]}, {"y": alone})["x"]
    torch.testing.assert_close(out, want)
    assert out.data_ptr() == alone.data_ptr()


def test_measured_costs_time_them_on_a_fresh_copy_of_the_gradient():
    """Measuring runs each step several times; one that writes over its incoming gradient
    gets a new copy each time (the example stays as it was) and is measured like the others."""
    from monetdsl.costs.measure import measure_costs

    x = torch.randn(6, 3, 8, 8)
    trace = trace_for_runtime(Block(), [x], optimizer="sgd")
    given = []  # every gradient the in-place input gradient is run on, kept alive so ids stay distinct
    real = overwriting.conv_input_grad_over_output
    with mock.patch.object(overwriting, "conv_input_grad_over_output", lambda g, w, a: given.append(g) or real(g, w, a)):
        report = measure_costs(trace.built, "cpu", repeats=2)
    assert not report.notes, report.notes
    # two convolutions, each a warm-up and at least one timed run (one is enough when it agrees with the warm-up)
    assert len(given) >= 2 * 2 and len({id(g) for g in given}) == len(given)
    network = report.network
    for bop in network.backward_ops:
        for impl in bop.impls:
            if impl.overwrites is not None:
                assert impl.time_us > 0 and bop.new_output_bytes(impl, network.tensors) == 0
