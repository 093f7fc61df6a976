"""MONeT's table on its own five models: memory at an overhead cap, against PyTorch and MONeT.

Not a test: it measures. For each shipped MONeT-scale spec (P100 roofline costs) and each
overhead cap (10 % and MONeT's own overhead nearest below it, by default), the least
peak within the cap from:

* ``monetdsl``: ``--method hybrid`` on the spec as shipped (every implementation; VGG-16's
  first block a batch-sliced segment, as ``monetdsl trace`` writes it by default);
* ``no alternatives``: the same search on PyTorch's own ops with their first (PyTorch)
  implementations: the op-by-op spec (``specs/MODEL_no_segments.monet`` where the shipped
  one has segments) reduced by :func:`monetdsl.search.restrict.reduced_spec`;
* ``checkmate-lp``: Checkmate's LP relaxation with rounding, where it finishes in time
  (at the 10 % cap only);
* ``without segments``: where the shipped spec has segments, the same search on the
  op-by-op spec with every implementation (what implementation choice alone gives).

Each column's caps are solved smallest first in one new process (:func:`walk_caps`): a
larger cap starts from the schedules the smaller ones found, so a column's peak never
rises with the cap. Overheads are against PyTorch's time (every op once with its first implementation), as
MONeT reports them; the full spec's cap is converted to its own baseline so that every
search gets the same absolute compute allowance. Memory ratios are PyTorch's store-all
peak (first implementations) over the peak found. MONeT's published points (GB and
overhead at budgets 10 ... 5 GB, P100, Gurobi with 24 h) are listed for comparison; the
ratio is the fair comparison (MONeT's PyTorch peaks were measured, ours are planned).

Writes ``benchmarks/results/monet_table.md`` and ``.json`` (or ``--out``) and one Pareto
plot per model (``monet_pareto_MODEL.png``: memory against overhead).

    python benchmarks/monet_table.py                       # all five, 60 s per solve
    python benchmarks/monet_table.py --models vgg16 --time-limit 20 --no-checkmate
    python benchmarks/monet_table.py --overheads 0.05,0.10 --frontier
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from exact_engine import machine  # noqa: E402

from monetdsl.grammar import load_spec  # noqa: E402
from monetdsl.search.impl_choice import no_recompute_compute_us  # noqa: E402
from monetdsl.search.restrict import reduced_spec  # noqa: E402
from monetdsl.search.solve import solve  # noqa: E402
from monetdsl.slicing import is_segment  # noqa: E402

GIB = 2**30
MODELS = ["resnet50", "googlenet", "unet", "mobilenet_v2", "vgg16"]
#: MONeT's README (schedule zoo), P100: PyTorch's peak in GB and (budget GB, overhead
#: against PyTorch) at the budgets 10 ... 5 GB (VGG-16's measured memory in brackets there)
MONET = {
    "resnet50": (15.06, [(10, 0.0322), (9, 0.0468), (8, 0.0556), (7, 0.0728), (6, 0.0931), (5, 0.1195)]),
    "googlenet": (14.93, [(10, 0.0713), (9, 0.0787), (8, 0.0844), (7, 0.0971), (6, 0.1214), (5, 0.1577)]),
    "unet": (14.32, [(10, -0.0410), (9, -0.0207), (8, -0.0009), (7, 0.0139), (6, 0.0495), (5, 0.1151)]),
    "mobilenet_v2": (14.46, [(10, 0.0240), (9, 0.0310), (8, 0.0477), (7, 0.0553), (6, 0.0755), (5, 0.0872)]),
    "vgg16": (14.12, [(9.71, -0.0530), (8.66, -0.0464), (7.88, -0.0218), (6.82, 0.0199), (5.90, 0.0544), (5.51, 0.0911)]),
}
HEADLINE_CAP = 0.10


def monet_point(model: str, cap: float):
    """MONeT's point of least memory within ``cap`` (ratio, GB, overhead), or None."""
    pytorch, points = MONET[model]
    within = [(gb, o) for gb, o in points if o <= cap + 1e-12]
    if not within:
        return None
    gb, o = min(within)
    return pytorch / gb, gb, o


def caps_for(model: str, overheads: list[float] | None, frontier: bool) -> list[float]:
    if overheads:
        caps = list(overheads)
    else:
        caps = [HEADLINE_CAP]
        nearest = monet_point(model, HEADLINE_CAP)
        if nearest is not None and nearest[2] > 0:
            caps.append(nearest[2])
    if frontier:
        caps += [o for _, o in MONET[model][1] if o > 0]
    return sorted(set(round(c, 6) for c in caps))


#: what the search's details say about where its time went (kept with ``keep_details``)
DETAIL_KEYS = ("stopped", "menus_stopped", "menu_seconds", "menu_points_pending", "menu_points_left", "menu_milp_solves",
               "blocks_skipped", "origin", "seconds")


def run_one(spec, method: str, cap_vs_pytorch: float, pytorch_us: float, time_limit: float, keep_details: bool = False) -> dict:
    own_base = no_recompute_compute_us(spec.network)
    cap_own = (1 + cap_vs_pytorch) * pytorch_us / own_base - 1
    t = time.perf_counter()
    result = solve(spec, method, max_overhead=cap_own, time_limit=time_limit)
    seconds = time.perf_counter() - t
    sim = result.simulation
    row = {"status": result.status, "seconds": round(seconds, 2), "peak": None, "overhead": None, "gap": result.gap,
           "lower_bound": result.lower_bound}
    if result.success and sim is not None and sim.ok:
        row.update(peak=sim.peak_bytes, overhead=sim.compute_us / pytorch_us - 1, origin=result.details.get("origin"),
                   impls=dict(result.schedule.impls))
        if "restricted" in result.details:
            row["restricted_pass"] = result.details["restricted"]
    if keep_details:
        row["details"] = {k: result.details[k] for k in DETAIL_KEYS if k in result.details}
    return row


def op_by_op_path(model: str) -> Path:
    """The model's spec with PyTorch's ops one by one: ``MODEL_no_segments.monet`` where the
    shipped spec has batch-sliced segments (``monetdsl trace --no-segments``), else the
    shipped spec itself."""
    plain = ROOT / "specs" / f"{model}_no_segments.monet"
    return plain if plain.exists() else ROOT / "specs" / f"{model}.monet"


def spec_variant(model: str, variant: str):
    """The spec a column searches: ``full`` (as shipped), ``reduced`` (op by op, first
    implementations) or ``no_segments`` (op by op, every implementation)."""
    if variant == "full":
        return load_spec(ROOT / "specs" / f"{model}.monet")
    spec = load_spec(op_by_op_path(model))
    return reduced_spec(spec) if variant == "reduced" else spec


def segments_of(spec) -> list[str]:
    """The batch-sliced segments of a spec."""
    return [op.name for op in spec.network.forward_ops if is_segment(op)]


def _run_in_child(model: str, variant: str, method: str, cap_vs_pytorch: float, pytorch_us: float, time_limit: float,
                  keep_details: bool) -> dict:
    spec = spec_variant(model, variant)
    row = run_one(spec, method, cap_vs_pytorch, pytorch_us, time_limit, keep_details)
    segments = segments_of(spec)
    if segments and row.get("peak") is not None:
        row["slices"] = {name: (row["impls"].get(name), row["impls"].get(name + ".backward")) for name in segments}
    row.pop("impls", None)
    return row


def run_fresh(model: str, variant: str, method: str, cap_vs_pytorch: float, pytorch_us: float, time_limit: float,
              keep_details: bool = False) -> dict:
    """:func:`run_one` in a new process, as a user's command runs: the block menus and the
    schedules a search of the same graph found earlier are kept per process
    (``hybrid.menus.DEFAULT_CACHE``, :mod:`monetdsl.search.known`), and a second cap solved
    in the same process would start from the first one's."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_in_child, model, variant, method, cap_vs_pytorch, pytorch_us, time_limit, keep_details).result()


def _caps_in_child(model: str, variant: str, caps: list[float], pytorch_us: float, time_limit: float) -> list[dict]:
    return [_run_in_child(model, variant, "hybrid", cap, pytorch_us, time_limit, True) for cap in caps]


def walk_caps(model: str, variant: str, caps: list[float], pytorch_us: float, time_limit: float) -> list[dict]:
    """The hybrid at every cap of ``caps``, smallest first, in one new process: a schedule
    within a smaller cap is within the larger ones, and the searches of the same graph in
    one process start from the schedules found before (:mod:`monetdsl.search.known`), so
    the least peak found never rises with the cap."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_caps_in_child, model, variant, sorted(caps), pytorch_us, time_limit).result()


def measure(models, overheads, frontier, time_limit, checkmate) -> list[dict]:
    rows = []
    for model in models:
        has_segments = op_by_op_path(model) != ROOT / "specs" / f"{model}.monet"
        reduced = spec_variant(model, "reduced")
        pytorch_us = no_recompute_compute_us(reduced.network)
        pytorch_peak = solve(reduced, "store-all").simulation.peak_bytes
        caps = caps_for(model, overheads, frontier)
        columns = {"full": walk_caps(model, "full", caps, pytorch_us, time_limit),
                   "reduced": walk_caps(model, "reduced", caps, pytorch_us, time_limit)}
        if has_segments:
            columns["no_segments"] = walk_caps(model, "no_segments", caps, pytorch_us, time_limit)
        for k, cap in enumerate(caps):
            row = {"model": model, "cap": cap, "pytorch_peak": pytorch_peak, "pytorch_us": pytorch_us, "monet": monet_point(model, cap)}
            row.update({name: runs[k] for name, runs in columns.items()})
            if checkmate and abs(cap - HEADLINE_CAP) < 1e-9:
                row["checkmate_lp"] = run_fresh(model, "full", "checkmate-lp", cap, pytorch_us, time_limit, keep_details=True)
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _cell(run: dict | None, pytorch_peak: int) -> str:
    if run is None:
        return "—"
    if run.get("peak") is None:
        return f"— ({run['status']}, {run['seconds']:.0f} s)"
    return f"{run['peak'] / GIB:.2f} GiB ({pytorch_peak / run['peak']:.2f}x) @ {run['overhead']:.1%}"


def _gap(run: dict) -> str:
    if run.get("peak") is None or run.get("lower_bound") is None:
        return "—"
    return f"{run['gap']:.0%} (≥ {run['lower_bound'] / GIB:.2f} GiB)"


def _monet(point) -> str:
    if point is None:
        return "—"
    ratio, gb, o = point
    return f"{gb:g} GB ({ratio:.2f}x) @ {o:.1%}"


def _line(row: dict) -> str:
    p = row["pytorch_peak"]
    cells = [row["model"], f"{row['cap']:.1%}", f"{p / GIB:.2f} GiB", _cell(row["full"], p), _cell(row["reduced"], p)]
    cells.append(_cell(row.get("checkmate_lp"), p) if "checkmate_lp" in row else "not run")
    full, reduced = row["full"], row["reduced"]
    choice = f"{reduced['peak'] / full['peak']:.2f}x" if full.get("peak") and reduced.get("peak") else "—"
    cells += [choice, _monet(row["monet"]), f"{full['seconds']:.0f} / {reduced['seconds']:.0f}", _gap(full), _slices(full)]
    cells.append(_cell(row["no_segments"], p) + f"; {row['no_segments']['seconds']:.0f} s" if "no_segments" in row else "no segments")
    return "| " + " | ".join(cells) + " |"


def _slices(run: dict) -> str:
    if not run.get("slices"):
        return "—"
    return ", ".join(f"{name} {fwd}/{bwd}" for name, (fwd, bwd) in run["slices"].items())


HEADER = ("| model | cap (vs PyTorch) | PyTorch store-all | monetdsl (hybrid, spec as shipped) | same search, PyTorch's ops,"
          " no alternatives | checkmate-lp | choice worth | MONeT (published, P100) | solve s (full / reduced) | gap (full)"
          " | segments' forward/backward slices | without segments (op by op, every implementation; solve s) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def plot(rows: list[dict], out: Path) -> list[str]:
    """One PNG per model: peak memory as a fraction of PyTorch's store-all peak against
    overhead (MONeT's points as a fraction of its own PyTorch peak: the peaks themselves
    come from different accountings, P100 measurements against planned bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        pytorch_peak = mine[0]["pytorch_peak"]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for key, label, style in (("full", "monetdsl (full spec)", "o-"), ("reduced", "without alternatives", "s--"),
                                  ("checkmate_lp", "checkmate-lp", "^:"),
                                  ("no_segments", "without batch-sliced segments", "d-.")):
            pts = sorted((r[key]["overhead"] * 100, r[key]["peak"] / pytorch_peak) for r in mine if r.get(key) and r[key].get("peak"))
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        pytorch_gb, points = MONET[model]
        ax.plot([o * 100 for _, o in points], [gb / pytorch_gb for gb, _ in points], "kx", label="MONeT (published, P100)")
        ax.set_xlabel("compute overhead against PyTorch (%)")
        ax.set_ylabel("peak memory / PyTorch's store-all peak")
        ax.set_title(model)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"monet_pareto_{model}.png"
        _atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        written.append(str(path))
    return written


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all five)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per solve (default 60)")
    parser.add_argument("--overheads", default=None, help="comma-separated caps against PyTorch, e.g. 0.05,0.1")
    parser.add_argument("--frontier", action="store_true", help="also every positive overhead of MONeT's points")
    parser.add_argument("--no-checkmate", action="store_true", help="skip checkmate-lp")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--plot-only", metavar="JSON", help="redraw the plots from a results file, solve nothing")
    args = parser.parse_args(argv)
    if args.plot_only:
        for path in plot(json.loads(Path(args.plot_only).read_text())["rows"], Path(args.out)):
            print("wrote", path)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MONET]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    try:
        overheads = [float(x) for x in args.overheads.split(",")] if args.overheads else None
    except ValueError:
        parser.error("--overheads takes fractions separated by commas, e.g. 0.05,0.1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/monet_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(HEADER, flush=True)
    load_before = os.getloadavg()[0]
    rows = measure(models, overheads, args.frontier, args.time_limit, not args.no_checkmate)
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        "# MONeT's five models: memory within an overhead cap",
        "",
        f"{when}; {machine()}; {load}; `{command}` ({args.time_limit:g} s per solve).",
        "",
        "Peaks are planned (the simulator's replay of each schedule), overheads against PyTorch's",
        "time (first implementations, nothing recomputed); ratios against PyTorch's planned",
        "store-all peak. \"choice worth\": the peak without alternatives over the peak with them.",
        "MONeT's figures are its README's (P100 measurements, Gurobi up to 24 h).",
        "The main column searches the spec as shipped: VGG-16's first block is a batch-sliced segment",
        "there, as `monetdsl trace` writes it (docs/search.md, \"Batch-sliced segments\"). \"No",
        "alternatives\" is PyTorch's own ops and implementations (the spec traced with",
        "`--no-segments`, reduced); the last column, where the shipped spec has segments, searches",
        "that op-by-op spec with every implementation. Each column solves its caps smallest first in",
        "one process: a larger cap starts from the schedules the smaller ones found (they fit it).",
        "",
        HEADER,
        *[_line(r) for r in rows],
        "",
    ])
    _atomic(out / "monet_table.md", lambda f: f.write(text.encode()))
    _atomic(out / "monet_table.json", lambda f: f.write(json.dumps({"when": when, "command": command, "load": load, "rows": rows},
                                                                    indent=1).encode()))
    for path in plot(rows, out):
        print("wrote", path)
    print("wrote", out / "monet_table.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
