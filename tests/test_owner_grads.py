"""Gradients of an owner from one part of it: written into a zero owner-sized gradient.

An unrolled recurrent layer reads one time step of its input projection per cell (a
``split`` of the gates, then an ``unbind`` over time); each cell's backward turns the
step's gradient into the projection's. That must equal autograd's backward of the alias
calls bit for bit, allocate nothing beside the owner-sized result (what the memory model
charges), and be used only where it is right (no repeated elements, a proper part).
"""
from __future__ import annotations

import torch

from monetdsl.costs.estimated_workspace import StorageTracker
from monetdsl.lowering.graphs import ArgPath, _Adapter, _PartScatter, owner_adapter


def _path(*steps) -> ArgPath:
    return ArgPath("owner", tuple(steps))


SPLIT_THEN_STEP = _path(("call", torch.ops.aten.split.Tensor, (64, 2), {}), ("getitem", 2),
                        ("call", torch.ops.aten.unbind.int, (0,), {}), ("getitem", 5))
LAST_STEP = _path(("call", torch.ops.aten.transpose.int, (0, 1), {}), ("call", torch.ops.aten.select.int, (1, -1), {}))


def _meta(owner: torch.Tensor) -> tuple:
    return tuple(owner.shape), tuple(owner.stride()), owner.dtype, owner.device


def test_a_part_scatters_into_zeros_as_autograd_forms_it():
    owner = torch.randn(32, 8, 192)
    for path in (SPLIT_THEN_STEP, LAST_STEP):
        adapter = owner_adapter(owner, [path])
        assert isinstance(adapter, _PartScatter)
        grad = torch.randn_like(path.materialize(owner))
        expected = _Adapter(_meta(owner), (path,))(grad)
        got = adapter(grad)
        assert got.shape == owner.shape and torch.equal(got, expected)


def test_the_scatter_allocates_its_output_only():
    owner = torch.randn(32, 8, 192)
    grad = torch.randn(8, 64)
    adapter = owner_adapter(owner, [SPLIT_THEN_STEP])
    tracker = StorageTracker()
    with tracker:
        result = adapter(grad)
    assert tracker.peak == result.numel() * result.element_size()
    traced = _Adapter(_meta(owner), (SPLIT_THEN_STEP,))
    traced(grad)  # traced on first use
    tracker = StorageTracker()
    with tracker:
        traced(grad)
    assert tracker.peak > result.numel() * result.element_size(), "the traced form builds pieces of zeros beside it"


def test_whole_views_and_repeated_elements_keep_autograds_backward():
    owner = torch.randn(4, 6)
    whole = _path(("call", torch.ops.aten.t.default, (), {}))
    repeated = _path(("call", torch.ops.aten.select.int, (0, 1), {}), ("call", torch.ops.aten.expand.default, ([3, 6],), {}))
    for path in (whole, repeated):
        adapter = owner_adapter(owner, [path])
        assert isinstance(adapter, _Adapter)
        grad = torch.randn_like(path.materialize(owner))
        leaf = owner.clone().requires_grad_()
        (expected,) = torch.autograd.grad(path.materialize(leaf), leaf, grad)
        assert torch.equal(adapter(grad), expected)
