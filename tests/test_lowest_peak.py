"""The lowest peak within a cap: a peak equal to the lower bound every schedule meets is
reported as minimal (``optimal``, exact minimum budget), however little of the cap it uses."""
from __future__ import annotations

from monetdsl.grammar.parser import parse_spec
from monetdsl.search.exhaustive import exhaustive_front
from monetdsl.search.hybrid.bounds import peak_lower_bound
from monetdsl.search.solve import solve


def _chain_with_a_large_first_step(ops: int = 8):
    lines = ["network chain", "  tensor x f32[1024] input"]
    prev = "x"
    for i in range(ops):
        workspace = " workspace 64MiB" if i == 0 else ""
        lines.append(f"  op op{i} ({prev}) -> t{i} f32[1024] time {10 + i}us{workspace}")
        reads = f"grad(t{i}), {prev}" if i else f"grad(t{i})"
        lines.append(f"    backward reads ({reads}) -> grad({prev}) time {20 + i}us")
        prev = f"t{i}"
    lines.append(f"  output {prev}")
    return parse_spec("\n".join(lines) + "\n")


def test_a_peak_at_the_lower_bound_is_reported_minimal_without_the_refinement_milp():
    spec = _chain_with_a_large_first_step()
    result = solve(spec, "hybrid", max_overhead=0.1, time_limit=30, options={"target_ops": 2, "refine": False})
    assert result.details["blocks"] > 1 and "refine" not in result.details
    assert result.simulation.peak_bytes == peak_lower_bound(spec.network)
    assert result.status == "optimal" and result.min_feasible_budget_exact and result.gap == 0.0
    assert "equals the lower bound" in result.message


def test_the_lower_bound_holds_for_every_schedule_of_small_chains():
    spec = _chain_with_a_large_first_step(3)
    front = exhaustive_front(spec.network)
    assert min(p.peak_bytes for p in front) >= peak_lower_bound(spec.network)
