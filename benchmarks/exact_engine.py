"""Benchmark of the exact search engine. Not a test: it measures.

Two parts, each writing markdown, JSON and plots under ``--out`` (default
``benchmarks/results``):

``methods``
    Every method on every shipped spec over a ladder of budgets, from the exact minimum
    feasible budget (joint MILP) to the store-all peak: a markdown table (method, budget,
    status, peak, overhead, solve seconds, gap) and one Pareto plot per spec.

``scaling``
    How far the exact MILP goes: ResNet basic-block stacks and transformer-block stacks of
    growing depth (:mod:`monetdsl.synth`). At each size it solves the minimum-memory
    problem and the minimum-compute problem at 25 %, 50 % and 75 % of the way from the
    minimum budget to the store-all peak, each with the time limit given; a size counts as
    *proved* when all four solves end optimal. A ladder stops at its first unproved size.

Examples::

    python benchmarks/exact_engine.py methods
    python benchmarks/exact_engine.py scaling --limit 60
    python benchmarks/exact_engine.py scaling --limit 600 --start resnet=3,transformer=2

Run it from the repository root with the package importable (``pip install -e .`` or
``PYTHONPATH=.``). Timings are wall-clock seconds of :func:`monetdsl.search.solve.solve`
(heuristics, model building and HiGHS); the machine line in the output says where.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monetdsl.commands.sweep import plot_pareto, sweep_row  # noqa: E402
from monetdsl.grammar import load_spec  # noqa: E402
from monetdsl.grammar.parser import parse_spec  # noqa: E402
from monetdsl.search.solve import solve  # noqa: E402
from monetdsl.synth import resnet_stack, transformer_stack  # noqa: E402
from monetdsl.units import human_bytes  # noqa: E402

SPECS = ["tiny_chain", "resblock", "transformer_block"]
METHODS = ["milp", "checkmate", "checkmate-lp", "chen-sqrt", "chen-greedy", "revolve", "store-all", "recompute-all"]
LADDERS = {"resnet": resnet_stack, "transformer": transformer_stack}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import highspy  # noqa: F401
    import scipy

    try:
        from importlib.metadata import version

        hs = version("highspy")
    except Exception:  # noqa: BLE001
        hs = "?"
    return (
        f"{datetime.date.today().isoformat()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()},"
        f" highspy {hs}, scipy {scipy.__version__}"
    )


def fmt_row(r: dict) -> str:
    peak = "-" if r["peak_bytes"] is None else human_bytes(r["peak_bytes"])
    over = "-" if r["overhead"] is None else f"{100 * r['overhead']:.2f} %"
    gap = "-" if r["gap"] is None else f"{100 * r['gap']:.2f} %"
    return f"| {r['method']} | {human_bytes(r['budget'])} | {r['status']} | {peak} | {over} | {r['solve_seconds']:.2f} | {gap} |"


def run_methods(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Methods on the shipped specs\n", f"Machine: {machine()}; time limit {args.limit:g} s per searching run.\n"]
    everything = {}
    for name in SPECS:
        spec = load_spec(str(ROOT / "specs" / f"{name}.monet"))
        low = solve(spec, "milp", objective="memory", time_limit=args.limit)
        high = solve(spec, "store-all").simulation.peak_bytes
        budgets = sorted({low.min_feasible_budget + (high - low.min_feasible_budget) * k // (args.budgets - 1) for k in range(args.budgets)})
        rows = []
        for method in METHODS:
            for budget in budgets:
                result = solve(spec, method, memory_budget=budget, time_limit=args.limit, exact_min_budget=False)
                rows.append(sweep_row(method, budget, result))
                print(f"{name} {method} {human_bytes(budget)}: {result.status} {result.solve_seconds:.2f} s", file=sys.stderr)
        plot = out / f"pareto_{name}.png"
        plot_pareto(rows, str(plot), title=f"{name}: memory vs compute overhead")
        exact = "exact" if low.min_feasible_budget_exact else "not proved"
        lines += [
            f"\n## {name}\n",
            f"Minimum feasible budget {human_bytes(low.min_feasible_budget)} ({low.min_feasible_budget} B, {exact});"
            f" store-all peak {human_bytes(high)}. Plot: `{plot.name}`.\n",
            "| method | budget | status | peak | overhead | solve s | gap |",
            "|---|---|---|---|---|---|---|",
            *[fmt_row(r) for r in rows],
        ]
        everything[name] = {"min_budget": low.min_feasible_budget, "min_budget_exact": low.min_feasible_budget_exact, "store_all": high, "rows": rows}
    (out / "methods.md").write_text("\n".join(lines) + "\n")
    (out / "methods.json").write_text(json.dumps({"machine": machine(), "specs": everything}, indent=1))
    print("\n".join(lines))


def solve_size(kind: str, n: int, limit: float) -> dict:
    spec = parse_spec(LADDERS[kind](n), path=f"{kind}{n}.monet")
    high = solve(spec, "store-all").simulation.peak_bytes
    begin = time.perf_counter()
    # polish off: the time measured is the time to prove the minimum, not the follow-up search
    low = solve(spec, "milp", objective="memory", time_limit=limit, options={"polish": False})
    entry = {
        "size": n,
        "forward_ops": len(spec.network.forward_ops),
        "backward_ops": len(spec.network.backward_ops),
        "model": low.details.get("model"),
        "store_all": high,
        "min_memory": {
            "status": low.status,
            "exact": low.min_feasible_budget_exact,
            "peak": low.min_feasible_budget,
            "seconds": round(time.perf_counter() - begin, 2),
            "proof_seconds": low.details.get("proof_seconds"),
            "gap": low.gap,
        },
        "budgets": [],
    }
    print(f"{kind}{n} min-memory: {low.status} exact={low.min_feasible_budget_exact} {entry['min_memory']['seconds']} s", file=sys.stderr, flush=True)
    base = low.min_feasible_budget or (high // 2)
    for frac in (0.25, 0.5, 0.75):
        budget = int(base + frac * (high - base))
        result = solve(spec, "milp", memory_budget=budget, time_limit=limit, exact_min_budget=False)
        entry["budgets"].append(
            {"fraction": frac, "budget": budget, "status": result.status, "seconds": round(result.solve_seconds, 2), "gap": result.gap}
        )
        print(f"{kind}{n} {frac:.0%}: {result.status} gap={result.gap} {result.solve_seconds:.1f} s", file=sys.stderr, flush=True)
    entry["proved"] = entry["min_memory"]["exact"] and all(b["status"] == "optimal" for b in entry["budgets"])
    return entry


def run_scaling(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    starts = {"resnet": 1, "transformer": 1}
    for item in filter(None, (args.start or "").split(",")):
        key, _, value = item.partition("=")
        starts[key] = int(value)
    results = {}
    for kind in args.ladders.split(","):
        entries = []
        n = starts[kind]
        while n <= args.max_size:
            entry = solve_size(kind, n, args.limit)
            entries.append(entry)
            if not entry["proved"]:
                break
            n += 1
        results[kind] = entries
    tag = f"{args.limit:g}s"
    (out / f"scaling_{tag}.json").write_text(json.dumps({"machine": machine(), "limit": args.limit, "results": results}, indent=1))
    text = render_scaling(machine(), args.limit, results)
    (out / f"scaling_{tag}.md").write_text(text)
    print(text)


def _cell(seconds: float, ok: bool, status: str, gap) -> str:
    if ok:
        return f"{seconds:.1f} s"
    if gap is not None and status == "time_limit":
        return f"{seconds:.1f} s (gap {100 * gap:.1f} %)"
    return f"{seconds:.1f} s (not proved)"


def render_scaling(machine_line: str, limit: float, results: dict) -> str:
    lines = [
        f"# MILP scaling, time limit {limit:g} s per solve\n",
        f"Machine: {machine_line}.\n",
        "A size is *proved* when the minimum-memory solve (certified to the byte) and the minimum-compute"
        " solves at 25 %, 50 % and 75 % of the way from the minimum budget to the store-all peak all end"
        " optimal within the limit.\n",
        "| network | fwd ops | bwd ops | binaries | rows | nonzeros | min memory | 25 % | 50 % | 75 % | proved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, entries in results.items():
        for e in entries:
            mm = e["min_memory"]
            cells = [_cell(mm["seconds"], mm["exact"], mm["status"], mm.get("gap"))]
            cells += [_cell(b["seconds"], b["status"] == "optimal", b["status"], b["gap"]) for b in e["budgets"]]
            model = e["model"] or {}
            lines.append(
                f"| {kind}{e['size']} | {e['forward_ops']} | {e['backward_ops']} | {model.get('binaries', '-')}"
                f" | {model.get('rows', '-')} | {model.get('nonzeros', '-')} | {' | '.join(cells)} | {'yes' if e['proved'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def run_render(args) -> None:
    for path in sorted(Path(args.out).glob("scaling_*.json")):
        data = json.loads(path.read_text())
        text = render_scaling(data["machine"], data["limit"], data["results"])
        path.with_suffix(".md").write_text(text)
        print(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    m = sub.add_parser("methods", help="every method on the shipped specs over a budget ladder")
    m.add_argument("--limit", type=float, default=60.0, help="time limit of each searching run (s)")
    m.add_argument("--budgets", type=int, default=6, help="budgets per spec")
    m.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    m.set_defaults(run=run_methods)
    s = sub.add_parser("scaling", help="largest stacks the MILP proves optimal within a time limit")
    s.add_argument("--limit", type=float, default=60.0, help="time limit of each solve (s)")
    s.add_argument("--ladders", default="resnet,transformer")
    s.add_argument("--start", help="first size per ladder, e.g. resnet=3,transformer=2")
    s.add_argument("--max-size", type=int, default=12)
    s.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    s.set_defaults(run=run_scaling)
    r = sub.add_parser("render", help="rewrite the scaling markdown from its JSON")
    r.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    r.set_defaults(run=run_render)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
