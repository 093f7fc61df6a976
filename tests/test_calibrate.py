"""In-place calibration of profiled step times (monetdsl.runtime.calibrate)."""
from __future__ import annotations

import time

import pytest
import torch

from monetdsl.graph import index
from monetdsl.runtime.calibrate import CALIBRATION_NOTE, MAX_ROUNDS, ROUNDS_SECONDS, _timed_steps, calibrate, calibration_schedules
from monetdsl.runtime.plan import trace_for_runtime
from monetdsl.search.simulator import chosen_impls, simulate

from .runtime_helpers import patch_dropout
from .runtime_models import KindsCNN


@pytest.fixture(scope="module")
def profiled():
    torch.manual_seed(0)
    model = KindsCNN().train()
    x = torch.randn(4, 3, 16, 16)
    return model, x, trace_for_runtime(model, [x], optimizer="sgd", profile=True)


def test_calibration_schedules_are_valid_keep_what_backward_reads_and_run_several_implementations_of_every_op(profiled):
    _, _, trace = profiled
    network = trace.spec.network
    idx = index(network)
    found = calibration_schedules(network, trace.spec.fingerprint)
    assert len(found) >= 2
    run = set()
    for _, schedule in found:
        sim = simulate(network, schedule)
        assert sim.ok
        impls = chosen_impls(network, schedule)
        run |= set(impls.items())
        # without an in-place forward (which makes the builder recompute what it
        # overwrote), every forward tensor a chosen backward implementation reads is kept
        in_place = any(op.impl(impls[op.name]).overwrites for op in network.forward_ops)
        assert in_place or sim.recompute_us == 0
        for bop in network.backward_ops if not in_place else ():
            reads = {r for r in bop.impl(impls[bop.name]).reads if idx.is_forward_tensor(r)}
            assert reads <= set(schedule.forward_keep) | set(network.outputs)
    for op in [*network.forward_ops, *network.backward_ops]:
        assert (op.name, op.impls[0].name) in run  # PyTorch's own implementation of every op is timed in place
        if len(op.impls) > 1:
            assert any((op.name, i.name) in run for i in op.impls[1:]), op.name  # and one other at least


def test_calibrate_sets_in_place_medians_scales_the_rest_and_leaves_the_model_untouched(profiled):
    model, x, trace = profiled
    for p in model.parameters():
        p.grad = None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    rng = torch.random.get_rng_state()
    result = calibrate(model, [x], trace, optimizer="sgd", rounds=2)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics restored
    assert not model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    old, new = trace.spec.network, result.trace.spec.network
    assert result.trace.spec.fingerprint == trace.spec.fingerprint  # the same graph, other times
    assert CALIBRATION_NOTE in result.trace.cost_model and CALIBRATION_NOTE in result.trace.text()
    assert result.measured > 0 and result.measured == len(result.in_place)
    ratios = {}
    for (op_name, impl_name), median in result.in_place.items():
        assert new.op(op_name).impl(impl_name).time_us == pytest.approx(median)
        ratios.setdefault(op_name, []).append(median / old.op(op_name).impl(impl_name).time_us)
    scaled = 0
    for op in [*old.forward_ops, *old.backward_ops]:
        for impl in op.impls:
            if (op.name, impl.name) in result.in_place or op.name not in ratios:
                continue
            scaled += 1
            factor = sorted(ratios[op.name])[len(ratios[op.name]) // 2] if len(ratios[op.name]) % 2 else None
            if factor is not None:
                assert new.op(op.name).impl(impl.name).time_us == pytest.approx(impl.time_us * factor)
    assert scaled == result.scaled


def test_a_schedule_solved_on_calibrated_times_trains_like_eager(profiled):
    import monetdsl
    from monetdsl import solve

    model, x, trace = profiled
    calibrated = calibrate(model, [x], trace, optimizer="sgd", rounds=1).trace
    found = solve(calibrated.spec, "milp", max_overhead=0.2, objective="memory", time_limit=30)
    assert found.success and found.simulation.ok
    reference = KindsCNN().train()
    reference.load_state_dict(model.state_dict())
    patch_dropout(reference, found.schedule.impls)  # the least-memory dropout may be the seeded one (its own masks)
    torch.manual_seed(3)
    reference(x).square().sum().backward()
    model.train()  # an earlier test leaves it in eval mode, which the optimized module follows
    optimized = monetdsl.optimize(model, schedule=found.schedule)
    optimized.plan_for(x, trace=calibrated)
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(3)
    optimized(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m} (impls {found.schedule.impls})")


@pytest.mark.parametrize("name", ["small_cnn", "tiny_gpt", "transformer_block"])
def test_calibration_runs_every_implementation_that_pinning_one_side_at_a_time_would_with_no_more_schedules(name):
    """What pinning the k-th implementation of every forward op, then of every backward op,
    would time in place, the calibration schedules time too, in no more schedules."""
    from pathlib import Path

    from monetdsl.grammar import load_spec
    from monetdsl.runtime.calibrate import store_all_schedule
    from monetdsl.search.impl_choice import cheapest_impls

    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / f"{name}.monet")
    network = spec.network
    run = set()
    found = calibration_schedules(network, spec.fingerprint)
    for _, schedule in found:
        run |= set(chosen_impls(network, schedule).items())
    one_side = []
    ops = [*network.forward_ops, *network.backward_ops]
    for k in range(max(len(op.impls) for op in ops)):
        for group in (network.forward_ops, network.backward_ops):
            pins = {op.name: (op.impls[k].name,) for op in group if len(op.impls) > k}
            impls = cheapest_impls(network, pins)
            if pins and store_all_schedule(network, impls, spec.fingerprint) is not None:
                one_side.append(impls)
    assert set().union(*(set(impls.items()) for impls in one_side)) <= run
    assert len(found) <= len({tuple(sorted(i.items())) for i in one_side}) + 1  # + the fastest implementations


class _Slow(torch.nn.Module):
    """A step that takes longer than the calibration's time for extra rounds."""

    def __init__(self, seconds: float):
        super().__init__()
        self.linear, self.seconds = torch.nn.Linear(4, 4), seconds

    def forward(self, x):
        time.sleep(self.seconds)
        return self.linear(x)


def test_calibration_times_small_models_for_more_rounds():
    """A model whose steps are short is timed for more rounds than asked (never more than
    the most allowed); one whose single step outlasts the time for extra rounds gets the
    rounds asked, so large models plan no slower. The warm-up step is never counted."""
    x = torch.randn(2, 4)
    fast = torch.nn.Linear(4, 4)
    warmed = []
    walls = _timed_steps(fast, [x], 1, lambda: None, lambda: warmed.append(True))
    assert warmed == [True] and 1 < len(walls) <= MAX_ROUNDS
    assert len(_timed_steps(fast, [x], 3, lambda: None, most=3)) == 3
    slow = _Slow(ROUNDS_SECONDS)
    assert len(_timed_steps(slow, [x], 2, lambda: None)) == 2


@pytest.fixture(scope="module")
def repeated_layers(tmp_path_factory):
    """A traced network of repeated identical layers and its ops' signatures."""
    from monetdsl.costs import MeasurementStore, measured_report

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[m for _ in range(4) for m in (torch.nn.Linear(32, 32), torch.nn.ReLU())])
    store = MeasurementStore(tmp_path_factory.mktemp("store"))
    plain = trace_for_runtime(model, [torch.randn(8, 32)], optimizer="sgd", store=store, estimate_workspaces=False)
    trace, report = measured_report(plain, "cpu", store)
    return trace.spec, report.signatures


def _run_by_key(network, found, groups):
    from monetdsl.runtime.calibrate import pooling_keys

    keys = pooling_keys(network, groups)
    return [{(keys[op], impl) for op, impl in chosen_impls(network, schedule).items()} for _, schedule in found]


def test_grouped_ops_time_several_implementations_in_one_step_and_no_fewer(repeated_layers):
    """Ops of one signature are pinned to different implementations not run yet, so every
    (signature, implementation) pair the ungrouped schedules time is timed, in fewer
    schedules; every schedule is a valid store-all."""
    spec, groups = repeated_layers
    network = spec.network
    assert len(set(groups.values())) < len(network.forward_ops)  # the layers repeat
    plain = calibration_schedules(network, spec.fingerprint)
    grouped = calibration_schedules(network, spec.fingerprint, groups)
    assert all(simulate(network, schedule).ok for _, schedule in grouped)
    assert set().union(*_run_by_key(network, plain, groups)) <= set().union(*_run_by_key(network, grouped, groups))
    assert len(grouped) < len(plain)
    mixed = [s for _, s in grouped if len({(groups[op.name], s.impls.get(op.name)) for op in network.forward_ops})
             > len({groups[op.name] for op in network.forward_ops})]
    assert mixed  # some step runs two implementations of one signature


def test_a_schedule_timing_few_new_pairs_is_left_out(repeated_layers):
    """With ``least_new``, every schedule but the first and the fastest times at least that
    share of the (signature, implementation) pairs for the first time, and what it leaves
    out is what the schedules without it time besides."""
    from monetdsl.runtime.calibrate import pooling_keys

    spec, groups = repeated_layers
    network = spec.network
    keys = pooling_keys(network, groups)
    total = len({(keys[op.name], i.name) for op in [*network.forward_ops, *network.backward_ops] for i in op.impls})
    every = calibration_schedules(network, spec.fingerprint, groups)
    new_counts = []
    seen: set = set()
    for run in _run_by_key(network, every, groups):
        new_counts.append(len(run - seen))
        seen |= run
    share = (sorted(c for c in new_counts[1:] if c)[0] + 0.5) / total  # leaves out the schedule timing fewest
    found = calibration_schedules(network, spec.fingerprint, groups, least_new=share)
    assert len(found) < len(every)
    seen = set()
    for (label, _), run in zip(found, _run_by_key(network, found, groups)):
        if seen and label != "the fastest implementations":
            assert len(run - seen) >= share * total
        seen |= run
