"""Baseline methods: always a valid schedule, each with its defining property."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings

from monetdsl.grammar import format_network, load_spec, parse_spec
from monetdsl.graph import checkpoint_candidates, index
from monetdsl.search import chen_sqrt, recompute_all, simulate, solve, store_all
from monetdsl.search.baselines import chen_sqrt_checkpoints
from monetdsl.search.solve import HEURISTICS
from monetdsl.validate import resolve_constraints, validate_network

from .spec_files import SHIPPED_SPEC_FILES
from .strategies import networks

SPECS = SHIPPED_SPEC_FILES
METHODS = {"store-all": store_all, "recompute-all": recompute_all, "chen-sqrt": chen_sqrt}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks())
def test_every_baseline_schedule_replays_on_random_networks(net):
    assume(validate_network(net) == [])
    for name, method in METHODS.items():
        sim = simulate(net, method(net, None, spec_path="x", fingerprint="0"))
        assert sim.valid, (name, [e.message for e in sim.errors], format_network(net))
    store = simulate(net, store_all(net, None, spec_path="x", fingerprint="0"))
    overwritten = {op.impl(i).overwrites for op in net.forward_ops for i in op.impl_names} - {None}
    if not overwritten:
        assert store.recompute_us == 0.0


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_baselines_on_shipped_specs(path):
    spec = load_spec(path)
    results = {name: solve(spec, name) for name in METHODS}
    for name, result in results.items():
        assert result.simulation.valid, name
    store, every, chen = (results[n].simulation for n in ("store-all", "recompute-all", "chen-sqrt"))
    assert store.recompute_us == 0 and store.overhead == 0.0
    assert store.compute_us == store.baseline_us
    assert not results["recompute-all"].schedule.forward_keep or all(
        t in {r for op in spec.network.forward_ops for i in op.impls for r in i.recompute_reads}
        for t in results["recompute-all"].schedule.forward_keep
    )  # recompute-all keeps only what recomputation itself needs (RNG states, statistics)
    assert store.compute_us <= chen.compute_us <= every.compute_us


def test_chen_checkpoints_on_a_chain():
    lines = ["network chain", "  tensor x f32[4] input"]
    prev = "x"
    for i in range(16):
        lines.append(f"  op f{i} ({prev}) -> t{i} f32[4] time 1us")
        if prev == "x":
            lines.append(f"    backward reads (grad(t{i}), x) -> gw 4B time 1us")
        else:
            lines.append(f"    backward reads (grad(t{i}), {prev}) -> grad({prev}) time 1us")
        prev = f"t{i}"
    lines.append(f"  output {prev}")
    spec = parse_spec("\n".join(lines) + "\n")
    candidates = checkpoint_candidates(spec.network)
    assert candidates == tuple(f"t{i}" for i in range(15))  # every tensor but the output cuts the chain
    assert chen_sqrt_checkpoints(spec.network) == ("t3", "t7", "t11")
    sim = solve(spec, "chen-sqrt").simulation
    # segments after t3, t7, t11 are recomputed once each; t0..t2 from the input
    assert sim.forward_us == 16 and sim.recompute_us == 3 + 3 + 3 + 3


def test_residual_skip_is_not_a_checkpoint_candidate():
    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "resblock.monet")
    # inside the block the skip from x keeps every tensor on a cycle through the add
    assert checkpoint_candidates(spec.network) == ("s",)


def test_pins_are_honoured_by_every_baseline():
    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "tiny_chain.monet")
    text = spec.source.replace("memory <= 21MiB", "keep h1\n  never recompute fc2\n  impl relu* = mask")
    pinned = parse_spec(text, "pinned.monet")
    constraints = resolve_constraints(pinned.network, pinned.constraints)
    for name, method in METHODS.items():
        sim = simulate(pinned.network, method(pinned.network, constraints, spec_path="x", fingerprint="0"), constraints=constraints)
        assert sim.ok, (name, [d.message for d in sim.errors + sim.violations])
        assert sim.schedule.impls["relu1"] == "mask" and sim.schedule.impls["relu2"] == "mask"
        assert "h1" in sim.schedule.forward_keep
        assert all("fc2" not in stage.recompute for stage in sim.schedule.stages)


def test_auto_runs_the_exact_milp_on_a_small_network_and_beats_every_heuristic():
    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "tiny_chain.monet")
    result = solve(spec)  # the spec asks for 21 MiB: store-all needs 22
    assert result.details["chosen"] == "milp" and "forward ops" in result.details["reason"]
    assert result.status == "optimal" and result.simulation.peak_bytes <= 21 * 2**20
    runs = {name: solve(spec, name, memory_budget=1 << 30).simulation for name in HEURISTICS}
    fitting = {name: sim.compute_us for name, sim in runs.items() if sim.peak_bytes <= 21 * 2**20}
    assert "store-all" not in fitting and fitting
    assert result.simulation.compute_us <= min(fitting.values()) + 1e-9


def test_auto_without_constraints_keeps_everything():
    text = (Path(__file__).resolve().parent.parent / "specs" / "tiny_chain.monet").read_text()
    unconstrained = text[: text.index("constraints")]
    spec = parse_spec(unconstrained)
    result = solve(spec)
    assert result.details["chosen"] == "store-all" and result.status == "optimal"
    assert result.simulation.overhead == 0


def test_infeasible_budget_reports_the_exact_minimum_budget():
    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "tiny_chain.monet")
    result = solve(spec, memory_budget=16 << 20)
    assert result.status == "infeasible" and not result.success
    exact = solve(spec, "milp", objective="memory").simulation.peak_bytes
    assert result.min_feasible_budget == exact and result.min_feasible_budget_exact
    assert result.as_json()["min_feasible_budget"] == exact
    assert exact <= min(solve(spec, m, memory_budget=1 << 30).simulation.peak_bytes for m in HEURISTICS)
    assert solve(spec, memory_budget=exact).success
    unconstrained = parse_spec(spec.source.replace("  memory <= 21MiB\n", "").replace("constraints\n", ""), "free.monet")
    cap = solve(unconstrained, max_overhead=0.0)
    assert cap.status == "optimal" and cap.details["chosen"] == "milp" and cap.simulation.overhead <= 1e-12


def test_canonical_backward_order_respects_gradients():
    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "transformer_block.monet")
    order = index(spec.network).backward_order
    position = {name: i for i, name in enumerate(order)}
    for bop in spec.network.backward_ops:
        for impl in bop.impls:
            for read in impl.reads:
                for writer in index(spec.network).gradient_writers.get(read, ()):
                    assert position[writer] < position[bop.name]
    assert order[0] == "res2.backward" and order[-1] == "ln1.backward"


def test_a_tensor_an_in_place_recomputation_destroys_is_not_promoted():
    """Found by the random-network test: Chen's segments promoted ``t6`` from one stage to
    a later one, but a stage in between recomputes ``op13``, whose chosen implementation
    overwrites ``t6`` in place. Such a tensor is recomputed where it is read instead."""
    path = Path(__file__).resolve().parent / "data" / "inplace_recompute_promotion.monet"
    net = parse_spec(path.read_text(), str(path)).network
    for name, method in METHODS.items():
        sim = simulate(net, method(net, None, spec_path="x", fingerprint="0"))
        assert sim.valid, (name, [e.message for e in sim.errors])
