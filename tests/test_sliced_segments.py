"""Batch-sliced segments: detection, accounting, the searches' optimum and the runtime.

A chain of per-sample ops becomes one op whose ``slicedK`` implementations carry the
memory and time of running the chain ``K`` slices at a time (:mod:`monetdsl.slicing`).
These tests pin which chains are found (VGG-16's blocks; nothing with batch norm), that
the simulator charges exactly the segment's formulas, that the MILP and the hybrid find
the exhaustive optimum of a small graph with a segment, and that the runtime form gives
PyTorch's gradients.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from monetdsl.errors import SpecError
from monetdsl.grammar import load_spec, parse_schedule, parse_spec
from monetdsl.search import simulate, solve
from monetdsl.search.exhaustive import best_within, exhaustive_front
from monetdsl.search.hybrid.engine import _exact_first
from monetdsl.search.outcome import SearchContext
from monetdsl.slicing import Run, blocks, per_sample_runs, segment_costs, sliced_spec
from monetdsl.validate import resolve_constraints
from monetdsl.runtime.sliced_segment import SlicedSegment, slice_bounds

SPECS = Path(__file__).resolve().parent.parent / "specs"

CHAIN = """
network chain
  tensor x f32[8,16] input
  tensor w1 f32[16,16] param
  tensor w2 f32[16,16] param
  tensor w3 f32[16,4] param
  op a (x, w1) -> a f32[8,16] time 4us
    backward reads (grad(a), x) -> grad(w1) time 4us
  op b (a) -> b f32[8,16] time 1us
    backward reads (grad(b), b) -> grad(a) time 1us
  op c (b, w2) -> c f32[8,16] time 4us
    backward wgrad reads (grad(c), b) -> grad(w2) time 4us
    backward dgrad reads (grad(c), w2) -> grad(b) time 4us
  op d (c) -> d f32[8,16] time 1us
    impl plain time 1us
    impl mask -> d.mask u1[8,16] time 1us
    backward reads (grad(d)) -> grad(c)
      impl from_output reads (d) time 1us
      impl from_mask reads (d.mask) time 1us
  op e (d, w3) -> e f32[8,4] time 2us
    backward wgrad reads (grad(e), d) -> grad(w3) time 2us
    backward dgrad reads (grad(e), w3) -> grad(d) time 2us
  op loss (e) -> loss f32[] time 1us
    backward reads (e, grad(loss)) -> grad(e) time 1us
  output loss
"""

SEGMENT = "a..d"


def chain_spec():
    return parse_spec(CHAIN, "chain.monet")


def chain_run() -> Run:
    return Run(("a", "b", "c", "d"), "x", "d", 8)


def test_the_chain_and_vgg_blocks_are_found():
    network = chain_spec().network
    (run,) = per_sample_runs(network)
    assert run.ops == ("a", "b", "c", "d", "e") and run.source == "x"  # the loss reduces the batch
    assert [b.ops for b in blocks(network, run)] == [("a", "b", "c", "d", "e")]
    vgg = load_spec(SPECS / "vgg16_no_segments.monet").network
    first = blocks(vgg, per_sample_runs(vgg)[0])
    assert first[0].ops == tuple(f"features.{i}" for i in range(5)) and first[0].result == "features.4"
    assert first[1].ops == tuple(f"features.{i}" for i in range(5, 10)) and first[1].source == "features.4"


def test_batch_norm_and_its_neighbours_stay_out():
    network = load_spec(SPECS / "small_cnn.monet").network
    runs = per_sample_runs(network)
    for run in runs:
        for name in run.ops:
            assert len(network.op(name).outputs) == 1
            assert not any(impl.recompute_reads for impl in network.op(name).impls)
    inside = {name for run in runs for name in run.ops}
    assert not any(name.startswith("bn") for name in inside)


def _schedule(spec, fwd: str, bwd: str, extra: str = "") -> str:
    body = f'  impl "{SEGMENT}" = {fwd}\n  impl "{SEGMENT}.backward" = {bwd}\n{extra}'
    body += "  forward keep d, e\n  stage loss.backward\n    free e\n  stage e.wgrad\n    free d\n  stage e.dgrad\n"
    body += f'  stage "{SEGMENT}.backward"\n'
    return f'schedule for "chain.monet" fingerprint {spec.fingerprint}\n' + body


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_the_simulator_charges_the_segment_formulas(k):
    base = chain_spec()
    spec = sliced_spec(base, [chain_run()], slice_counts=(1, 2, 4, 8))
    costs = segment_costs(base.network, chain_run(), k)
    rows = 8 // k
    # forward: one slice of a (rows x 16 floats) and of b live at once; backward: every
    # intermediate of the slice (a, b, c, d: 4 x rows x 64 B) + the gradients of c and
    # b flowing through c's backward + the parameters w1 and w2 (1 KiB each) twice: the
    # sums so far and the slice's own (once for a single slice)
    assert costs.forward_workspace == 2 * rows * 64
    assert costs.backward_workspace == 4 * rows * 64 + 2 * rows * 64 + 2 * 1024 * (1 if k == 1 else 2)
    assert costs.forward_us == pytest.approx(10 + (k - 1) * 5 * 4)
    sim = simulate(spec.network, parse_schedule(_schedule(spec, f"sliced{k}", f"sliced{k}")), fingerprint=spec.fingerprint)
    assert sim.valid, [e.format() for e in sim.errors]
    fixed = base.network.fixed_bytes
    # the segment's forward step: d and the workspace; its backward: the loss, the seed,
    # grad(d) and the workspace (parameter gradients accumulated, x has none); the
    # largest other step is e.wgrad: d, the loss, the seed, grad(e), grad(w3)'s temporary
    segment_forward = fixed + 512 + costs.forward_workspace
    segment_backward = fixed + 4 + 4 + 512 + costs.backward_workspace
    assert sim.peak_bytes == max(segment_forward, segment_backward, fixed + 512 + 4 + 4 + 128 + 256)
    assert sim.compute_us == pytest.approx(costs.forward_us + costs.backward_us + 2 + 1 + 1 + 2 + 2)


@pytest.mark.parametrize("method", ["milp", "hybrid"])
def test_the_searches_find_the_exhaustive_optimum_with_a_segment(method):
    spec = sliced_spec(chain_spec(), [chain_run()], slice_counts=(1, 2, 8))
    front = exhaustive_front(spec.network)
    lowest = min(p.peak_bytes for p in front)
    result = solve(spec, method, objective="memory") if method == "milp" else solve(spec, method, memory_budget=lowest)
    assert result.simulation.peak_bytes == lowest
    if method == "milp":  # the MILP's own accounting of the peak is the simulator's
        assert result.details["milp_peak_bytes"] == lowest
        assert result.schedule.impls[SEGMENT + ".backward"] == "sliced8"
    for point in front:
        result = solve(spec, "milp" if method == "milp" else "hybrid", memory_budget=point.peak_bytes, time_limit=30,
                       options={"gap": 0.0} if method == "milp" else None)
        assert result.simulation.compute_us == pytest.approx(best_within(front, point.peak_bytes).compute_us, abs=1e-9)


def test_the_hybrids_least_peak_runs_the_whole_networks_milp_first_only_where_a_segment_is():
    sliced = sliced_spec(chain_spec(), [chain_run()], slice_counts=(1, 2, 8))
    lowest = min(p.peak_bytes for p in exhaustive_front(sliced.network))
    for spec, runs_first in ((sliced, True), (chain_spec(), False)):
        constraints = resolve_constraints(spec.network, spec.constraints)
        ctx = SearchContext("chain.monet", spec.fingerprint, 1.0, "memory", 20.0)
        outcome = _exact_first(spec.network, constraints, ctx)
        assert (outcome is not None) is runs_first
        if runs_first:
            assert outcome.status == "optimal"
            assert simulate(spec.network, outcome.schedule, constraints=constraints).peak_bytes == lowest


def test_slicing_lowers_vgg16s_floor():
    spec = load_spec(SPECS / "vgg16_no_segments.monet")
    first = blocks(spec.network, per_sample_runs(spec.network)[0])[0]
    sliced = sliced_spec(spec, [first])
    costs = segment_costs(spec.network, first, 16)
    two_gib_tensor = spec.network.tensors["features.2"].nbytes
    assert costs.forward_workspace < two_gib_tensor / 4 and costs.backward_workspace < two_gib_tensor / 2
    assert "features.2" not in sliced.network.tensors and "features.4" in sliced.network.tensors


def test_bad_segments_are_refused():
    spec = chain_spec()
    with pytest.raises(SpecError, match="overlap"):
        sliced_spec(spec, [chain_run(), Run(("d", "e"), "c", "e", 8)])
    with pytest.raises(SpecError, match="loss cannot be part"):
        sliced_spec(spec, [Run(("e", "loss"), "d", "loss", 8)])
    with pytest.raises(SpecError, match="cannot run in 16 slices"):
        segment_costs(spec.network, chain_run(), 16)


def _vgg_block() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2))


@pytest.mark.parametrize("forward_slices, backward_slices", [(1, 1), (2, 3), (4, 6), (6, 1)])
def test_the_runtime_gives_pytorchs_gradients(forward_slices, backward_slices):
    torch.manual_seed(0)
    block, head = _vgg_block(), nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    twin = _vgg_block()
    twin.load_state_dict(block.state_dict())
    x = torch.randn(6, 3, 12, 12, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    sliced = nn.Sequential(SlicedSegment(block, forward_slices, backward_slices), head)
    out = sliced(x)
    loss = out.square().sum()
    loss.backward()
    head_grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    reference = nn.Sequential(twin, head)(x_twin)
    torch.testing.assert_close(out, reference)
    reference.square().sum().backward()
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(block.parameters(), twin.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-5)
    for mine, p in zip(head_grads, head.parameters()):
        torch.testing.assert_close(mine, p.grad, rtol=1e-5, atol=1e-5)


def test_slices_and_refusals():
    assert slice_bounds(6, 4) == [(0, 2), (2, 4), (4, 6)]
    assert slice_bounds(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError):
        slice_bounds(4, 5)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        SlicedSegment(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))


@pytest.fixture(scope="module")
def allocator():
    from monetdsl.costs.cpu_allocator import BuildError, counter

    try:
        return counter()
    except BuildError as exc:  # pragma: no cover - no compiler here
        pytest.skip(f"allocator counter unavailable: {exc}")


@functools.lru_cache(maxsize=1)
def _traced_block(batch: int):
    from monetdsl.runtime.plan import trace_for_runtime

    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2))
    x = torch.randn(batch, 3, 32, 32)
    network = trace_for_runtime(block, [x], optimizer="sgd").spec.network
    (run,) = blocks(network, per_sample_runs(network)[0])
    return block, x, network, run


def _scratch_at(block, x, rows: int, allocator) -> dict[str, int]:
    """Each op's forward allocation beyond its output, on real tensors of ``rows`` samples
    (oneDNN's convolution takes an output-sized buffer on this CPU; the traced spec,
    measured on FakeTensors, does not see it)."""
    scratch, t = {}, x[:rows]
    with torch.no_grad():
        for i, module in enumerate(block):
            base = allocator.current()
            allocator.reset_peak()
            y = module(t)
            scratch[str(i)] = allocator.peak() - base - y.numel() * y.element_size()
            t = y
    return scratch


@pytest.mark.parametrize("slices", [2, 4, 8])
def test_the_allocator_holds_what_the_segment_plans(slices, allocator):
    from dataclasses import replace

    block, x, network, run = _traced_block(16)
    rows = -(-16 // slices)
    scratch = _scratch_at(block, x, rows, allocator)

    def measured_scratch(op, impl):  # derived tensors (max-pool's indices) are counted apart
        if op.name not in scratch or impl is not op.impls[0]:
            return impl
        derived = sum(network.tensors[d].nbytes for d in impl.derived) * rows // 16
        return replace(impl, workspace=max(0, scratch[op.name] - derived))

    planned = segment_costs(network.with_impls(measured_scratch), run, slices)
    for p in block.parameters():
        p.grad = torch.zeros_like(p)
    segment = SlicedSegment(block, slices, slices)
    base = allocator.current()
    allocator.reset_peak()
    y = segment(x)
    assert allocator.peak() - base == y.numel() * 4 + planned.forward_workspace
    grad = torch.randn_like(y)
    base = allocator.current()
    allocator.reset_peak()
    y.backward(grad)
    measured = allocator.peak() - base
    bound = segment_costs(network, run, slices).backward_workspace
    assert measured <= bound <= 1.4 * measured  # an upper bound, and a close one


def test_the_slice_command_writes_a_spec_that_checks(tmp_path, capsys):
    from monetdsl.cli import main

    out = tmp_path / "vgg.sliced.monet"
    assert main(["slice", str(SPECS / "vgg16_no_segments.monet"), "-o", str(out)]) == 0
    sliced = load_spec(out)
    segment = sliced.network.op("features.0..features.4")
    assert segment.impl_names == ("sliced4", "sliced8", "sliced16", "sliced32")  # narrower than the block's 4.2 GiB step
    assert main(["check", str(out)]) == 0
    assert main(["slice", str(SPECS / "vgg16_no_segments.monet"), "--segments", "features.5..features.9", "--slices", "8,16",
                 "-o", str(out)]) == 0
    assert load_spec(out).network.op("features.5..features.9").impl_names == ("sliced8", "sliced16")
    capsys.readouterr()
    assert main(["slice", str(SPECS / "vgg16_no_segments.monet"), "--segments", "features.4..features.2"]) == 2
    assert "not a chain of per-sample ops" in capsys.readouterr().err
    assert main(["slice", str(SPECS / "vgg16_no_segments.monet"), "--slices", "0"]) == 2
    assert main(["slice", str(SPECS / "vgg16_no_segments.monet"), "--allowance", "1%"]) == 2


def test_only_blocks_that_set_the_floor_are_chosen():
    from monetdsl.search.impl_choice import no_recompute_compute_us
    from monetdsl.slicing import widest_blocks

    vgg = load_spec(SPECS / "vgg16_no_segments.monet").network
    baseline = no_recompute_compute_us(vgg)
    # the first block's forward is 5 % of the step: it fits 10 %, the second block does not fit beside it
    assert [run.ops[0] for run in widest_blocks(vgg, 0.10 * baseline)] == ["features.0"]
    assert widest_blocks(vgg, 0.04 * baseline) == []
    # a batch norm between convolutions is as wide as any block: nothing is worth slicing
    small = load_spec(SPECS / "small_cnn.monet").network
    assert widest_blocks(small, no_recompute_compute_us(small)) == []


def test_the_shipped_vgg16_is_its_op_by_op_spec_with_the_widest_segments():
    from monetdsl.grammar.printer import format_spec
    from monetdsl.slicing import with_widest_segments

    shipped = load_spec(SPECS / "vgg16.monet")
    sliced, runs = with_widest_segments(load_spec(SPECS / "vgg16_no_segments.monet"))
    assert [run.ops[0] for run in runs] == ["features.0"]
    assert format_spec(shipped).replace("vgg16", "?") == format_spec(sliced).replace("vgg16_no_segments", "?")
    unchanged, none = with_widest_segments(load_spec(SPECS / "small_cnn.monet"))
    assert none == [] and format_spec(unchanged) == format_spec(load_spec(SPECS / "small_cnn.monet"))


TINY_VGG = """
import torch.nn as nn


def tiny_vgg():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(32, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                         nn.Linear(256 * 4 * 4, 10))
"""


def test_trace_writes_the_widest_blocks_as_segments_unless_told_not_to(tmp_path, monkeypatch):
    from monetdsl.cli import main
    from monetdsl.slicing.choice import _op_width

    (tmp_path / "tiny_vgg_model.py").write_text(TINY_VGG)
    monkeypatch.chdir(tmp_path)
    args = ["trace", "tiny_vgg_model:tiny_vgg", "--input", "16x3x128x128", "--device", "P100"]
    assert main([*args, "-o", "sliced.monet"]) == 0
    assert main([*args, "--no-segments", "-o", "plain.monet"]) == 0
    sliced, plain = load_spec(tmp_path / "sliced.monet"), load_spec(tmp_path / "plain.monet")
    # the two stages at 128x128 and 64x64 are wider than the 16x16 stage; their forwards fit 10 %
    assert "# batch-sliced segments: 0..4, 5..7 " in (tmp_path / "sliced.monet").read_text()
    assert sliced.network.op("0..4").impl_names[0].startswith("sliced") and not sliced.network.has_op("0")
    assert plain.network.has_op("0") and not plain.network.has_op("0..4")
    # op 2 holds its 128x128 input and output at once in every schedule of the op-by-op spec
    floor = plain.network.fixed_bytes + _op_width(plain.network, plain.network.op("2"))
    least = solve(sliced, "milp", objective="memory", time_limit=30, options={"gap": 0.0})
    assert least.status == "optimal" and least.simulation.peak_bytes < floor
    assert main(["check", str(tmp_path / "sliced.monet")]) == 0
