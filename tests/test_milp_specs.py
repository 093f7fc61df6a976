"""The search methods on the shipped specs: validity, budgets, minimum budgets, and what
implementation choice buys over Checkmate."""
import pytest

from monetdsl.grammar import load_spec
from monetdsl.search.solve import METHODS, solve

SPECS = ["tiny_chain", "resblock", "transformer_block"]


@pytest.fixture(scope="module")
def specs(specs_dir_module):
    return {name: load_spec(str(specs_dir_module / f"{name}.monet")) for name in SPECS}


@pytest.fixture(scope="module")
def specs_dir_module():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "specs"


@pytest.fixture(scope="module")
def ladders(specs):
    """Per spec: the joint MILP's exact minimum peak and the store-all peak."""
    result = {}
    for name, spec in specs.items():
        low = solve(spec, "milp", objective="memory", time_limit=60)
        assert low.status == "optimal" and low.min_feasible_budget_exact
        high = solve(spec, "store-all", memory_budget=10**12)
        result[name] = (low.min_feasible_budget, high.simulation.peak_bytes)
    return result


def budgets_between(low: int, high: int, count: int) -> list[int]:
    return [low + (high - low) * k // (count - 1) for k in range(count)]


# tiny_chain has in-place and mask ReLUs too, but every schedule of it peaks at a backward
# step dominated by weights, gradients and optimizer state, where neither changes memory:
# both MILPs prove the same Pareto front there (20 MiB at 12.8 %, 22 MiB at 0 %).
@pytest.mark.parametrize("name,strict", [("tiny_chain", False), ("resblock", True), ("transformer_block", True)])
def test_joint_milp_never_worse_than_checkmate_and_strictly_better_somewhere(specs, ladders, name, strict):
    spec = specs[name]
    low, high = ladders[name]
    strictly_better = []
    for budget in budgets_between(low, high, 4):
        joint = solve(spec, "milp", memory_budget=budget, time_limit=60, options={"gap": 0.0})
        plain = solve(spec, "checkmate", memory_budget=budget, time_limit=60, options={"gap": 0.0})
        assert joint.status == "optimal", joint.message
        assert joint.simulation.peak_bytes <= budget
        if plain.status == "infeasible":
            strictly_better.append(budget)
            continue
        assert plain.status == "optimal", plain.message
        assert plain.simulation.peak_bytes <= budget
        assert joint.simulation.compute_us <= plain.simulation.compute_us + 1e-9
        if joint.simulation.compute_us < plain.simulation.compute_us - 1e-9:
            strictly_better.append(budget)
    if strict:
        assert strictly_better, f"{name}: the joint MILP never beat Checkmate"


@pytest.mark.parametrize("name", SPECS)
def test_minimum_budget_is_exact(specs, ladders, name):
    spec = specs[name]
    low, _ = ladders[name]
    below = solve(spec, "milp", memory_budget=low - 1, time_limit=60)
    assert below.status == "infeasible" and not below.success
    assert below.min_feasible_budget == low and below.min_feasible_budget_exact
    assert f"({low} B)" in below.message
    at = solve(spec, "milp", memory_budget=low, time_limit=60)
    assert at.success and at.simulation.peak_bytes == low
    checkmate_low = solve(spec, "checkmate", objective="memory", time_limit=60)
    assert checkmate_low.min_feasible_budget_exact
    assert low <= checkmate_low.min_feasible_budget


@pytest.mark.parametrize("name", SPECS)
def test_every_method_gives_a_valid_schedule_within_budget(specs, ladders, name):
    spec = specs[name]
    low, high = ladders[name]
    budget = (low + high) // 2
    for method in METHODS:
        result = solve(spec, method, memory_budget=budget, time_limit=30, exact_min_budget=False)
        if result.schedule is not None:
            assert result.simulation.valid, (method, [e.message for e in result.simulation.errors])
        if result.success:
            assert result.simulation.ok and result.simulation.peak_bytes <= budget, method
        else:
            assert result.status == "infeasible", (method, result.status)


@pytest.mark.parametrize("name", SPECS)
def test_milp_accounting_equals_the_simulator(specs, ladders, name):
    spec = specs[name]
    low, high = ladders[name]
    for budget in (low, (low + high) // 2):
        result = solve(spec, "milp", memory_budget=budget, time_limit=60)
        assert result.success
        assert "accounting_mismatch" not in result.details
        assert result.details["milp_peak_bytes"] == result.simulation.peak_bytes
        assert result.details["milp_compute_us"] == pytest.approx(result.simulation.compute_us)


def test_overhead_cap_objective_minimises_peak_within_the_cap(specs, ladders):
    spec = specs["transformer_block"]
    low, _ = ladders["transformer_block"]
    capped = solve(spec, "milp", max_overhead=0.05, time_limit=60)
    assert capped.details["objective"] == "memory"
    assert capped.success and capped.simulation.overhead <= 0.05 + 1e-12
    assert capped.min_feasible_budget == capped.simulation.peak_bytes and capped.min_feasible_budget_exact
    assert capped.simulation.peak_bytes > low  # the cap costs memory here
    # and no schedule within the cap is lower: one byte less is infeasible within the cap
    below = solve(spec, "milp", memory_budget=capped.simulation.peak_bytes - 1, max_overhead=0.05, time_limit=60)
    assert below.status == "infeasible"


def test_heuristic_infeasibility_reports_the_exact_minimum(specs, ladders):
    spec = specs["resblock"]
    low, _ = ladders["resblock"]
    result = solve(spec, "chen-sqrt", memory_budget=low)
    assert result.status == "infeasible"
    assert result.min_feasible_budget == low and result.min_feasible_budget_exact
    assert "details" not in result.message and "any schedule" in result.message


def test_milp_honours_the_constraint_block(specs_dir_module):
    from monetdsl.grammar.parser import parse_spec

    text = (specs_dir_module / "resblock.monet").read_text()
    text += "\nconstraints\n  memory <= 185MiB\n  keep c2\n  never recompute conv1\n  impl relu2 = plain\n  impl relu1 in (mask, inplace_mask)\n"
    spec = parse_spec(text, path="resblock-constrained.monet")
    free = solve(load_spec(str(specs_dir_module / "resblock.monet")), "milp", memory_budget=185 * 2**20)
    pinned = solve(spec, "milp", time_limit=60)
    assert pinned.status == "optimal" and pinned.simulation.ok  # the simulator checks every pin
    schedule = pinned.schedule
    assert "c2" in schedule.forward_keep
    assert not any("conv1" in stage.recompute for stage in schedule.stages)
    assert schedule.impls["relu2"] == "plain" and schedule.impls["relu1"] in ("mask", "inplace_mask")
    assert pinned.simulation.compute_us >= free.simulation.compute_us - 1e-9  # constraints never help
