"""Benchmark of the hybrid engine. Not a test: it measures.

Three parts, each printing a markdown table and writing it (and JSON) under ``--out``
(default ``benchmarks/results``):

``small``
    Graphs small enough for the exact joint MILP to prove its optimum (or nearly), cut into
    blocks of about 7 forward ops: the hybrid engine *without* its refinement MILP (blocks,
    menus and the chain DP alone) and with it (the default), against the MILP, at three
    budgets each. The target: within 2 %.

``large``
    The shipped ResNet-50, GPT-2 and UNet specs and two synthetic ~1,000-operator stacks,
    at two budgets each (30 % and 60 % of the way from the recompute-all peak to the
    store-all peak): hybrid (one minute) against Chen's sqrt(n) and greedy checkpointing
    and Griewank's revolve; and on the mid-size graphs, where its model can be built, the
    Checkmate MILP with the same minute. Per row: compute overhead, peak, solve seconds,
    and the gap to the best lower bound known (every op once at its fastest
    implementation, or the refinement MILP's dual bound).

``dp``
    The chain DP's two kernels (numba ``@njit`` loops and numpy vectorised over memory) on
    the chain problems of the large graphs: fill time of the same table, median of 5.

Run from the repository root with the package importable::

    python benchmarks/hybrid.py small
    python benchmarks/hybrid.py large
    python benchmarks/hybrid.py dp
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from exact_engine import machine  # noqa: E402

from monetdsl.grammar import load_spec  # noqa: E402
from monetdsl.grammar.parser import parse_spec  # noqa: E402
from monetdsl.search.solve import solve  # noqa: E402
from monetdsl.synth import resnet_stack, transformer_stack  # noqa: E402
from monetdsl.units import human_bytes  # noqa: E402

SMALL = [("resnet", 3), ("transformer", 2), ("resnet", 4)]
LARGE = ["resnet50", "gpt2_small", "unet", ("resnet", 140), ("transformer", 70)]
MEDIUM = [("resnet", 6), ("transformer", 3)]
BASELINES = ["chen-sqrt", "chen-greedy", "revolve"]


def load(which):
    if isinstance(which, tuple):
        kind, n = which
        return f"{kind}{n}", parse_spec((resnet_stack if kind == "resnet" else transformer_stack)(n), path=f"{kind}{n}.monet")
    return which, load_spec(str(ROOT / "specs" / f"{which}.monet"))


def ladder(spec, fractions):
    high = solve(spec, "store-all").simulation.peak_bytes
    low = solve(spec, "recompute-all").simulation.peak_bytes
    return [int(low + f * (high - low)) for f in fractions]


def row(name, spec, method, budget, limit, options=None) -> dict:
    result = solve(spec, method, memory_budget=budget, time_limit=limit, options=options, exact_min_budget=False)
    sim = result.simulation if result.success else None
    entry = {
        "spec": name, "forward_ops": len(spec.network.forward_ops), "method": method, "budget": budget,
        "status": result.status, "peak_bytes": sim.peak_bytes if sim else None,
        "overhead": sim.overhead if sim else None, "compute": sim.compute_us if sim else None,
        "seconds": round(result.solve_seconds, 2), "lower_bound": result.lower_bound,
        "blocks": result.details.get("blocks"), "block_kinds": result.details.get("block_kinds"),
    }
    print(f"{name} {method} {human_bytes(budget)}: {result.status} {entry['overhead']} {result.solve_seconds:.1f} s", file=sys.stderr, flush=True)
    return entry


def cell_overhead(r) -> str:
    return "-" if r["overhead"] is None else f"{100 * r['overhead']:.2f} %"


def run_small(args) -> None:
    rows = []
    for which in SMALL:
        name, spec = load(which)
        for budget in ladder(spec, (0.25, 0.5, 0.75)):
            exact = row(name, spec, "milp", budget, args.limit)
            hyb = row(name, spec, "hybrid", budget, args.limit, {"target_ops": 7, "refine": False})
            refined = row(name, spec, "hybrid", budget, args.limit, {"target_ops": 7})
            excess = [None if not (exact["compute"] and h["compute"]) else h["compute"] / exact["compute"] - 1 for h in (hyb, refined)]
            rows.append({"exact": exact, "hybrid": hyb, "refined": refined, "excess": excess[0], "refined_excess": excess[1]})
    lines = [
        "# Hybrid engine vs the exact optimum (small graphs)\n",
        f"Machine: {machine()}. Hybrid without refinement, blocks of about 7 forward ops; exact = joint MILP,"
        f" {args.limit:g} s limit.\n",
        "| graph | fwd ops | budget | exact status | exact overhead | DP only: overhead | blocks | s | above exact |"
        " with refinement: overhead | s | above exact |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e, h, f = r["exact"], r["hybrid"], r["refined"]
        excess = ["-" if x is None else f"{100 * x:.2f} %" for x in (r["excess"], r["refined_excess"])]
        lines.append(f"| {e['spec']} | {e['forward_ops']} | {human_bytes(e['budget'])} | {e['status']} | {cell_overhead(e)} |"
                     f" {cell_overhead(h)} | {h['blocks']} | {h['seconds']:.1f} | {excess[0]} | {cell_overhead(f)} | {f['seconds']:.1f} | {excess[1]} |")
    write(args, "hybrid_small", lines, rows)


def run_large(args) -> None:
    rows = []
    for which in MEDIUM + LARGE:
        name, spec = load(which)
        methods = ["hybrid", *BASELINES] + (["checkmate"] if which in MEDIUM else [])
        for budget in ladder(spec, (0.3, 0.6)):
            found = [row(name, spec, m, budget, args.limit) for m in methods]
            bound = max((r["lower_bound"] for r in found if r["lower_bound"] is not None), default=None)
            for r in found:
                r["gap_to_bound"] = None if r["compute"] is None or bound is None else max(0.0, r["compute"] - bound) / r["compute"]
            rows += found
    lines = [
        "# Hybrid engine on large graphs, against the baselines\n",
        f"Machine: {machine()}. Time limit {args.limit:g} s for the searching methods (hybrid, checkmate). Budgets at"
        " 30 % and 60 % of the way from the recompute-all peak to the store-all peak. Gap = compute above the best"
        " lower bound known for that budget.\n",
        "| graph | fwd ops | budget | method | status | peak | overhead | solve s | gap to bound |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else human_bytes(r["peak_bytes"])
        gap = "-" if r.get("gap_to_bound") is None else f"{100 * r['gap_to_bound']:.2f} %"
        lines.append(f"| {r['spec']} | {r['forward_ops']} | {human_bytes(r['budget'])} | {r['method']} | {r['status']} | {peak} |"
                     f" {cell_overhead(r)} | {r['seconds']:.1f} | {gap} |")
    write(args, "hybrid_large", lines, rows)


def run_dp(args) -> None:
    from monetdsl.search.hybrid.chain import ChainModel
    from monetdsl.search.hybrid.chain_dp import fill_numba, fill_numpy
    from monetdsl.search.hybrid.decompose import decompose
    from monetdsl.search.hybrid.engine import _block_nets, _slots
    from monetdsl.search.hybrid.menus import build_menus
    from monetdsl.validate import resolve_constraints

    rows = []
    for which in LARGE:
        name, spec = load(which)
        network = spec.network
        constraints = resolve_constraints(network, spec.constraints)
        parts, nets = _block_nets(network, constraints, decompose(network))
        kinds = {bn.fingerprint: bn for bn in nets}
        menus = build_menus(list(kinds.values()), time_budget=20.0)
        chain = ChainModel(network, parts, nets, menus)
        slots = _slots(chain.L)
        span = solve(spec, "store-all").simulation.peak_bytes - network.fixed_bytes
        problem = chain.problem(ChainModel.unit_for(span, slots), slots)
        fill_numba(problem)  # compile (cached on disk after the first run)
        times = {"numba": [], "numpy": []}
        for _ in range(5):  # interleaved
            for kernel, fill in (("numba", fill_numba), ("numpy", fill_numpy)):
                t = time.perf_counter()
                fill(problem)
                times[kernel].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"spec": name, "blocks": chain.L, "slots": slots, "options": int(problem.nopt.sum()), **{f"{k}_s": v for k, v in med.items()}})
        print(rows[-1], file=sys.stderr, flush=True)
    lines = [
        "# Chain DP kernels: numba vs numpy\n",
        f"Machine: {machine()}. The same table filled by each kernel, median of 5 interleaved runs.\n",
        "| graph | blocks | memory slots | options | numba s | numpy s | numpy / numba |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['spec']} | {r['blocks']} | {r['slots']} | {r['options']} | {r['numba_s']:.4f} | {r['numpy_s']:.4f} |"
                     f" {r['numpy_s'] / r['numba_s']:.1f}x |")
    write(args, "hybrid_dp", lines, rows)


def write(args, stem: str, lines: list[str], rows) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["small", "large", "dp"])
    parser.add_argument("--limit", type=float, default=60.0, help="time limit of each searching run (s)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    {"small": run_small, "large": run_large, "dp": run_dp}[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
