"""``monetdsl sweep SPEC --budgets A..B:STEP``: every method at every budget, and the Pareto plot.

For each budget and each method the sweep runs :func:`~monetdsl.search.solve.solve` and
prints one row: method, budget, status, peak, overhead, solve seconds, gap. ``--plot``
draws each method's memory-versus-overhead curve (the schedules it found, peak on the x
axis, compute overhead on the y axis); ``--json`` prints the rows as one JSON object.
Budgets are a range ``5GiB..10GiB:1GiB`` (both ends included), a list ``5GiB,6GiB``, or both
(``100MiB..200MiB:50MiB,250MiB``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..grammar import load_spec
from ..search.milp.engine import DEFAULT_TIME_LIMIT
from ..search.progress import StderrProgress
from ..search.solve import METHODS, SEARCHERS, solve
from ..units import UnitError, format_bytes, human_bytes, parse_bytes
from .common import EXIT_OK, EXIT_USAGE, add_parser, check_output, cli_search_options, usage_error, write_after_work
from .interrupt import INTERRUPTED, stop_on_interrupt

__all__ = ["register", "run", "parse_budgets", "sweep_row", "render_pareto", "plot_pareto", "format_table"]

#: the order methods are listed in (and drawn in) when --methods is not given
DEFAULT_METHODS = ["milp", "hybrid", "checkmate", "checkmate-lp", "chen-sqrt", "chen-greedy", "revolve", "store-all", "recompute-all"]
#: budgets one sweep may have (a guard against a mistyped step)
MAX_BUDGETS = 200


def register(subparsers) -> None:
    parser = add_parser(
        subparsers,
        "sweep",
        help="run methods over a range of budgets; table and Pareto plot",
        description="Run each method at each memory budget and print a table of (method, budget, status, peak,"
        " overhead, solve seconds, gap). --plot draws each method's memory-versus-overhead curve. Exit 0 when"
        " every run finished (infeasible budgets included), 1 on bad input.",
        examples=[
            "monetdsl sweep specs/resblock.monet --budgets 125MiB..175MiB:10MiB",
            "monetdsl sweep specs/transformer_block.monet --budgets 300MiB..480MiB:30MiB --methods milp,checkmate"
            " --plot pareto.png --json",
        ],
    )
    parser.add_argument("spec", help="the .monet spec file")
    parser.add_argument("--budgets", required=True, help="budgets: A..B:STEP (inclusive), a comma list, or both")
    parser.add_argument(
        "--methods", help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}); 'all' for every method"
    )
    parser.add_argument("--max-overhead", help="overhead cap applied to every run, e.g. 20%%")
    parser.add_argument(
        "--time-limit", type=float,
        help=f"seconds each searching-method run may take (default {DEFAULT_TIME_LIMIT:g})",
    )
    parser.add_argument("--plot", help="write the memory-versus-overhead plot to this image file (png, pdf, svg)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(run=run)


def _suggested_step(low: int, high: int) -> int:
    """A round step that cuts ``low..high`` into about ten budgets (for a hint)."""
    tenth = max((high - low) / 10, 1)
    unit = next(u for u in (2**30, 2**20, 2**10, 1) if tenth >= u)
    count = tenth / unit
    digits = 10 ** (len(str(int(count))) - 1)
    return max(1, round(count / digits)) * digits * unit  # one significant digit: 800MiB, not 819MiB


def parse_budgets(text: str) -> list[int]:
    """``"5GiB..10GiB:1GiB,12GiB"`` -> byte counts, ascending, without duplicates."""
    budgets: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if ".." in part:
            span, _, step_text = part.partition(":")
            low_text, _, high_text = span.partition("..")
            try:
                low, high = parse_bytes(low_text), parse_bytes(high_text)
                step = parse_bytes(step_text) if step_text else None
            except UnitError as exc:
                raise usage_error(f"--budgets: {exc}") from None
            if step is None:
                raise usage_error(f"--budgets: the range {part!r} needs a step, e.g. "
                                  f"{low_text}..{high_text}:{format_bytes(_suggested_step(low, high))}")
            if step <= 0 or high < low:
                raise usage_error(f"--budgets: {part!r} must go up by a positive step")
            if (high - low) // step + 1 > MAX_BUDGETS:
                raise usage_error(f"--budgets: {part!r} gives more than {MAX_BUDGETS} budgets; use a larger step")
            value = low
            while value <= high:
                budgets.add(value)
                value += step
        else:
            try:
                budgets.add(parse_bytes(part))
            except UnitError as exc:
                raise usage_error(f"--budgets: {exc}") from None
    if not budgets:
        raise usage_error("--budgets: no budget given")
    if any(b <= 0 for b in budgets):
        raise usage_error("--budgets: budgets must be positive")
    return sorted(budgets)


def _methods(text: str | None) -> list[str]:
    if text is None:
        return list(DEFAULT_METHODS)
    if text.strip() == "all":
        return list(METHODS)
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise usage_error(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if not names:
        raise usage_error("--methods: no method given")
    return names


def run(args) -> int:
    checked = cli_search_options(args)
    spec = load_spec(args.spec)
    budgets = parse_budgets(args.budgets)
    methods = _methods(args.methods)
    if args.plot:
        _image_format(args.plot)
        check_output(args.plot, flag="--plot", stdout_is_json=args.json)
    rows = []
    progress = None if args.quiet or args.json else StderrProgress()
    with stop_on_interrupt() as stop:
        for method in methods:
            for budget in budgets:
                if stop.is_set():
                    break
                result = solve(
                    spec, method, memory_budget=budget, max_overhead=checked.max_overhead, time_limit=checked.time_limit,
                    progress=progress, exact_min_budget=False, objective="compute" if method in SEARCHERS else None, stop=stop,
                )
                if progress is not None:
                    progress.close()
                rows.append(sweep_row(method, budget, result))
                if not args.quiet:
                    print(f"sweep: {method} at {human_bytes(budget)}: {_status_text(rows[-1])}", file=sys.stderr)
    data = {"spec": args.spec, "network": spec.network.name, "fixed_bytes": spec.network.fixed_bytes, "rows": rows}
    if args.plot:
        write_after_work(args.plot, render_pareto(rows, args.plot, title=f"{spec.network.name}: memory vs compute overhead"),
                         data, flag="--plot", key="plot")
    if stop.is_set():
        data["interrupted"] = True
    if args.json:
        print(json.dumps(data))
    else:
        print(format_table(rows))
        if "plot" in data:
            print(f"wrote {args.plot}")
    if stop.is_set():
        return INTERRUPTED
    return EXIT_USAGE if "plot_error" in data else EXIT_OK


def sweep_row(method: str, budget: int, result) -> dict:
    """One row of a sweep (the table's and the JSON's): what ``method`` found at ``budget``."""
    sim = result.simulation if result.success else None
    row = {
        "method": method,
        "budget": budget,
        "status": result.status,
        "peak_bytes": sim.peak_bytes if sim else None,
        "overhead": sim.overhead if sim else None,
        "compute": sim.compute_us if sim else None,
        "solve_seconds": round(result.solve_seconds, 3),
        "gap": result.gap if result.success else None,
    }
    if result.min_feasible_budget is not None and not result.success:
        row["min_feasible_budget"] = result.min_feasible_budget
    return row


def _status_text(row: dict) -> str:
    if row["peak_bytes"] is None:
        return row["status"]
    return f"{row['status']}, peak {human_bytes(row['peak_bytes'])}, overhead {row['overhead']:.2%}, {row['solve_seconds']:.2f} s"


def format_table(rows: list[dict]) -> str:
    """The sweep as an aligned text table."""
    header = ("method", "budget", "status", "peak", "overhead", "solve s", "gap")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row["method"],
                human_bytes(row["budget"]),
                row["status"],
                "-" if row["peak_bytes"] is None else human_bytes(row["peak_bytes"]),
                "-" if row["overhead"] is None else f"{row['overhead']:.2%}",
                f"{row['solve_seconds']:.2f}",
                "-" if row["gap"] is None else f"{row['gap']:.2%}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        cells = [cell.ljust(widths[i]) if i < 3 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_pareto(rows: list[dict], path: str, *, title: str = "") -> bytes:
    """Each method's schedules as a memory (x) versus overhead (y) staircase, as the bytes
    of an image in the format ``path``'s suffix names (png when it names none)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>px*h"
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for k, method in enumerate(methods):
        points = sorted({(r["peak_bytes"], r["overhead"]) for r in rows if r["method"] == method and r["peak_bytes"] is not None})
        if not points:
            continue
        xs = [p / 2**20 for p, _ in points]
        ys = [100 * o for _, o in points]
        ax.step(xs, ys, where="post", marker=markers[k % len(markers)], label=method, alpha=0.8)
    ax.set_xlabel("peak memory (MiB)")
    ax.set_ylabel("compute overhead (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no legend when no method found a schedule
        ax.legend(fontsize="small")
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, format=_image_format(path))
    finally:
        plt.close(fig)
    return image.getvalue()


def plot_pareto(rows: list[dict], path: str, *, title: str = "") -> None:
    """:func:`render_pareto` written to ``path`` (a regular file is replaced atomically)."""
    from ..io import write_output

    write_output(path, render_pareto(rows, path, title=title), flag="--plot")


def _image_format(path: str) -> str:
    """The image format a file name asks for; checked before the sweep runs."""
    import matplotlib.figure

    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    supported = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if suffix not in supported:
        raise usage_error(f"--plot {path}: unknown image format .{suffix}; use one of {', '.join(sorted(supported))}")
    return suffix
