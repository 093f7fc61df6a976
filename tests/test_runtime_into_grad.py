"""Weight gradients added straight into ``.grad`` (the ``into_grad`` alternatives).

A convolution's weight gradient by chunks of output channels (chunks of two channels
here, so every layer runs several) and a matrix product's by one ``addmm_`` into the
transposed view of a linear layer's ``.grad``. Checked against eager PyTorch: a fresh
``.grad`` (written, not added), gradient accumulation over micro-batches (added), a
weight shared by two layers (two writers), gradient hooks (the gradient then goes
through autograd, whole, once); and the memory: the planned peak drops by the weight
gradient, and the measured step peaks are the planned ones.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

import monetdsl
from monetdsl.catalogue import linear as linear_catalogue
from monetdsl.runtime.plan import trace_for_runtime
from monetdsl.search.simulator import simulate
from .runtime_helpers import Reduced, eager_step, first_impls, measured_step_peaks, schedule_with, twins


class WideHead(nn.Module):
    """Weights much larger than the activations at this batch (a ResNet's last stage)."""

    def __init__(self, shared: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4, 48)
        self.fc2 = nn.Linear(48, 48)
        self.fc3 = self.fc2 if shared else nn.Linear(48, 48)
        self.out = nn.Linear(48, 10, bias=False)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        h = torch.relu(self.fc1(h))
        h = torch.relu(self.fc3(torch.relu(self.fc2(h))))
        return self.out(h)


CHUNK = 2 * 32 * 9 * 4  # two output channels of conv2's weight gradient per chunk


def _traced(shared=False):
    model, reference = twins(lambda: WideHead(shared))
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    return model, reference, x, trace_for_runtime(model, [x], optimizer="sgd")


@pytest.fixture(scope="module")
def traced():
    return _traced()


def _into_grad(network, everywhere=True, conv="into_grad") -> dict[str, str]:
    """PyTorch's implementations, with every weight gradient that can ``into_grad``
    (a convolution's ``conv`` alternative where it has one)."""
    impls = first_impls(network)
    for bop in network.backward_ops:
        if "into_grad" in bop.impl_names and everywhere:
            impls[bop.name] = conv if conv in bop.impl_names else "into_grad"
    return impls


CONV_ALTERNATIVES = ["into_grad", "im2col_into_grad"]


def _optimized(model, x, trace, schedule):
    optimized = monetdsl.optimize(model, schedule=schedule)
    optimized.plan_for(x, trace=trace)
    return optimized


def _close(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_every_weight_gradient_has_the_alternative(traced):
    network = traced[-1].spec.network
    wgrads = [b for b in network.backward_ops if b.local_name == "wgrad"]
    assert len(wgrads) == 6
    for bop in wgrads:
        impl = bop.impl("into_grad")
        weight = next(g for g in bop.outputs if g.endswith("weight)"))
        assert impl.accumulates == {weight}
        assert bop.new_output_bytes(impl, network.tensors) == bop.new_output_bytes(bop.impls[0], network.tensors) - network.tensors[weight].nbytes


@pytest.mark.parametrize("conv", CONV_ALTERNATIVES)
@pytest.mark.parametrize("keep", ["all", "none"])
def test_gradients_equal_eager_with_a_fresh_grad(traced, keep, conv):
    model, reference, x, trace = traced
    schedule = schedule_with(trace.spec, _into_grad(trace.spec.network, conv=conv), keep=keep)
    with mock.patch.object(linear_catalogue, "WGRAD_CHUNK_BYTES", CHUNK):
        _close(eager_step(_optimized(model, x, trace, schedule), [x], 1), eager_step(reference, [x], 1))


def _counting_conv_weight_kernel():
    calls = []
    kernel = linear_catalogue._CONV_WEIGHT[2]

    def counted(x, w_shape, g, **kw):
        calls.append(tuple(w_shape))
        return kernel(x, w_shape, g, **kw)
    return calls, mock.patch.dict(linear_catalogue._CONV_WEIGHT, {2: counted})


@mock.patch.object(linear_catalogue, "WGRAD_CHUNK_BYTES", CHUNK)
def test_without_a_grad_the_convolution_gradient_is_made_whole_and_adopted(traced):
    """No ``.grad`` to add into: chunks would only cost time, so the whole kernel runs once
    and its result becomes the ``.grad``; with a ``.grad`` (accumulation) the chunks add into it."""
    model, reference, x, trace = traced
    optimized = _optimized(model, x, trace, schedule_with(trace.spec, _into_grad(trace.spec.network)))
    conv2 = dict(model.named_parameters())["conv2.weight"]
    calls, patch = _counting_conv_weight_kernel()
    with patch:
        got = eager_step(optimized, [x], 1)  # .grad None at the start
    _close(got, eager_step(reference, [x], 1))
    assert calls.count(tuple(conv2.shape)) == 1
    calls.clear()
    with patch:
        optimized(x).sum().backward()  # .grad kept from the step above: added into by chunks
    chunk_channels = CHUNK // (conv2[0].numel() * conv2.element_size())
    assert calls.count((chunk_channels, *conv2.shape[1:])) == conv2.shape[0] // chunk_channels
    assert tuple(conv2.shape) not in calls


def _accumulated(model, xs):
    model.zero_grad(set_to_none=True)
    for x in xs:
        model(x).sum().backward()
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("conv", CONV_ALTERNATIVES)
def test_gradient_accumulation_adds_into_grad(traced, conv):
    model, reference, x, trace = traced
    optimized = _optimized(model, x, trace, schedule_with(trace.spec, _into_grad(trace.spec.network, conv=conv)))
    xs = [x, torch.randn_like(x), torch.randn_like(x)]
    with mock.patch.object(linear_catalogue, "WGRAD_CHUNK_BYTES", CHUNK):
        got = _accumulated(optimized, xs)
    want = _accumulated(reference, xs)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_shared_weight_gets_both_parts():
    model, reference, x, trace = _traced(shared=True)
    network = trace.spec.network
    writers = [b for b in network.backward_ops if "grad(fc2.weight)" in b.outputs]
    assert len(writers) == 2 and all("into_grad" in b.impl_names for b in writers)
    _close(eager_step(_optimized(model, x, trace, schedule_with(trace.spec, _into_grad(network))), [x], 1),
           eager_step(reference, [x], 1))


@pytest.mark.parametrize("conv", CONV_ALTERNATIVES)
def test_gradient_hooks_see_the_whole_gradient_once(traced, conv):
    model, reference, x, trace = traced
    optimized = _optimized(model, x, trace, schedule_with(trace.spec, _into_grad(trace.spec.network, conv=conv)))
    seen = {}
    handles = [p.register_hook(lambda g, n=n: seen.setdefault(n, []).append(g.clone()))
               for n, p in model.named_parameters() if n in ("conv2.weight", "fc1.weight")]
    try:
        got = eager_step(optimized, [x], 1)
    finally:
        for h in handles:
            h.remove()
    _close(got, eager_step(reference, [x], 1))
    assert sorted(seen) == ["conv2.weight", "fc1.weight"]
    for name, grads in seen.items():
        assert len(grads) == 1
        torch.testing.assert_close(grads[0], got[1][name])


def _reduced_wide_head():
    """A WideHead whose output is reduced to a loss inside the module, traced (so the
    whole step is planned): (module, input, trace)."""
    model = WideHead()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        shape = tuple(model(x).shape)
    reduced = Reduced(model, shape)
    return reduced, x, trace_for_runtime(reduced, [x], optimizer="sgd")


def _steps_peak_as_planned(module, x, trace, schedule, label=""):
    """Every step's measured peak (live bytes above those at its start) is the simulator's;
    returns the simulation."""
    network = trace.spec.network
    simulation = simulate(network, schedule)
    observed = measured_step_peaks(_optimized(module, x, trace, schedule), x, network)
    for step, measured in zip(simulation.steps, observed.increments):
        fewer = trace.built.workspace.aliased.get((step.op, step.impl, step.kind), 0)  # an incoming gradient passed on
        assert measured == step.peak - simulation.fixed_bytes - step.live_before - fewer, (label, step.describe())
    return simulation


@mock.patch.object(linear_catalogue, "WGRAD_CHUNK_BYTES", CHUNK)  # traced (workspaces measured) and run so
def test_the_plan_drops_by_the_weight_gradient_and_the_steps_peak_as_planned():
    reduced, x, trace = _reduced_wide_head()
    spec, network = trace.spec, trace.spec.network
    default = schedule_with(spec, _into_grad(network, everywhere=False), keep="none")
    into = schedule_with(spec, _into_grad(network), keep="none")
    peaks, wgrad_peaks = {}, {}
    for label, schedule in (("default", default), ("into", into)):
        simulation = _steps_peak_as_planned(reduced, x, trace, schedule, label)
        peaks[label] = simulation.peak_bytes
        wgrad_peaks[label] = next(s.peak for s in simulation.steps if s.op == "model.conv2.wgrad")
    # the peak was conv2's weight-gradient step: it drops by the gradient, less one chunk
    wgrad = network.op("model.conv2.wgrad")
    assert wgrad.impl("into_grad").workspace <= 2 * CHUNK
    saved = network.tensors["model.conv2.weight"].nbytes + wgrad.impls[0].workspace - wgrad.impl("into_grad").workspace
    assert wgrad_peaks["default"] - wgrad_peaks["into"] == saved > 0
    assert peaks["default"] == wgrad_peaks["default"] and peaks["into"] < peaks["default"]


def test_im2col_steps_peak_as_planned():
    """The unfolded input and the operands' copies are the step's measured workspace: every
    step's measured peak is the simulator's, and the plan counts no weight-sized temporary."""
    reduced, x, trace = _reduced_wide_head()
    spec, network = trace.spec, trace.spec.network
    wgrad = network.op("model.conv2.wgrad")
    im2col = wgrad.impl("im2col_into_grad")
    assert im2col.accumulates == {"grad(model.conv2.weight)"}
    assert im2col.workspace >= 2 * 2 * 32 * 9 * 64 * 4  # the unfolded input (2 x 288 x 64 floats) and its copy
    assert im2col.time_us >= wgrad.impl("into_grad").time_us  # never cheaper on the roofline: same FLOPs, more bytes
    _steps_peak_as_planned(reduced, x, trace, schedule_with(spec, _into_grad(network, conv="im2col_into_grad"), keep="none"))


def test_a_weight_feeding_two_operands_keeps_the_default():
    """``w @ w``: the weight's gradient is the sum of two products, which one view of
    ``.grad`` cannot take; the tracer does not offer the alternative there. (The runtime
    does not run such a product at all yet: one tensor feeding both operands of a split
    gradient is refused when lowering.)"""
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6) / 3)

        def forward(self, x):
            return (x @ (self.w @ self.w)).sum()

    x = torch.randn(4, 6)
    trace = trace_for_runtime(Square(), [x], optimizer="sgd")
    network = trace.spec.network
    square = next(op for op in network.forward_ops if op.inputs == ("w",))
    assert all(b.impl_names == ("default",) for b in network.backward_ops if b.of == square.name)
    assert not any("into_grad" in b.impl_names for b in network.backward_ops)  # x is an input, not a parameter
