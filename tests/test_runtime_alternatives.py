"""Every alternative of the catalogue runs in the runtime and gives PyTorch's gradients.

Tiny models (two of them, and a cross-entropy with and without its output layer folded
in, in five forms) use every catalogue kind; implementation choices are cycled so that
together they run every forward and backward alternative of every op, under a schedule
that keeps everything and one that recomputes everything. Outputs and gradients are
compared with eager PyTorch (dropout masks drawn alike, see ``patch_dropout``): bit for
bit for PyTorch's own implementations, within float32 rounding for the others (batch
norm or layer norm from the output, attention from kept probabilities, a gradient summed
in another order).
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import monetdsl
from monetdsl.catalogue import loss as loss_catalogue
from monetdsl.runtime.plan import trace_for_runtime
from .runtime_helpers import eager_step, first_impls, impl_combinations, patch_dropout, schedule_with, twins
from .runtime_models import KindsCNN, KindsLoss, KindsTransformer

CASES = {
    "cnn": (KindsCNN, lambda: torch.randn(4, 3, 12, 12)),
    "transformer": (KindsTransformer, lambda: torch.randn(2, 8, 16)),
    "loss-mean": (KindsLoss, lambda: torch.randn(2, 8, 16)),
    "loss-none": (lambda: KindsLoss("none"), lambda: torch.randn(2, 8, 16)),
    "head-mean": (lambda: KindsLoss("mean", bias=False), lambda: torch.randn(2, 8, 16)),
    "head-sum": (lambda: KindsLoss("sum", bias=False), lambda: torch.randn(2, 8, 16)),
    "head-none": (lambda: KindsLoss("none", bias=False), lambda: torch.randn(2, 8, 16)),
}


_TRACED: dict = {}


def _traced(name: str):
    if name not in _TRACED:
        factory, make_input = CASES[name]
        model, reference = twins(factory)
        torch.manual_seed(1)
        x = make_input()
        # the folded output layers run their chunked alternatives in chunks of 5 of the 16 rows
        with mock.patch.object(loss_catalogue, "CHUNK_BYTES", 5 * 7 * 4):
            _TRACED[name] = (name, model, reference, x, trace_for_runtime(model, [x], optimizer="sgd"))
    return _TRACED[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def traced(request):
    return _traced(request.param)


def _run(model, reference, x, trace, schedule):
    optimized = monetdsl.optimize(model, schedule=schedule)
    optimized.plan_for(x, trace=trace)
    patch_dropout(reference, schedule.impls)
    return eager_step(optimized, [x], 5), eager_step(reference, [x], 5)


def _close(got, want):
    (out1, grads1), (out2, grads2) = got, want
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-6)
    scale = max(g.abs().max().item() for g in grads2.values())
    assert grads1.keys() == grads2.keys()
    for name in grads2:
        torch.testing.assert_close(grads1[name], grads2[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_every_alternative_runs_and_matches_eager(traced):
    name, model, reference, x, trace = traced
    network = trace.spec.network
    used: dict[str, set] = {}
    for impls in impl_combinations(network):
        for keep in ("all", "none"):
            schedule = schedule_with(trace.spec, impls, keep=keep)
            _close(*_run(model, reference, x, trace, schedule))
            for op, impl in schedule.impls.items():
                used.setdefault(op, set()).add(impl)
    missing = [(op.name, impl) for op in (*network.forward_ops, *network.backward_ops) if len(op.impls) > 1
               for impl in op.impl_names if impl not in used.get(op.name, set())]
    assert not missing, f"alternatives never run: {missing}"


def test_kinds_cover_the_catalogue():
    from monetdsl.catalogue import CATALOGUE

    kinds = set()
    for name in CASES:
        trace = _traced(name)[-1]
        kinds |= {r.kind.name for r in trace.built.records if r.kind is not None}
    assert kinds == set(CATALOGUE)


def test_folded_output_layers_run_in_chunks():
    for name in ("head-mean", "head-sum", "head-none"):
        records = [r for r in _traced(name)[-1].built.records if r.kind is not None and r.kind.name == "linear_cross_entropy"]
        assert len(records) == 1 and records[0].binding.attrs["chunk_rows"] == 5, name


def test_pytorch_implementations_are_bit_exact(traced):
    name, model, reference, x, trace = traced
    for keep in ("all", "none"):
        (out1, g1), (out2, g2) = _run(model, reference, x, trace, schedule_with(trace.spec, first_impls(trace.spec.network), keep=keep))
        assert torch.equal(out1, out2)
        if name != "transformer":  # the transformer sums one gradient from four writers: another order, float32 rounding
            assert all(torch.equal(g1[n], g2[n]) for n in g2)
        else:
            _close((out1, g1), (out2, g2))


@pytest.mark.parametrize("name", ["cnn", "transformer", "loss-mean"])
def test_every_alternative_allocates_as_planned(name):
    """Each step's own peak of live tensor bytes, for every alternative of every op, under
    a schedule keeping everything and one keeping nothing, is the simulator's
    (``assert_steps_allocate_as_planned``). This caught a later writer's gradient added
    into a third tensor when it was a view of its own storage (a linear layer's input
    gradient reshaped)."""
    from .runtime_helpers import Reduced, assert_steps_allocate_as_planned

    _, model, _, x, _ = _traced(name)
    with torch.no_grad():
        shape = tuple(model(x).shape)
    reduced = Reduced(model, shape) if shape else model
    trace = trace_for_runtime(reduced, [x], optimizer="adam")
    for impls in impl_combinations(trace.spec.network):
        assert_steps_allocate_as_planned(reduced, x, trace, impls, name)
