"""Benchmark: planning time, from ``monetdsl.optimize`` to the first training step, and the
quality of the schedule it plans against a full search. Not a test: it measures.

Per model (the zoo and benchmark models of :mod:`monetdsl.models`, on CPU):

* **cold**: a fresh process with an empty cache directory runs ``monetdsl.optimize(model,
  x, max_overhead=CAP)`` with default options, then one training step (forward and
  backward); the time from the call to the end of the step (imports excluded; tracing,
  the search, lowering and the step included);
* **warm**: a second fresh process on the same cache directory does the same (the captured
  step, the schedule and the costs are read back: replay, lowering and the step remain);
  ``warm: planning`` is the part until ``optimize`` returns, before the first step;
* **quality**: the planned peak at the cap against the one a full search finds on the same
  traced graph in ``--reference`` seconds (the same method with the stall rule off, so it
  uses its whole limit: ``options={"stall_share": None}``), under the cap the plan's search
  had (the runtime turns the caller's cap against eager's step into a cap for the search,
  :mod:`monetdsl.runtime.eager_reference`; ``search cap`` in the JSON; ``-`` and method
  ``eager`` or ``store-all`` when no room was left to recompute, nothing was searched and
  there is nothing to compare). Positive: the default plan's peak is that much above the
  full search's.

``--specs`` adds the shipped ``.monet`` specs: ``monetdsl.search.solve.solve`` with default
options against the full search, on the spec's own costs.

Targets: cold <= 10 s under 100 forward ops and <= 45 s for ResNet-50-sized graphs; warm
<= 2 s; quality within 1 %. Results accumulate in ``benchmarks/results/plan_time.json``
(one entry per model, the latest run kept) and are printed and written as
``benchmarks/results/plan_time.md``. Run from the repository root::

    python benchmarks/plan_time.py --models small_cnn,tiny_resnet --reference 60
    python benchmarks/plan_time.py --specs resblock,transformer_block --models ''
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: model name -> (factory, input maker) ; inputs are built in the child process
MODELS = {
    "small_cnn": ("monetdsl.models:small_cnn", "image:8x3x32x32"),
    "tiny_resnet": ("monetdsl.models:tiny_resnet", "image:8x3x32x32"),
    "tiny_mobile": ("monetdsl.models:tiny_mobile", "image:8x3x32x32"),
    "tiny_unet": ("monetdsl.models:tiny_unet", "image:4x3x32x32"),
    "tiny_gpt": ("monetdsl.models:tiny_gpt", "tokens:4x64:512"),
    "resnet18_like": ("monetdsl.models.bench:resnet18_like", "image+label:8x3x64x64:100"),
    "gpt_like": ("monetdsl.models.bench:gpt_like", "tokens+next:4x256:8192"),
    "resnet50": ("monetdsl.models:resnet50", "image:2x3x64x64"),
}
DEFAULT_MODELS = "small_cnn,tiny_resnet,tiny_gpt,resnet18_like,resnet50"
CAP = 0.1
OUT = ROOT / "benchmarks" / "results"


def _inputs(kind: str):
    import torch

    torch.manual_seed(0)
    what, shape, *rest = kind.split(":")
    dims = [int(d) for d in shape.split("x")]
    if what == "image":
        return (torch.randn(*dims),)
    if what == "image+label":
        return torch.randn(*dims), torch.randint(0, int(rest[0]), (dims[0],))
    if what == "tokens":
        return (torch.randint(0, int(rest[0]), dims),)
    if what == "tokens+next":
        return torch.randint(0, int(rest[0]), dims), torch.randint(0, int(rest[0]), dims)
    raise ValueError(kind)


def _model(factory: str):
    import importlib

    module, name = factory.split(":")
    return getattr(importlib.import_module(module), name)()


def child(name: str, cache_dir: str, reference: float) -> dict:
    """One measurement in this (fresh) process; ``reference`` > 0 also runs the full search."""
    import torch

    import monetdsl
    from monetdsl.search.solve import solve

    factory, kind = MODELS[name]
    model = _model(factory)
    x = _inputs(kind)
    begin = time.perf_counter()
    fast = monetdsl.optimize(model, x, max_overhead=CAP, cache_dir=cache_dir)
    planned = time.perf_counter() - begin
    out = fast(*x)
    (out if out.dim() == 0 else out.float().square().mean()).backward()
    seconds = time.perf_counter() - begin
    plan = fast.plans[0]
    row = {"seconds": seconds, "plan_seconds": planned, "forward_ops": len(plan.spec.network.forward_ops),
           "peak": plan.planned_peak, "compute_us": plan.simulation.compute_us, "threads": torch.get_num_threads()}
    if reference > 0:
        from monetdsl.planning import Constraints
        from monetdsl.runtime.eager_reference import cap_against_eager

        # the cap the plan's search had (read back from the measurement store, not timed again)
        searched = cap_against_eager(model, x, plan.trace, plan.spec, Constraints(max_overhead=CAP), optimizer="adam",
                                     cache_dir=cache_dir)
        if searched.max_overhead is None:  # no room to recompute: eager's own step or store-all, nothing searched
            row.update(reference_peak=plan.planned_peak, reference_seconds=0.0,
                       method="eager" if getattr(searched, "eager", False) else "store-all", search_cap=None)
        else:
            full = solve(plan.spec, "auto", max_overhead=searched.max_overhead, time_limit=reference,
                         options={"stall_share": None})
            row.update(reference_peak=full.simulation.peak_bytes, reference_seconds=full.solve_seconds,
                       method=full.details.get("chosen", full.method), search_cap=searched.max_overhead)
    return row


def _run_child(name: str, cache_dir: str, reference: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", name, cache_dir, str(reference)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: the child process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_model(name: str, reference: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="monetdsl-plan-time-") as cache_dir:
        cold = _run_child(name, cache_dir, 0.0)
        warm = _run_child(name, cache_dir, reference)
    assert warm["peak"] == cold["peak"], "the warm run planned another schedule"
    return {"kind": "model", "ops": cold["forward_ops"], "cold_s": cold["seconds"], "warm_s": warm["seconds"],
            "warm_plan_s": warm["plan_seconds"],
            "peak": cold["peak"], "reference_peak": warm.get("reference_peak"), "reference_s": warm.get("reference_seconds"),
            "method": warm.get("method"), "threads": cold["threads"], "search_cap": warm.get("search_cap")}


def measure_spec(name: str, reference: float) -> dict:
    from monetdsl.grammar import load_spec
    from monetdsl.search.solve import solve

    spec = load_spec(ROOT / "specs" / f"{name}.monet")
    default = solve(spec, "auto", max_overhead=CAP)
    full = solve(spec, "auto", max_overhead=CAP, time_limit=reference, options={"stall_share": None})
    return {"kind": "spec", "ops": len(spec.network.forward_ops), "cold_s": default.solve_seconds, "warm_s": None,
            "peak": default.simulation.peak_bytes, "reference_peak": full.simulation.peak_bytes,
            "reference_s": full.solve_seconds, "method": default.details.get("chosen", default.method),
            "stopped": default.details.get("stopped")}


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return proc.stdout.strip() or "?"


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: dict) -> str:
    from monetdsl.units import human_bytes

    lines = ["| model | forward ops | method | search cap | cold s | warm s | warm: planning s | planned peak | full search peak (s)"
             " | quality | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        quality = None if r.get("reference_peak") is None else (r["peak"] - r["reference_peak"]) / r["reference_peak"]
        ref = "-" if r.get("reference_peak") is None else f"{human_bytes(r['reference_peak'])} ({r['reference_s']:.0f} s)"
        label = name if r["kind"] == "model" else f"spec {name.removeprefix('spec:')}"
        cap = "-" if r.get("search_cap") is None else f"{r['search_cap']:.1%}"
        lines.append(f"| {label} | {r['ops']} | {r.get('method') or '-'} | {cap} | {_cell(r['cold_s'], '.1f')} | {_cell(r['warm_s'], '.1f')}"
                     f" | {_cell(r.get('warm_plan_s'), '.1f')} | {human_bytes(r['peak'])} | {ref} | {_cell(quality, '+.2%')} | {r['date']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--specs", default="", help="comma-separated shipped spec names (specs/NAME.monet)")
    parser.add_argument("--reference", type=float, default=60.0, help="seconds of the full search (0: skip it)")
    parser.add_argument("--note", default="", help="conditions of this run (machine load), kept with its rows")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], float(args.child[2]))))
        return
    store = OUT / "plan_time.json"
    rows = json.loads(store.read_text()) if store.exists() else {}
    command = "python benchmarks/plan_time.py " + " ".join(sys.argv[1:])
    stamp = datetime.date.today().isoformat()
    todo = [(n, "model") for n in args.models.split(",") if n] + [(n, "spec") for n in args.specs.split(",") if n]
    for name, kind in todo:
        t = time.perf_counter()
        row = measure_model(name, args.reference) if kind == "model" else measure_spec(name, args.reference)
        row.update(date=stamp, command=command, note=args.note, commit=_commit())
        rows[name if kind == "model" else f"spec:{name}"] = row
        print(f"{name}: {json.dumps(row)} [{time.perf_counter() - t:.0f} s]", flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        from monetdsl.io import atomic_write

        atomic_write(store, json.dumps(rows, indent=1, sort_keys=True) + "\n")
    text = table(dict(sorted(rows.items(), key=lambda item: (item[1]["kind"], item[1]["ops"]))))
    header = (f"# Planning time (benchmarks/plan_time.py)\n\nMachine: {platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}; `max_overhead={CAP}`, otherwise default options. Each row's command "
              "is in plan_time.json.\n\n")
    notes = sorted({f"{r['date']}, commit {r.get('commit', '?')}: {r['note']}" for r in rows.values() if r.get("note")})
    text += "".join(f"\n\n{n}" for n in notes)
    print(text)
    from monetdsl.io import atomic_write

    atomic_write(OUT / "plan_time.md", header + text + "\n")


if __name__ == "__main__":
    main()
