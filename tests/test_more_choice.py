"""More implementations to choose from never make a search worse.

Exactly on small random networks: the joint MILP's optimum with every implementation is
no worse than its optimum with any subset of them pinned (fastest within a budget, and
least peak). For the hybrid engine, with settings under which it is deterministic (block
menus complete, no time-limited phase): its result on the full spec is no worse than on
the same spec pinned to each op's first implementation, because the full search runs the
restricted one first and starts from what it found.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monetdsl.grammar.parser import parse_spec
from monetdsl.ir import Constraints, ImplPin, Pattern
from monetdsl.search.impl_choice import undominated_backward_impls
from monetdsl.search.milp.highs import run_highs
from monetdsl.search.milp.model import MIB, build_model
from monetdsl.search.restrict import first_impl_pins, has_alternatives, reduced_spec
from monetdsl.search.simulator import simulate
from monetdsl.search.solve import solve
from monetdsl.synth import random_spec, resnet_stack


def _optimum(network, pins, budget, objective):
    """The exact optimum's value (compute in us, or peak in MiB above fixed), None when infeasible."""
    model = build_model(network, None, pins=pins, memory_budget=budget if objective == "compute" else None, objective=objective)
    if model.builder.conflicts:
        return None
    run = run_highs(model.builder, time_limit=60, rel_gap=0.0, abs_gap=1e-7 if objective == "compute" else 0.25 / MIB)
    if run.status == "infeasible":
        return None
    assert run.status == "optimal", run
    return run.objective


def _random_subset(network, rng):
    """Pins that keep a random non-empty subset of every op's implementations."""
    pins = {}
    for op in (*network.forward_ops, *network.backward_ops):
        names = list(op.impl_names)
        if len(names) > 1:
            pins[op.name] = tuple(sorted(rng.sample(names, rng.randint(1, len(names)))))
    return pins


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6))
def test_exact_optimum_with_every_implementation_is_no_worse_than_with_a_subset(seed):
    spec = random_spec(seed, forward_ops=3, max_impls=3)
    network = spec.network
    rng = random.Random(seed)
    store = solve(spec, "store-all").simulation.peak_bytes
    subsets = [first_impl_pins(network, {}), _random_subset(network, rng)]
    full_peak = _optimum(network, None, None, "memory")
    for pins in subsets:
        restricted_peak = _optimum(network, pins, None, "memory")
        if restricted_peak is not None:
            assert full_peak <= restricted_peak + 1e-9
        for fraction in (0.7, 0.9, 1.0):
            budget = int(store * fraction)
            restricted = _optimum(network, pins, budget, "compute")
            if restricted is None:
                continue
            full = _optimum(network, None, budget, "compute")
            assert full is not None and full <= restricted + 1e-6


def test_first_implementation_pins_and_the_reduced_spec_describe_the_same_space():
    spec = parse_spec(resnet_stack(2), path="r2.monet")
    network = spec.network
    pins = first_impl_pins(network, {})
    assert pins and all(len(v) == 1 for v in pins.values())
    assert all(pins[op.name] == (op.impl_names[0],) for op in network.forward_ops if len(op.impls) > 1)
    reduced = reduced_spec(spec)
    assert not has_alternatives(reduced.network, {})
    # the same schedule space: store-all with the first implementations peaks the same in both
    pinned = replace(spec, constraints=Constraints(impls=tuple(ImplPin(Pattern(k), v) for k, v in pins.items())))
    assert solve(reduced, "store-all").simulation.peak_bytes == solve(pinned, "store-all").simulation.peak_bytes


def test_a_first_implementation_removed_as_dominated_is_replaced_by_what_dominates_it():
    spec = parse_spec("""
network n
  tensor x f32[8] input
  tensor w f32[64] param
  op a (x, w) -> y f32[8] time 1us
    backward wgrad reads (grad(y), x) -> grad(w)
      impl default time 2us
      impl into_grad time 2us workspace 16B accumulates (grad(w))
      impl slow_into_grad time 9us accumulates (grad(w))
  output y
""")
    network = spec.network
    narrowed = undominated_backward_impls(network, {})
    assert "default" not in narrowed["a.wgrad"]
    assert first_impl_pins(network, {}) == {"a.wgrad": ("default",)}
    assert first_impl_pins(network, narrowed) == {"a.wgrad": ("into_grad",)}


#: deterministic hybrid settings: small blocks whose menus complete well within the time
#: given, no local search and no refinement MILP (both are time-limited)
DETERMINISTIC = {"target_ops": 5, "menu_seconds": 60, "polish": False, "refine": False, "rounds": 1}


@pytest.mark.parametrize("fraction", [0.45, 0.7])
def test_hybrid_with_every_implementation_is_no_worse_than_restricted_to_the_first(fraction):
    spec = parse_spec(resnet_stack(2, batch=8), path="r2.monet")
    network = spec.network
    pins = first_impl_pins(network, {})
    pinned = replace(spec, constraints=Constraints(impls=tuple(ImplPin(Pattern(k), v) for k, v in pins.items())))
    low = solve(spec, "recompute-all").simulation.peak_bytes
    high = solve(spec, "store-all").simulation.peak_bytes
    budget = int(low + fraction * (high - low))
    restricted = solve(pinned, "hybrid", memory_budget=budget, time_limit=300, options=DETERMINISTIC)
    full = solve(spec, "hybrid", memory_budget=budget, time_limit=300, options=DETERMINISTIC)
    assert restricted.success and full.success
    assert full.details["blocks"] > 1 and "restricted" in full.details
    # the restricted pass inside the full search found what the restricted search finds
    assert full.details["restricted"]["compute"] == pytest.approx(restricted.simulation.compute_us)
    assert full.simulation.compute_us <= restricted.simulation.compute_us + 1e-6
    replay = simulate(network, full.schedule)
    assert replay.valid and replay.peak_bytes <= budget

