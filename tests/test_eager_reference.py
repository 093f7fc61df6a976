"""Overhead caps against eager PyTorch's step (monetdsl.runtime.eager_reference)."""
from __future__ import annotations

import copy

import warnings

import pytest
import torch

import monetdsl
from monetdsl.costs import MeasurementStore
from monetdsl.runtime import schedule_cache
from monetdsl.runtime.eager_reference import (EAGER_MARGIN, REFERENCE_MIN_SECONDS, REFERENCE_MOST, REFERENCE_ROUNDS,
                                              REFERENCE_SECONDS, EagerReference, _key, _pairs_key, eager_reference,
                                              enough_pairs, measure_reference, reference_of)

from .runtime_models import KindsCNN


@pytest.mark.parametrize("ratio", [0.5, 0.9, 1.0, 1.04, 1.1, 1.3])
@pytest.mark.parametrize("cap", [0.0, 0.05, 0.1, 0.5])
def test_the_search_cap_keeps_eager_relative_time_within_the_cap_and_never_loosens_it(ratio, cap):
    allowed = EagerReference(1000.0, 1000.0 * ratio).search_cap(cap)
    if ratio > 1 + cap + 1e-12:
        assert allowed is None  # even the runtime's store-all is over the cap
    elif (1 + cap) / ratio - 1 < EAGER_MARGIN:
        assert allowed is None  # it fits by less than the ratio's measurement resolves: eager, whatever the load
    else:
        assert 0 <= allowed <= cap
        assert (1 + allowed) * ratio <= 1 + cap + 1e-12  # planned time against eager's
        if ratio >= 1:
            assert allowed == pytest.approx((1 + cap) / ratio - 1)


def test_the_pairs_stop_when_the_ratio_is_known_and_never_on_one_pair():
    steady = [1.10, 1.105, 1.098]
    noisy = [1.0, 1.3, 0.9, 1.25]
    later = REFERENCE_MIN_SECONDS + 0.1
    assert not enough_pairs(steady[:2], later)  # two pairs say nothing of the spread
    assert enough_pairs(steady, later)
    assert not enough_pairs(steady, REFERENCE_MIN_SECONDS / 2)  # short steps: more pairs, however steady
    assert not enough_pairs(steady * 10, REFERENCE_MIN_SECONDS / 2)
    assert enough_pairs([1.1] * REFERENCE_MOST, REFERENCE_MIN_SECONDS / 2)  # ... up to the most pairs
    assert not enough_pairs(noisy, later)  # the interval is wider than the tolerance
    assert enough_pairs(noisy * 3, later)  # ... until the round count is reached
    assert len(noisy * 3) >= REFERENCE_ROUNDS
    assert not enough_pairs(noisy[:1], REFERENCE_SECONDS + 1)  # out of time, but one pair is no ratio
    assert enough_pairs(noisy[:2], REFERENCE_SECONDS + 1)


def test_measuring_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = KindsCNN().train()
    x = torch.randn(4, 3, 16, 16)
    fast = monetdsl.optimize(model, x, method="store-all")
    plan = fast.plans[0]
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    reference = measure_reference(model, [x], plan.trace, plan.spec, optimizer="adam", rounds=2)
    assert reference.eager_us > 0 and reference.runtime_us > 0 and reference.runtime_over_eager > 0
    assert not model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng)


def _with_stored_ratio(tmp_path, ratio: float, cap: float):
    """Plan once (measuring the reference into ``tmp_path``), store ``ratio`` as the
    measured one, and plan again as a new process would, with ``cap``."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    first = monetdsl.optimize(KindsCNN().train(), x, max_overhead=cap, cache_dir=tmp_path).plans[0]
    store = MeasurementStore(tmp_path)
    key = _key(first.trace, first.spec, "cpu")
    assert store.get(key) is not None  # measured and kept by the first plan
    store.put(key, {"eager_us": 1000.0, "runtime_us": 1000.0 * ratio, "ratio": ratio})
    assert eager_reference(None, [x], first.trace, first.spec, optimizer="adam", store=store).runtime_over_eager == ratio
    schedule_cache.forget()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = monetdsl.optimize(KindsCNN().train(), x, max_overhead=cap, cache_dir=tmp_path).plans[0]
    return plan, [w for w in caught if issubclass(w.category, monetdsl.CapWarning)]


def test_a_cap_the_runtime_cannot_keep_against_eager_trains_as_eager_and_says_so(tmp_path, monkeypatch):
    plan, warned = _with_stored_ratio(tmp_path, 1.5, 0.2)
    assert len(warned) == 1 and "x1.50 of eager" in str(warned[0].message) and "runs as eager" in str(warned[0].message)
    assert warned[0].filename == __file__  # the user's call, not monetdsl's internals
    assert plan.simulation.recompute_us == 0 and not any(stage.recompute for stage in plan.schedule.stages)
    network = plan.spec.network
    assert plan.runs_eager and all(plan.schedule.impls.get(op.name, op.impls[0].name) == op.impls[0].name
                                   for op in (*network.forward_ops, *network.backward_ops))
    # the step is the model's own: the runtime's executor never runs, and gradients are eager's
    from monetdsl.runtime import module as runtime_module

    monkeypatch.setattr(runtime_module.OptimizedModule, "_forward_pass", None)
    torch.manual_seed(0)
    model, x = KindsCNN().train(), torch.randn(4, 3, 16, 16)
    reference = copy.deepcopy(model)
    schedule_cache.forget()
    optimized = monetdsl.optimize(model, x, max_overhead=0.2, cache_dir=tmp_path)
    torch.manual_seed(1)
    optimized(x).sum().backward()
    torch.manual_seed(1)
    reference(x).sum().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_a_cap_is_tightened_by_the_runtimes_ratio_to_eager(tmp_path, monkeypatch):
    from monetdsl.planning import schedules

    asked = []
    solve = schedules.solve

    def recording(spec, method, **options):
        asked.append(options.get("max_overhead"))
        return solve(spec, method, **options)

    monkeypatch.setattr(schedules, "solve", recording)
    # the solved schedule's own step is timed against eager's before use (cap_check); here
    # it measures as planned, so what is tested is the cap the search gets
    from monetdsl.runtime import cap_check

    monkeypatch.setattr(cap_check, "time_against_eager", lambda model, inputs, trace, schedule, *, optimizer:
                        EagerReference(1000.0, 1000.0 * 1.1 * (1 + asked[-1]), None))
    plan, warned = _with_stored_ratio(tmp_path, 1.1, 0.3)
    assert not warned
    assert asked[-1] == pytest.approx(1.3 / 1.1 - 1, abs=1e-6)
    assert plan.simulation.overhead <= 1.3 / 1.1 - 1 + 1e-6


def test_the_fastest_step_of_each_side_makes_the_reference():
    pairs = [(0.010, 0.013), (0.030, 0.011), (0.012, 0.050)]  # a loaded machine slows either side at random
    reference = reference_of(pairs)
    assert reference.eager_us == pytest.approx(10_000.0) and reference.runtime_us == pytest.approx(11_000.0)
    assert reference.runtime_over_eager == pytest.approx(1.1)


def test_a_calibrated_plan_takes_its_reference_from_the_calibration_steps(tmp_path, monkeypatch):
    """The calibration's eager pairs (its store-all of the fastest implementations against
    eager), scaled by the planned compute of the fastest store-all the plan's pins allow
    over the timed one's: no lowering and no steps of the reference's own. (Pairs timed
    on what the calibrated costs no longer find fastest are not kept: next test.)"""
    from monetdsl.runtime import eager_reference as reference_module
    from monetdsl.runtime.calibrate import EagerPairs, store_all_schedule
    from monetdsl.runtime.eager_reference import keep_calibration_pairs
    from monetdsl.search.impl_choice import cheapest_impls
    from monetdsl.search.simulator import simulate
    from monetdsl.validate import resolve_constraints

    def no_steps(*args, **kwargs):
        raise AssertionError("the reference timed steps of its own")

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    model = KindsCNN().train()
    plan = monetdsl.optimize(model, x, max_overhead=0.3, cache_dir=tmp_path / "plan").plans[0]
    network, fingerprint = plan.trace.spec.network, plan.trace.spec.fingerprint
    store = MeasurementStore(tmp_path / "reference")
    keep_calibration_pairs(store, plan.trace, "cpu", EagerPairs([(0.010, 0.012), (0.011, 0.0125)], cheapest_impls(network)))
    pairs = store.get(_pairs_key(plan.trace, "cpu"))
    assert pairs is not None and pairs["ratio"] == pytest.approx(1.2)
    monkeypatch.setattr(reference_module, "measure_reference", no_steps)
    reference = eager_reference(model, [x], plan.trace, plan.spec, optimizer="adam", store=store)
    kept = store.get(_key(plan.trace, plan.spec, "cpu"))
    allowed = resolve_constraints(network, plan.spec.constraints).allowed_impls  # the plan's pins (dropout's masks)
    pinned = simulate(network, store_all_schedule(network, cheapest_impls(network, allowed), fingerprint)).compute_us
    assert pairs["planned_us"] > 0
    assert reference.runtime_over_eager == kept["ratio"] == pytest.approx(pairs["ratio"] * pinned / pairs["planned_us"])
    assert kept["runtime_us"] == pytest.approx(pairs["runtime_us"] * pinned / pairs["planned_us"])


def test_calibration_pairs_timed_on_other_implementations_than_the_calibrated_fastest_are_not_kept(tmp_path):
    """The calibration times its fastest store-all on the costs measured alone; where the
    calibrated costs pick other implementations (a stretch's savings), those pairs time
    another baseline (other implementations cut the stretch) and the reference is
    measured on the calibrated fastest instead."""
    from monetdsl.runtime.calibrate import EagerPairs
    from monetdsl.runtime.eager_reference import keep_calibration_pairs
    from monetdsl.search.impl_choice import cheapest_impls

    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    plan = monetdsl.optimize(KindsCNN().train(), x, method="store-all", cache_dir=tmp_path / "plan").plans[0]
    network = plan.trace.spec.network
    fastest = cheapest_impls(network)
    other = next((op.name, impl.name) for op in (*network.forward_ops, *network.backward_ops) for impl in op.impls
                 if impl.name != fastest[op.name])
    pairs = [(0.010, 0.011), (0.010, 0.012)]
    for impls, kept in ((fastest, True), ({**fastest, other[0]: other[1]}, False)):
        store = MeasurementStore(tmp_path / str(kept))
        keep_calibration_pairs(store, plan.trace, "cpu", EagerPairs(list(pairs), dict(impls)))
        assert (store.get(_pairs_key(plan.trace, "cpu")) is not None) is kept
