"""Peak-directed eviction (monetdsl.search.eviction) and the hybrid engine's path without
blocks: every schedule replays within the budget, the exact cover is the brute-force
optimum of its accounting and never costlier than the greedy one."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from monetdsl.search import eviction
from monetdsl.search.baselines import store_all
from monetdsl.search.eviction import compute_lower_bound_within, evict_to_budget, least_peak_within_cap
from monetdsl.search.simulator import simulate
from monetdsl.search.solve import solve
from monetdsl.synth import layered_spec, random_spec
from monetdsl.validate import resolve_constraints


def _setup(spec, fraction):
    network = spec.network
    start = store_all(network, spec_path="g", fingerprint="0")
    full = simulate(network, start)
    cons = resolve_constraints(network, spec.constraints, memory_budget=int(fraction * full.peak_bytes))
    return network, start, full, cons


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("exact", [False, True])
def test_layered_graph_fits_the_budget_and_replays(seed, exact):
    network, start, full, cons = _setup(layered_spec(40, seed), 0.8)
    found = evict_to_budget(network, start, cons, baseline_us=full.compute_us, time_limit=30,
                            exact_cover=exact)
    assert found.simulation.ok and found.simulation.peak_bytes <= cons.memory_budget
    again = simulate(network, found.schedule, constraints=cons, baseline_us=full.compute_us)
    assert again.ok and again.peak_bytes == found.simulation.peak_bytes and again.compute_us == found.simulation.compute_us
    assert full.compute_us <= found.simulation.compute_us < 1.2 * full.compute_us


@pytest.mark.parametrize("seed", range(12))
def test_random_networks_never_return_an_invalid_schedule(seed):
    """Networks with in-place, derived and view tensors: whatever comes back replays validly,
    and when it says it fits, it does."""
    network, start, full, cons = _setup(random_spec(seed, forward_ops=6), 0.85)
    found = evict_to_budget(network, start, cons, baseline_us=full.compute_us, time_limit=10)
    assert found is not None
    sim = simulate(network, found.schedule, constraints=cons, baseline_us=full.compute_us)
    assert sim.valid
    assert sim.peak_bytes <= full.peak_bytes
    if found.simulation.ok:
        assert sim.peak_bytes <= cons.memory_budget


def test_no_budget_no_eviction():
    spec = layered_spec(10, 0)
    network, start, full, _ = _setup(spec, 0.8)
    cons = resolve_constraints(network, spec.constraints)
    assert evict_to_budget(network, start, cons, baseline_us=full.compute_us, time_limit=5) is None


def _windows(rng, steps, count):
    found = []
    for i in range(count):
        lo = rng.randrange(steps)
        hi = rng.randrange(lo + 1, steps + 1)
        found.append(eviction._Window(f"t{i}", 0, 1, lo, hi, float(rng.randint(0, 9)), rng.randint(1, 6)))
    return found


def _feasible(chosen, peaks, budget):
    left = peaks.copy()
    for w in chosen:
        left[w.lo:w.hi] -= w.size
    return bool((left <= budget).all())


@pytest.mark.parametrize("seed", range(16))
def test_exact_cover_is_the_brute_force_optimum(seed):
    """Random windows over 8 steps (on seeds 6 and 13 the greedy cover costs more)."""
    rng = random.Random(seed)
    steps, budget = 8, 6
    windows = _windows(rng, steps, 12)
    covered = np.array([any(w.lo <= k < w.hi for w in windows) for k in range(steps)])
    peaks = np.where(covered, [rng.randint(5, 16) for _ in range(steps)], budget).astype(np.int64)
    costs = [sum(w.cost for w in subset) for n in range(len(windows) + 1)
             for subset in itertools.combinations(windows, n) if _feasible(subset, peaks, budget)]
    greedy = eviction._cover(windows, peaks, budget)
    exact = eviction._cover_milp(windows, peaks, budget, greedy, 30.0)
    if not costs:
        assert exact is None and not _feasible(greedy, peaks, budget)
        return
    assert exact is not None and _feasible(exact, peaks, budget)
    assert sum(w.cost for w in exact) == pytest.approx(min(costs))
    assert _feasible(greedy, peaks, budget) and sum(w.cost for w in greedy) >= min(costs) - 1e-9


def test_hybrid_without_blocks_when_their_menus_are_out_of_reach():
    """80 forward ops in about 16 kinds of block need 8 s of first menus, more than 60 % of
    a 6 s limit: the engine answers from the eviction instead, within the budget."""
    spec = layered_spec(80, 0)
    store = solve(spec, "store-all").simulation
    budget = int(0.8 * store.peak_bytes)
    result = solve(spec, "hybrid", memory_budget=budget, time_limit=6, exact_min_budget=False)
    assert "blocks_skipped" in result.details
    assert result.success and result.simulation.ok and result.simulation.peak_bytes <= budget
    assert result.details["origin"].startswith("eviction")
    assert result.simulation.compute_us <= result.details["eviction"]["compute"]


@pytest.mark.parametrize("seed", [0, 1])
def test_least_peak_within_cap_keeps_the_cap(seed):
    spec = layered_spec(40, seed)
    network, start, full, _ = _setup(spec, 1.0)
    cons = resolve_constraints(network, spec.constraints, max_overhead=0.05)
    found = least_peak_within_cap(network, start, cons, baseline_us=full.compute_us, floor=network.fixed_bytes, time_limit=20)
    assert found is not None
    sim = simulate(network, found.schedule, constraints=cons, baseline_us=full.compute_us)
    assert sim.ok and sim.compute_us <= 1.05 * full.compute_us * (1 + 1e-12)
    assert sim.peak_bytes == found.simulation.peak_bytes < full.peak_bytes


def test_hybrid_least_peak_without_blocks():
    """The memory objective within a cap takes the same path: the lowest budget the
    eviction fits within the cap, polished."""
    spec = layered_spec(80, 1)
    store = solve(spec, "store-all").simulation
    result = solve(spec, "hybrid", max_overhead=0.05, time_limit=6, exact_min_budget=False)
    assert "blocks_skipped" in result.details
    assert result.success and result.simulation.ok and result.simulation.overhead <= 0.05 + 1e-9
    assert result.simulation.peak_bytes <= result.details["eviction"]["peak"] < store.peak_bytes


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("fraction", [0.9, 0.95])
def test_lower_bound_within_budget_is_below_the_exact_optimum(seed, fraction):
    """Between store-all's compute (strictly above it: the budget forces recomputation)
    and the exact MILP's optimum."""
    spec = layered_spec(10, seed)
    network, start, full, cons = _setup(spec, fraction)
    bound = compute_lower_bound_within(network, cons, baseline_us=full.compute_us)
    exact = solve(spec, "milp", memory_budget=cons.memory_budget, time_limit=60, exact_min_budget=False)
    assert exact.status == "optimal"
    assert bound is not None and full.compute_us < bound <= exact.simulation.compute_us + 1e-9


@pytest.mark.parametrize("seed", [1, 3])
def test_no_lower_bound_within_a_budget_no_schedule_meets(seed):
    spec = layered_spec(8, seed)
    network, start, full, cons = _setup(spec, 0.7)
    assert compute_lower_bound_within(network, cons, baseline_us=full.compute_us) is None
    assert solve(spec, "milp", memory_budget=cons.memory_budget, time_limit=60, exact_min_budget=False).status == "infeasible"


def test_lower_bound_within_budget_needs_a_plain_network():
    """Implementation choice, in-place and derived tensors: no bound (it would not hold)."""
    spec = random_spec(3, forward_ops=6)
    network, start, full, cons = _setup(spec, 0.8)
    assert not eviction._plain(network)
    assert compute_lower_bound_within(network, cons, baseline_us=full.compute_us) is None


@pytest.mark.slow  # 16 s: builds a 400-node model
def test_the_milp_starts_from_the_eviction_where_the_other_heuristics_are_far_off():
    """At 0.8x the store-all peak of a layered graph only recompute-all of the other
    heuristics fits; the eviction's schedule is HiGHS's start, so the search holds an
    incumbent near it from the first second, and what it returns replays within the budget."""
    spec = layered_spec(50, 0)
    store = solve(spec, "store-all").simulation
    budget = int(0.8 * store.peak_bytes)
    result = solve(spec, "milp", memory_budget=budget, time_limit=8)
    assert result.details["start"] == "eviction"
    assert result.simulation.ok and result.simulation.peak_bytes <= budget
    recompute_all = solve(spec, "recompute-all").simulation
    assert result.simulation.compute_us < recompute_all.compute_us
    assert result.gap is not None
    plain = solve(spec, "milp", memory_budget=budget, time_limit=8, options={"evict": False})
    assert plain.details.get("start") != "eviction"
