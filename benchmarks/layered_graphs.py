"""Seeded layered Checkmate-format graphs: the hybrid engine at 0.8x the store-all peak,
and every method's wall time against ``--time-limit``.

Not a test: it measures. The graphs are :func:`monetdsl.synth.layered_spec` (``2 * n``
nodes: ``n`` forward, ``n`` backward; one implementation per op, no in-place): the
plain-DAG benchmarks of Checkmate and Moccasin. Two tables:

``hybrid``
    ``--method hybrid --budget 0.8x store-all`` per graph size and seed: overhead, gap to
    the engine's lower bound, solve seconds.
``limits``
    methods whose exact minimum-budget search used to run far past the limit
    (``chen-greedy`` at an infeasible budget, ``milp``, ``checkmate-lp``): wall seconds
    against the limit, and what they report.

Writes ``benchmarks/results/layered_graphs.md`` and ``.json`` (or ``--out``)::

    python benchmarks/layered_graphs.py --nodes 100,400,1000 --seeds 0,1 --time-limit 60
    python benchmarks/layered_graphs.py --nodes 400 --time-limit 10 --skip-hybrid
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from exact_engine import machine  # noqa: E402
from monet_table import _atomic  # noqa: E402

from monetdsl.search.solve import solve  # noqa: E402
from monetdsl.synth import layered_spec  # noqa: E402

LIMIT_METHODS = ["chen-greedy", "milp", "checkmate-lp"]


def hybrid_rows(nodes, seeds, limit):
    rows = []
    for n in nodes:
        for seed in seeds:
            spec = layered_spec(n // 2, seed)
            store = solve(spec, "store-all").simulation.peak_bytes
            budget = int(0.8 * store)
            t = time.perf_counter()
            result = solve(spec, "hybrid", memory_budget=budget, time_limit=limit, exact_min_budget=False)
            wall = time.perf_counter() - t
            sim = result.simulation
            row = {"nodes": n, "seed": seed, "budget": budget, "status": result.status, "wall": round(wall, 1),
                   "overhead": sim.overhead if result.success and sim.ok else None, "gap": result.gap,
                   "origin": result.details.get("origin")}
            rows.append(row)
            print(_hybrid_line(row), flush=True)
    return rows


def _hybrid_line(r):
    ovh = "—" if r["overhead"] is None else f"{r['overhead']:.2%}"
    gap = "—" if r["gap"] is None else f"{r['gap']:.2%}"
    return f"| {r['nodes']} | {r['seed']} | {ovh} | {gap} | {r['wall']:.0f} | {r['status']} | {r['origin']} |"


def limit_rows(nodes, limit):
    rows = []
    for n in nodes:
        spec = layered_spec(n // 2, 0)
        store = solve(spec, "store-all").simulation.peak_bytes
        for method in LIMIT_METHODS:
            t = time.perf_counter()
            result = solve(spec, method, memory_budget=int(0.8 * store), time_limit=limit)
            wall = time.perf_counter() - t
            row = {"nodes": n, "method": method, "limit": limit, "wall": round(wall, 1), "status": result.status,
                   "min_budget": result.min_feasible_budget, "exact": result.min_feasible_budget_exact,
                   "message": result.message[:200]}
            rows.append(row)
            print(_limit_line(row), flush=True)
    return rows


def _limit_line(r):
    return f"| {r['nodes']} | {r['method']} | {r['limit']:g} | {r['wall']:.1f} | {r['status']} | {r['message']} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="100,400,1000", help="graph sizes in nodes (forward + backward)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--limit-nodes", default="400,1000", help="graph sizes of the time-limit table")
    parser.add_argument("--skip-hybrid", action="store_true")
    parser.add_argument("--skip-limits", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    try:
        nodes = [int(x) for x in args.nodes.split(",") if x]
        seeds = [int(x) for x in args.seeds.split(",") if x]
        limit_nodes = [int(x) for x in args.limit_nodes.split(",") if x]
    except ValueError:
        parser.error("--nodes, --seeds and --limit-nodes take integers separated by commas")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/layered_graphs.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = []
    data: dict = {"command": command}
    if not args.skip_hybrid:
        head = "| nodes | seed | overhead at 0.8x store-all | gap | wall s | status | origin |\n|---|---|---|---|---|---|---|"
        print(head)
        data["hybrid"] = hybrid_rows(nodes, seeds, args.time_limit)
        lines += ["## Hybrid at 0.8x the store-all peak", "", head, *[_hybrid_line(r) for r in data["hybrid"]], ""]
    if not args.skip_limits:
        head = "| nodes | method | limit s | wall s | status | message |\n|---|---|---|---|---|---|"
        print(head)
        data["limits"] = limit_rows(limit_nodes, args.time_limit)
        lines += ["## Wall time against the limit (budget 0.8x store-all)", "", head, *[_limit_line(r) for r in data["limits"]], ""]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data["when"] = when
    load = "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min) at the end".format(*os.getloadavg())
    text = "\n".join(["# Seeded layered Checkmate-format graphs", "", f"{when}; {machine()}; {load}; `{command}`.", "", *lines])
    _atomic(out / "layered_graphs.md", lambda f: f.write(text.encode()))
    _atomic(out / "layered_graphs.json", lambda f: f.write(json.dumps(data, indent=1).encode()))
    print("wrote", out / "layered_graphs.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
