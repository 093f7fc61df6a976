"""Chen greedy, revolve, Checkmate's LP rounding and the carry-plan builder."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monetdsl.grammar import load_spec
from monetdsl.grammar.parser import parse_schedule, parse_spec
from monetdsl.graph import checkpoint_candidates, index
from monetdsl.search.baselines import store_all
from monetdsl.search.carry_plan import schedule_from_carry
from monetdsl.search.chen import chen_greedy, greedy_checkpoints
from monetdsl.search.impl_choice import cheapest_impls
from monetdsl.search.revolve import advances, revolve_schedule, revolve_timeline
from monetdsl.search.simulator import simulate
from monetdsl.search.solve import solve
from monetdsl.synth import random_spec, resnet_stack
from monetdsl.validate import resolve_constraints


def test_revolve_counts_match_the_binomial_rule():
    # Griewank and Walther: with s slots and r advances of each step, a uniform chain of up
    # to C(s + r, s) steps can be reversed; one slot reverses l steps in l(l+1)/2 - 1 + ...
    assert advances(1, 0) == 1
    assert advances(4, 0) == 4 + 3 + 2 + 1  # no slot: every reversal advances from the start
    assert advances(4, 3) == 4 + 3  # enough slots: store everything, then one advance each
    for l in range(1, 12):
        for s in range(0, 5):
            assert advances(l, s + 1) <= advances(l, s)  # a slot never hurts


def test_revolve_timeline_reverses_every_segment_once_with_at_most_s_checkpoints():
    for l in range(1, 10):
        for s in range(0, 4):
            timeline = revolve_timeline(l, s)
            assert [j for j, _ in timeline] == list(range(l, 0, -1))
            for j, held in timeline:
                assert 0 in held and len(held) <= s + 1
                assert max(held) < j  # a checkpoint below the segment being reversed


def test_revolve_trades_memory_for_compute_on_a_chain():
    spec = parse_spec(resnet_stack(3))
    net = spec.network
    impls = cheapest_impls(net)
    m = len(checkpoint_candidates(net))
    sims = [simulate(net, revolve_schedule(net, impls, s, spec_path="x", fingerprint=spec.fingerprint)) for s in range(m + 1)]
    assert all(sim.valid for sim in sims)
    assert sims[0].compute_us > sims[-1].compute_us  # no slot recomputes most
    assert sims[0].peak_bytes < sims[-1].peak_bytes  # and needs least memory


def test_chen_greedy_thresholds():
    from pathlib import Path

    spec = load_spec(str(Path(__file__).resolve().parent.parent / "specs" / "resblock.monet"))
    net = spec.network
    impls = cheapest_impls(net)
    candidates = checkpoint_candidates(net)
    assert greedy_checkpoints(net, impls, 0) == candidates  # every candidate exceeds 0 bytes
    assert greedy_checkpoints(net, impls, 10**15) == ()
    ceiling = simulate(net, store_all(net, None, spec_path="x", fingerprint=spec.fingerprint)).peak_bytes
    cons = resolve_constraints(net, spec.constraints, memory_budget=ceiling)
    sim = simulate(net, chen_greedy(net, cons, spec_path="x", fingerprint=spec.fingerprint), constraints=cons)
    assert sim.ok  # within the store-all peak (the block has one articulation tensor, its sum)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), forward_ops=st.integers(2, 6))
def test_every_method_is_valid_on_random_specs(seed, forward_ops):
    spec = random_spec(seed, forward_ops=forward_ops, max_impls=3)
    for method in ("chen-sqrt", "chen-greedy", "revolve", "store-all", "recompute-all", "checkmate-lp", "milp", "checkmate"):
        result = solve(spec, method, time_limit=30, exact_min_budget=False)
        assert result.simulation is not None and result.simulation.valid, (method, result.message)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), data=st.data())
def test_schedule_from_carry_carries_what_it_is_told_while_it_is_read(seed, data):
    spec = random_spec(seed, forward_ops=4, max_impls=2)
    net = spec.network
    idx = index(net)
    impls = cheapest_impls(net)
    forward = [t for t in net.tensors if idx.is_forward_tensor(t) and t not in net.outputs]
    T = len(idx.backward_order)
    carry = [set(data.draw(st.lists(st.sampled_from(forward), max_size=3))) if forward else set() for _ in range(T + 1)]
    schedule = schedule_from_carry(net, impls, carry, spec_path="x", fingerprint=spec.fingerprint)
    sim = simulate(net, schedule)
    assert sim.valid, [e.message for e in sim.errors]
    assert not sim.warnings  # nothing kept past its last read


def test_checkmate_lp_reports_a_valid_lower_bound():
    from pathlib import Path

    spec = load_spec(str(Path(__file__).resolve().parent.parent / "specs" / "resblock.monet"))
    budget = 150 * 2**20
    lp = solve(spec, "checkmate-lp", memory_budget=budget)
    exact = solve(spec, "checkmate", memory_budget=budget, options={"gap": 0.0})
    assert lp.success and exact.status == "optimal"
    assert lp.lower_bound <= exact.simulation.compute_us + 1e-6 <= lp.simulation.compute_us + 1e-6
    assert lp.gap == pytest.approx((lp.simulation.compute_us - lp.lower_bound) / lp.simulation.compute_us)


def test_simulator_refuses_to_free_a_network_output():
    spec = parse_spec(
        """
network n
  tensor x f32[4] input
  op a (x) -> h f32[4] time 1us
    backward reads (grad(h)) -> grad(x) time 1us
  op b (h) -> y f32[4] time 1us
    backward reads (grad(y)) -> grad(h) time 1us
  output y
"""
    )
    sched = parse_schedule(
        f"""
schedule for "n.monet" fingerprint {spec.fingerprint}
  stage b.backward
    free y
  stage a.backward
"""
    )
    sim = simulate(spec.network, sched)
    assert not sim.valid and "network output" in sim.errors[0].message
