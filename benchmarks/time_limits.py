"""Does ``monetdsl solve ... --time-limit T`` end by ``T``? Every method, whole commands.

Not a test: it measures. Each row runs the command line in a new process (spec parsing,
the search, the replay and writing the schedule included), and subtracts the start-up
of a process that imports the command and solves a two-op spec by store-all
(``specs/tiny_chain.monet`` within a budget it meets, measured once beforehand, the median of three) to give the
time the command itself took past the limit. The start-up is measured again right before
each row (once, and the median of three at the start for the header), as the machine's
load changes.

Graphs: MONeT's five specs (``--max-overhead 10%``) and the seeded layered
Checkmate-format graphs of :func:`monetdsl.synth.layered_training_graph` imported with
``monetdsl import checkmate`` (``--budget`` 0.8x their store-all peak, which the plain
methods miss, so their exact minimum budget runs in what is left of the limit).

Writes ``benchmarks/results/time_limits.md`` and ``.json`` (or ``--out``, ``--name``)::

    python benchmarks/time_limits.py --time-limit 20
    python benchmarks/time_limits.py --time-limit 60 --specs layered400,googlenet --methods milp,hybrid --name time_limits_60s
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from exact_engine import machine  # noqa: E402
from monet_table import _atomic  # noqa: E402

from monetdsl.search.solve import METHODS, solve  # noqa: E402
from monetdsl.synth import layered_spec, layered_training_graph  # noqa: E402

MONET_SPECS = ["resnet50", "googlenet", "unet", "mobilenet_v2", "vgg16"]
LAYERED = {"layered100": 50, "layered400": 200, "layered1000": 500}
#: methods that search: MONeT's specs run only these (the plain ones end in well under a
#: second with only an overhead cap, having no budget to miss)
SEARCHERS = ["milp", "hybrid", "checkmate", "checkmate-lp"]
#: what each row keeps of the result's details (where the time went)
DETAIL_KEYS = ("seconds", "stopped", "blocks_skipped", "menu_seconds", "menu_points_left", "model", "fallback", "restricted",
               "solver_seconds", "solver_not_started", "exact_min_budget", "lp")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "monetdsl", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def start_up_seconds(repeats: int = 3) -> float:
    """Median wall time of a process that imports the command and solves a tiny spec."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(_cli("solve", str(ROOT / "specs" / "tiny_chain.monet"), "--method", "store-all", "--budget", "1TiB",
                            "--no-write", "-q"), env=_env(), capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layered_file(name: str, folder: Path) -> tuple[Path, list[str]]:
    """The layered graph ``name`` as a spec file, and the flags that set its budget."""
    n_forward = LAYERED[name]
    graph = folder / f"{name}.json"
    graph.write_text(json.dumps(layered_training_graph(n_forward, 0)))
    spec = folder / f"{name}.monet"
    subprocess.run(_cli("import", "checkmate", str(graph), "-o", str(spec)), env=_env(), capture_output=True, check=True)
    store = solve(layered_spec(n_forward, 0), "store-all").simulation.peak_bytes
    return spec, ["--budget", f"{int(0.8 * store)}B"]


def run_row(spec: Path, flags: list[str], method: str, limit: float, folder: Path) -> dict:
    start_up = start_up_seconds(1)  # right before the row: the machine's load changes
    command = _cli("solve", str(spec), "--method", method, "--time-limit", f"{limit:g}", *flags, "--json", "-q",
                   "-o", str(folder / f"{spec.stem}.{method}.schedule.monet"))
    t = time.perf_counter()
    done = subprocess.run(command, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    try:
        data = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        data = {"status": f"exit {done.returncode}", "message": done.stderr.strip()[-200:]}
    return {"spec": spec.stem, "method": method, "limit": limit, "wall": round(wall, 2), "start_up": round(start_up, 2),
            "past_limit": round(wall - start_up - limit, 2), "status": data.get("status"),
            "solve_seconds": data.get("solve_seconds"), "message": (data.get("message") or "")[:160],
            "details": {k: v for k, v in (data.get("details") or {}).items() if k in DETAIL_KEYS}}


def _line(r: dict) -> str:
    return (f"| {r['spec']} | {r['method']} | {r['limit']:g} | {r['wall']:.1f} | {r['start_up']:.1f} | {r['past_limit']:+.1f} |"
            f" {r['status']} |"
            f" {r['message']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-limit", type=float, default=20.0)
    parser.add_argument("--specs", default=",".join([*MONET_SPECS, *LAYERED]), help="MONeT spec names and layered100/400/1000")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods (MONeT's specs run only the searching ones)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--name", default="time_limits", help="results file name (NAME.md, NAME.json)")
    args = parser.parse_args(argv)
    names = [s for s in args.specs.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [s for s in names if s not in MONET_SPECS and s not in LAYERED] + [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown spec or method: {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/time_limits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start_up = start_up_seconds()
    head = ("| spec | method | limit s | wall s | start-up s | past the limit s | status | message |\n"
            "|---|---|---|---|---|---|---|---|")
    print(f"start-up {start_up:.2f} s\n{head}", flush=True)
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in names:
            if name in LAYERED:
                spec, flags = layered_file(name, folder)
                chosen = methods
            else:
                spec, flags = ROOT / "specs" / f"{name}.monet", ["--max-overhead", "10%"]
                chosen = [m for m in methods if m in SEARCHERS]
            for method in chosen:
                row = run_row(spec, flags, method, args.time_limit, folder)
                rows.append(row)
                print(_line(row), flush=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min) at the start, {:.1f} / {:.1f} / {:.1f} at the end".format(
        *load_before, *os.getloadavg())
    worst = max((r["past_limit"] for r in rows), default=0.0)
    text = "\n".join([
        "# Wall time of `monetdsl solve` against `--time-limit`", "",
        f"{when}; {machine()}; {load} (the machine is shared with other jobs); `{command}`.", "",
        f"Each row is one `monetdsl solve SPEC --method M --time-limit {args.time_limit:g} ... --json -o FILE` in a new"
        f" process. \"past the limit\" is its wall time less the limit and less the start-up of a process that solves"
        f" a two-op spec by store-all, measured right before the row (at the start {start_up:.2f} s, median of three). MONeT's specs: `--max-overhead 10%`;"
        " layered graphs (seed 0): `--budget` 0.8x the store-all peak.", "",
        f"Largest time past the limit: {worst:+.1f} s.", "",
        head, *[_line(r) for r in rows], "",
    ])
    _atomic(out / f"{args.name}.md", lambda f: f.write(text.encode()))
    _atomic(out / f"{args.name}.json", lambda f: f.write(json.dumps({"command": command, "when": when, "start_up": start_up,
                                                                   "rows": rows}, indent=1).encode()))
    print("wrote", out / f"{args.name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
