"""Backward implementations that accumulate a parameter gradient in place (``accumulates``).

Such an implementation adds its piece of ``grad(w)`` straight into the resident gradient,
so the step allocates no gradient-sized temporary: only its workspace. These tests pin the
language (round trip, errors naming the offending name), the simulator's accounting by
hand, and that the exact engine, the hybrid engine and the baselines' implementation
choice all see the saving (their optimum equals the exhaustive search's).
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monetdsl.errors import SpecError
from monetdsl.grammar import parse_schedule, parse_spec
from monetdsl.grammar.printer import format_spec
from monetdsl.search import simulate, solve
from monetdsl.search.exhaustive import best_within, exhaustive_front
from monetdsl.search.impl_choice import cheapest_impls
from monetdsl.synth import random_spec

SPEC = """
network acc
  tensor x f32[256] input
  tensor w f32[4096] param
  op a (x, w) -> y f32[256] time 1us
    backward wgrad reads (grad(y), x) -> grad(w)
      impl default time 2us
      impl into_grad time {into_time}us workspace 512B accumulates (grad(w))
  op b (y) -> z f32[256] time 1us
    backward reads (grad(z), y) -> grad(y) time 1us
  output z
"""

FIXED = 256 * 4 + 4096 * 4  # x and w


def spec(into_time: int = 3):
    return parse_spec(SPEC.format(into_time=into_time), "acc.monet")


def peak_with(s, impl: str) -> int:
    body = f"  impl a.wgrad = {impl}\n  forward keep y\n  stage b.backward\n  stage a.wgrad\n"
    sched = parse_schedule(f'schedule for "acc.monet" fingerprint {s.fingerprint}\n' + body)
    sim = simulate(s.network, sched, fingerprint=s.fingerprint)
    assert sim.valid, [e.format() for e in sim.errors]
    return sim.peak_bytes


def test_the_gradient_temporary_is_gone_and_the_workspace_counts():
    s = spec()
    # a.wgrad runs with y (kept by the forward), z, the seed grad(z) and grad(y) live (4 x
    # 1 KiB) and, with the default, allocates the 16 KiB grad(w) temporary
    assert peak_with(s, "default") == FIXED + 4 * 1024 + 16384
    # into_grad allocates only its 512 B workspace
    assert peak_with(s, "into_grad") == FIXED + 4 * 1024 + 512


def test_round_trip_and_fingerprint():
    s = spec()
    text = format_spec(s)
    assert "accumulates (grad(w))" in text
    again = parse_spec(text, "acc.monet")
    assert again.network == s.network
    assert again.fingerprint == s.fingerprint
    plain = parse_spec(SPEC.format(into_time=3).replace(" accumulates (grad(w))", ""), "acc.monet")
    assert plain.fingerprint != s.fingerprint  # what decides memory is in the fingerprint


@pytest.mark.parametrize("bad, message", [
    ("accumulates (grad(w))", None),
    ("accumulates (grad(x))", "accumulates grad(x), which the op does not produce"),
])
def test_accumulating_what_the_op_does_not_write_is_refused(bad, message):
    text = SPEC.format(into_time=3).replace("accumulates (grad(w))", bad)
    if message is None:
        parse_spec(text)
        return
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert message in str(err.value)


def test_only_gradients_of_resident_tensors_accumulate():
    text = """
network bad
  tensor x f32[256] input
  tensor w f32[4096] param
  op a (x, w) -> y f32[256] time 1us
  op b (y) -> z f32[256] time 1us
    backward reads (grad(z)) -> grad(y)
      impl default time 1us
      impl into accumulates (grad(y)) time 1us
  output z
"""
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert "accumulates grad(y)" in str(err.value) and "resident" in str(err.value)


@pytest.mark.parametrize("method", ["milp", "hybrid"])
def test_engines_find_the_exhaustive_optimum_with_it(method):
    s = spec()
    front = exhaustive_front(s.network)
    lowest = min(p.peak_bytes for p in front)
    assert lowest == FIXED + 4 * 1024  # y freed before a.wgrad: b.backward's step is the peak
    assert min(p.peak_bytes for p in front if p.schedule.impls.get("a.wgrad", "default") == "default") == FIXED + 3 * 1024 + 16384
    result = solve(s, method, objective="memory") if method == "milp" else solve(s, method, memory_budget=lowest)
    assert result.simulation.peak_bytes == lowest
    assert result.schedule.impls["a.wgrad"] == "into_grad"
    # with no room for the temporary's saving to matter, the faster default is chosen
    fast = solve(s, method, memory_budget=peak_with(s, "default"))
    assert fast.schedule.impls.get("a.wgrad", "default") == "default"
    assert fast.simulation.compute_us < result.simulation.compute_us


def test_equally_fast_the_baselines_take_the_one_that_allocates_less():
    assert cheapest_impls(spec(into_time=2).network)["a.wgrad"] == "into_grad"
    assert cheapest_impls(spec(into_time=3).network)["a.wgrad"] == "default"


def test_dominated_backward_implementations_are_left_out_of_the_search():
    from monetdsl.search.impl_choice import undominated_backward_impls

    assert undominated_backward_impls(spec(into_time=2).network) == {"a.wgrad": ("into_grad",)}
    assert undominated_backward_impls(spec(into_time=3).network) == {}  # slower but leaner: both stay
    reads_more = parse_spec(SPEC.format(into_time=2).replace("impl into_grad time", "impl into_grad reads (y) time"))
    assert undominated_backward_impls(reads_more.network) == {}  # needs y kept: not a drop-in
    assert undominated_backward_impls(spec(into_time=2).network, {"a.wgrad": ("default",)}) == {}  # a pin is respected


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6))
def test_the_narrowed_search_keeps_the_exhaustive_optimum(seed):
    """``solve`` searches without dominated backward implementations: at every budget of
    the exhaustive Pareto front (which saw them all) the MILP still proves the optimum."""
    s = random_spec(seed, forward_ops=3, max_impls=2)
    front = exhaustive_front(s.network)
    for point in front:
        result = solve(s, "milp", memory_budget=point.peak_bytes, time_limit=30, options={"gap": 0.0})
        assert result.status == "optimal", result.message
        assert result.simulation.compute_us == pytest.approx(best_within(front, point.peak_bytes).compute_us, abs=1e-9)
