"""``monetdsl.optimize`` runs batch-sliced segments under a budget.

A VGG-style model (conv-relu-conv-relu-pool blocks, the first block the widest and, with
deeper later blocks, a small share of the step's time, as in VGG-16) planned with a
budget below what running its ops one by one can reach: the plan slices the first block
(a ``slicedK`` implementation), gives eager PyTorch's gradients, and the allocator's peak
stays within the plan. ``segments=False`` plans every op on its own.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import monetdsl
from monetdsl.errors import OptionError, SolveError
from monetdsl.search.simulator import chosen_impls
from monetdsl.models import tiny_vgg
from monetdsl.slicing import is_segment, op_by_op_bound, slice_count

BATCH = 8


def _segments(plan) -> dict[str, tuple[int, int]]:
    """Segment op -> (forward K, backward K) of the plan's schedule."""
    network = plan.spec.network
    impls = chosen_impls(network, plan.schedule)
    return {op.name: (slice_count(impls[op.name]), slice_count(impls[f"{op.name}.backward"]))
            for op in network.forward_ops if is_segment(op)}


def _eager_grads(model_factory, x) -> list[torch.Tensor]:
    reference = model_factory()
    reference(x).square().mean().backward()
    return [p.grad for p in reference.parameters()]


def _assert_same_grads(model, expected, rtol):
    for (name, p), g in zip(model.named_parameters(), expected):
        scale = g.abs().max().item()
        assert (p.grad - g).abs().max().item() <= rtol * scale, name


@pytest.mark.slow
def test_a_budget_below_the_op_by_op_floor_runs_the_first_block_in_slices(tmp_path):
    """Measured costs (the default): the budget is below what any op-by-op schedule holds,
    so only the segment makes it; the allocator's peak is the plan's, within 5 %. (About
    a minute on a loaded 2-core machine: every op is measured in a fresh store.)"""
    x = torch.randn(BATCH, 3, 32, 32)
    model = tiny_vgg()
    full = monetdsl.optimize(model, x, method="store-all", cache_dir=tmp_path).plans[0]
    fixed = full.simulation.fixed_bytes
    floor = op_by_op_bound(full.spec.network)
    assert not any(is_segment(op) for op in full.spec.network.forward_ops)  # nothing to slice without a budget
    budget = fixed + int(floor * 0.97)
    optimized = monetdsl.optimize(model, x, budget=budget, time_limit=10, cache_dir=tmp_path)
    plan = optimized.plans[0]
    assert list(_segments(plan)) == ["0..4"]
    assert plan.planned_peak <= budget
    assert op_by_op_bound(plan.trace.built.network) == floor  # the ops one by one could not have met it
    measured = monetdsl.measure(optimized, x, probe="allocator", repeats=2)
    assert measured.ratio <= 1.05, measured.summary()
    model.zero_grad(set_to_none=True)
    optimized(x).square().mean().backward()
    _assert_same_grads(model, _eager_grads(tiny_vgg, x), rtol=1e-3)


@pytest.fixture(scope="module")
def float64_case():
    x = torch.randn(BATCH, 3, 32, 32, dtype=torch.float64)
    model = tiny_vgg(torch.float64)
    full = monetdsl.optimize(model, x, method="store-all", cache_dir=None, profile=False).plans[0]
    # above the proved op-by-op bound but below what op-by-op schedules reach: the plan is
    # tried op by op first and made with the segment when that finds no schedule
    budget = full.simulation.fixed_bytes + int(1.3 * op_by_op_bound(full.spec.network))
    return model, x, budget, full.planned_peak


def test_sliced_steps_give_eager_gradients_exactly(float64_case):
    """In float64 the slices' sums of parameter gradients equal the whole batch's up to
    rounding, through optimizer-free repeated steps (.grad accumulated across two calls)."""
    model, x, budget, _ = float64_case
    optimized = monetdsl.optimize(model, x, budget=budget, time_limit=5, cache_dir=None, profile=False)
    (forward_k, backward_k), = _segments(optimized.plans[0]).values()
    assert forward_k >= 1 and backward_k >= 1
    model.zero_grad(set_to_none=True)
    for _ in range(2):  # the second step adds into .grad
        optimized(x).square().mean().backward()
    expected = [2 * g for g in _eager_grads(lambda: tiny_vgg(torch.float64), x)]
    _assert_same_grads(model, expected, rtol=1e-10)


def test_a_budget_store_all_meets_slices_nothing(float64_case):
    """Store-all fits: nothing needs recomputing, and a segment would recompute its block."""
    model, x, _, store_all_peak = float64_case
    optimized = monetdsl.optimize(model, x, budget=store_all_peak, time_limit=5, cache_dir=None, profile=False)
    assert not _segments(optimized.plans[0])


def test_a_budget_the_ops_one_by_one_meet_slices_nothing(float64_case):
    """Half of store-all's activations: an op-by-op schedule meets it, and a segment would
    pay Python per slice and recompute its block at every step."""
    model, x, _, store_all_peak = float64_case
    fixed = monetdsl.optimize(model, x, method="store-all", cache_dir=None, profile=False).plans[0].simulation.fixed_bytes
    budget = fixed + (store_all_peak - fixed) // 2
    optimized = monetdsl.optimize(model, x, budget=budget, time_limit=5, cache_dir=None, profile=False)
    assert not _segments(optimized.plans[0])
    assert optimized.plans[0].planned_peak <= budget


def test_segments_false_plans_every_op_on_its_own(float64_case):
    """The budget the segment meets: op by op the search finds no schedule, and says so."""
    model, x, budget, _ = float64_case
    with pytest.raises(SolveError, match="no schedule fits the budget"):
        monetdsl.optimize(model, x, budget=budget, time_limit=5, cache_dir=None, profile=False, segments=False)


def test_segments_must_be_a_flag():
    with pytest.raises(OptionError, match="segments"):
        monetdsl.optimize(nn.Linear(2, 2), segments="yes")
    with pytest.raises(OptionError, match="segments"):
        monetdsl.backend(segments=1)
