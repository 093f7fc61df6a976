"""The joint MILP is exact: it finds what an exhaustive search over all valid schedules finds.

Random networks (hypothesis draws the seed of :func:`monetdsl.synth.random_spec`: skip
connections, views, in-place implementations, masks, RNG states read back by
recomputation, recompute times, workspaces, split weight/data gradients) are searched
exhaustively with the simulator's own stage replay
(:func:`monetdsl.search.exhaustive.exhaustive_front`). For every budget on the exhaustive
Pareto front, and one byte below its smallest peak, the MILP must find exactly the same
optimum; its decoded schedule must replay in the simulator with the model's own memory
accounting equal to the simulator's at every step.
"""
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from monetdsl.search.exhaustive import best_within, exhaustive_front
from monetdsl.search.milp.codec import canonical, decisions_from_solution, decode, encode, evaluate
from monetdsl.search.milp.highs import run_highs
from monetdsl.search.milp.model import build_model
from monetdsl.search.simulator import simulate
from monetdsl.synth import random_spec


def milp_optimum(network, budget, objective="compute", backend="highspy"):
    """(simulation, schedule, accounting) of the MILP optimum, or None when infeasible."""
    model = build_model(network, None, memory_budget=budget, objective=objective)
    if model.builder.conflicts:
        return None
    run = run_highs(model.builder, time_limit=60, rel_gap=0.0, abs_gap=1e-7, backend=backend)
    if run.status == "infeasible":
        return None
    assert run.status == "optimal", run
    decisions = decisions_from_solution(model, run.x)
    schedule = decode(model, decisions, spec_path="random.monet", fingerprint="0")
    accounting = evaluate(model, decisions)
    sim = simulate(network, schedule)
    assert sim.valid, [e.message for e in sim.errors]
    # the model's own accounting of the decoded schedule equals the simulator's, step by step
    assert accounting.step_peaks == [s.peak for s in sim.steps]
    assert accounting.compute_us == pytest.approx(sim.compute_us, abs=1e-9)
    # the solver's auxiliary columns are exactly what their definitions give
    assert max(abs(accounting.values - run.x)) < 1e-6
    return sim, schedule, model


def check_against_exhaustive(spec, backend="highspy"):
    net = spec.network
    front = exhaustive_front(net)
    assert front, "every random network has at least one valid schedule"
    for point in front:  # the front's own schedules replay to what the search recorded
        sim = simulate(net, point.schedule)
        assert sim.valid and sim.peak_bytes == point.peak_bytes
        assert sim.compute_us == pytest.approx(point.compute_us)
    peaks = sorted({p.peak_bytes for p in front})
    for budget in [peaks[0] - 1, *peaks]:
        reference = best_within(front, budget)
        found = milp_optimum(net, budget, backend=backend)
        if reference is None:
            assert found is None, f"MILP found a schedule below the exhaustive minimum peak {peaks[0]}"
            continue
        assert found is not None, f"MILP says infeasible at {budget}, exhaustive found {reference.peak_bytes}"
        sim, _, model = found
        assert sim.peak_bytes <= budget
        assert sim.compute_us == pytest.approx(reference.compute_us, abs=1e-9)
        # the exhaustive optimum, written the model's way, is a feasible point with equal accounting
        decisions, outside = encode(model, canonical(model, reference.schedule))
        assert not outside
        accounting = evaluate(model, decisions)
        assert not model.builder.violations(accounting.values)
        assert accounting.step_peaks == [s.peak for s in simulate(net, canonical(model, reference.schedule)).steps]
    lowest = milp_optimum(net, None, objective="memory")
    assert lowest[0].peak_bytes == peaks[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), forward_ops=st.integers(2, 3))
def test_milp_matches_exhaustive_search(seed, forward_ops):
    check_against_exhaustive(random_spec(seed, forward_ops=forward_ops, max_impls=2))


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6))
def test_milp_matches_exhaustive_search_three_impls(seed):
    check_against_exhaustive(random_spec(seed, forward_ops=3, max_impls=3))


@pytest.mark.slow
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6))
def test_milp_matches_exhaustive_search_four_ops(seed):
    check_against_exhaustive(random_spec(seed, forward_ops=4, max_impls=2))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 10**6))
def test_scipy_backend_gives_the_same_optimum(seed):
    check_against_exhaustive(random_spec(seed, forward_ops=2, max_impls=2), backend="scipy")


def test_exhaustive_search_and_milp_see_in_place():
    """A hand-checked network whose peak is the ReLU step, where in place saves h's storage."""
    from monetdsl.grammar.parser import parse_spec

    spec = parse_spec(
        """
network n
  tensor x f32[16] input
  op a (x) -> h f32[256] time 5us
    backward reads (grad(h)) -> grad(x) time 1us
  op relu (h) -> y f32[256]
    impl plain time 1us workspace 2KiB
    impl inplace overwrites h time 1us workspace 2KiB
    backward reads (grad(y)) -> grad(h) time 1us
  op sum (y) -> s f32[1] time 1us
    backward reads (grad(s)) -> grad(y) time 1us
  output s
"""
    )
    # ReLU step: x (64 B, fixed) + h (1 KiB) + workspace (2 KiB), + y (1 KiB) unless in place
    front = exhaustive_front(spec.network)
    lowest = min(front, key=lambda p: p.peak_bytes)
    assert lowest.schedule.impls["relu"] == "inplace"
    assert lowest.peak_bytes == 64 + 1024 + 2048
    sim, schedule, _ = milp_optimum(spec.network, None, objective="memory")
    assert sim.peak_bytes == 64 + 1024 + 2048 and schedule.impls["relu"] == "inplace"
    assert milp_optimum(spec.network, 64 + 1024 + 2048 - 1) is None


def _optimum_from_a_start(network, budget, start_schedule):
    """run_highs given ``start_schedule`` as the MIP start: (objective, columns' worth, run)."""
    model = build_model(network, None, memory_budget=budget)
    decisions, outside = encode(model, canonical(model, start_schedule))
    if outside:  # a front schedule the model does not represent (it carries what nothing reads)
        return None
    start = model.builder.complete(decisions)
    run = run_highs(model.builder, time_limit=60, rel_gap=0.0, abs_gap=1e-7, start=start)
    assert run.status == "optimal", run
    cost = model.builder.matrix()[0]
    return run.objective, float(cost @ run.x) + model.builder.offset, run


def test_a_mip_start_does_not_come_back_as_the_answer():
    """HiGHS 1.16 (presolve on), given a MIP start, reported this network's optimum (61 us)
    with the start's columns (76 us) as its solution; run_highs solves again without the
    start when the start comes back as the answer."""
    from monetdsl.search import solve

    spec = random_spec(60074, forward_ops=3, max_impls=2)
    start = solve(spec, "chen-greedy", memory_budget=1560)
    assert start.simulation.compute_us == 76.0
    objective, worth, _ = _optimum_from_a_start(spec.network, 1560, start.schedule)
    assert objective == worth == 61.0 == best_within(exhaustive_front(spec.network), 1560).compute_us
    assert solve(spec, "milp", memory_budget=1560, options={"gap": 0.0}).simulation.compute_us == 61.0


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6))
@example(seed=320)  # HiGHS 1.16 with presolve proved the start (61 us) optimal at 956 B; the optimum is 56
def test_the_optimum_from_a_mip_start_is_the_exhaustive_one(seed):
    """Started from the slowest schedule of the exhaustive front that fits each budget,
    the MILP's answer is still the exhaustive optimum, and its columns are worth it."""
    network = random_spec(seed, forward_ops=3, max_impls=2).network
    front = exhaustive_front(network)
    for point in front:
        slowest = max((p for p in front if p.peak_bytes <= point.peak_bytes), key=lambda p: p.compute_us)
        found = _optimum_from_a_start(network, point.peak_bytes, slowest.schedule)
        if found is None:
            continue
        objective, worth, _ = found
        assert worth == pytest.approx(objective, abs=1e-9)
        assert worth == pytest.approx(best_within(front, point.peak_bytes).compute_us, abs=1e-9)
