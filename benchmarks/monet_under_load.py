"""MONeT's five models with the CPU loaded: does the result depend on the machine's speed?

Not a test: it measures. A user's machine is often busy, and a search whose stop rules
count seconds sees less of its block menus when other processes take the cores. For each
model this solves the full spec once on the machine as it is ("quiet") and once with
``--busy`` extra processes spinning alongside ("loaded"), the same ``--time-limit`` and
overhead cap (against PyTorch's time, as in ``monet_table.py``), each in a new process,
and prints both peaks,
their difference, and why each search stopped.

Writes ``benchmarks/results/monet_under_load.md`` and ``.json`` (or ``--out``).

    python benchmarks/monet_under_load.py                          # five models, 10 %, 60 s, 2 busy loops
    python benchmarks/monet_under_load.py --models resnet50,vgg16 --busy 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from exact_engine import machine  # noqa: E402
from monet_table import MODELS, _atomic, run_fresh  # noqa: E402

from monetdsl.grammar import load_spec  # noqa: E402
from monetdsl.search.impl_choice import no_recompute_compute_us  # noqa: E402
from monetdsl.search.restrict import reduced_spec  # noqa: E402
from monetdsl.search.solve import solve  # noqa: E402

GIB = 2**30


def _spin() -> None:  # pragma: no cover - a busy loop, ended by terminate()
    while True:
        pass


class BusyLoops:
    """``count`` processes that keep a core each busy while the block runs."""

    def __init__(self, count: int):
        self.count = count
        self.procs: list = []

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self.procs = [ctx.Process(target=_spin, daemon=True) for _ in range(self.count)]
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join()


def one(model: str, cap: float, time_limit: float, busy: int) -> dict:
    reduced = reduced_spec(load_spec(ROOT / "specs" / f"{model}.monet"))
    pytorch_us = no_recompute_compute_us(reduced.network)
    pytorch_peak = solve(reduced, "store-all").simulation.peak_bytes
    row = {"model": model, "cap": cap, "pytorch_peak": pytorch_peak}
    for label, loops in (("quiet", 0), ("loaded", busy)):
        with BusyLoops(loops):
            load_before = os.getloadavg()[0]
            run = run_fresh(model, "full", "hybrid", cap, pytorch_us, time_limit, keep_details=True)
            run["load"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        row[label] = run
    return row


def _peak(run: dict, pytorch_peak: int) -> str:
    if run.get("peak") is None:
        return run["status"]
    return f"{run['peak'] / GIB:.2f} GiB ({pytorch_peak / run['peak']:.2f}x) @ {100 * run['overhead']:.1f}%"


def _line(row: dict) -> str:
    q, l = row["quiet"], row["loaded"]
    diff = "-" if q.get("peak") is None or l.get("peak") is None else f"{100 * (l['peak'] / q['peak'] - 1):+.1f}%"
    why = lambda r: str(r.get("details", {}).get("stopped", "")).replace("|", "/")  # noqa: E731
    return (f"| {row['model']} | {100 * row['cap']:.1f}% | {_peak(q, row['pytorch_peak'])} | {_peak(l, row['pytorch_peak'])} | {diff} "
            f"| {q['load'][0]}-{q['load'][1]} / {l['load'][0]}-{l['load'][1]} | {q['seconds']:.0f} / {l['seconds']:.0f} | {why(q)} / {why(l)} |")


HEADER = ("| model | cap (vs PyTorch) | quiet | loaded | loaded vs quiet | load average (quiet / loaded) | solve s | stopped (quiet / loaded) |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all five)")
    parser.add_argument("--cap", type=float, default=0.10, help="overhead cap against PyTorch's time (default 0.10)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per solve (default 60)")
    parser.add_argument("--busy", type=int, default=2, help="busy-loop processes during the loaded solve (default 2)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.busy < 1:
        parser.error("--busy takes a positive number of processes")
    command = "python benchmarks/monet_under_load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(HEADER, flush=True)
    rows = []
    for model in models:
        rows.append(one(model, args.cap, args.time_limit, args.busy))
        print(_line(rows[-1]), flush=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# MONeT's five models, quiet and with the CPU loaded",
        "",
        f"{when}; {machine()}; `{command}` ({args.time_limit:g} s per solve, {args.busy} busy-loop processes during each",
        "loaded solve). \"quiet\" is the machine as it was (other jobs included: see the load averages).",
        "",
        "Full spec, `--method hybrid`, least peak within the cap; peaks are the simulator's replay.",
        "",
        HEADER,
        *[_line(r) for r in rows],
        "",
    ])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "monet_under_load.md", lambda f: f.write(text.encode()))
    _atomic(out / "monet_under_load.json", lambda f: f.write(json.dumps({"when": when, "command": command, "rows": rows},
                                                                         indent=1, default=str).encode()))
    print("wrote", out / "monet_under_load.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
