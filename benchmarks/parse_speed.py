"""How long parsing (and validating) a large spec takes. Target: a 5,000-operator spec in < 2 s.

"Operators" counts forward and backward ops, as in a joint training graph. Builds a
synthetic CNN-like spec (conv/bn/relu triples; relu with plain, in-place and 1-bit-mask
implementations; bn backward from input or output; split conv backward ops; a residual add
every nine ops), prints it canonically, then times `parse_spec` (parse + build + validate)
and, separately, the printer. Medians of several runs. Also reports a spec with 5,000
*forward* ops (about 2.3x larger) for transparency. Writes benchmarks/results/parse_speed.md.

    python benchmarks/parse_speed.py [--operators 5000] [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

from monetdsl.grammar import format_spec, parse_spec


def synthetic_spec(n_ops: int) -> str:
    lines = ["network synthetic", "  fixed optimizer 1GiB", "  tensor x f32[32,64,56,56] input"]
    prev = "x"
    skip = "x"
    for i in range(n_ops):
        kind = ("conv", "bn", "relu")[i % 3]
        out = f"layer{i // 9}.{kind}{i}"
        if kind == "conv":
            lines.append(f"  tensor {out}.w f32[64,64,3,3] param")
            lines.append(f"  op {out} ({prev}, {out}.w) -> {out}.y f32[32,64,56,56] time 800us workspace 8MiB")
            lines.append(f"    backward wgrad reads (grad({out}.y), {prev}) -> grad({out}.w) time 850us")
            if prev != "x":
                lines.append(f"    backward dgrad reads (grad({out}.y), {out}.w) -> grad({prev}) time 820us")
        elif kind == "bn":
            lines.append(f"  op {out} ({prev}) -> {out}.y f32[32,64,56,56], {out}.stats f32[2,64] time 110us recompute time 75us")
            lines.append(f"    backward reads (grad({out}.y), {out}.stats) -> grad({prev})")
            lines.append(f"      impl from_input reads ({prev}) time 180us")
            lines.append(f"      impl from_output reads ({out}.y) time 190us")
        else:
            lines.append(f"  op {out} ({prev}) -> {out}.y f32[32,64,56,56]")
            lines.append("    impl plain time 70us")
            lines.append(f"    impl inplace overwrites {prev} time 70us")
            lines.append(f"    impl mask -> {out}.mask u1[32,64,56,56] time 75us")
            lines.append(f"    backward reads (grad({out}.y)) -> grad({prev})")
            lines.append(f"      impl from_output reads ({out}.y) time 105us")
            lines.append(f"      impl from_mask reads ({out}.mask) time 110us")
        prev = f"{out}.y"
        if kind == "relu" and i % 9 == 8:
            lines.append(f"  op add{i} ({prev}, {skip}) -> add{i}.y f32[32,64,56,56] time 105us")
            lines.append(f"    backward reads (grad(add{i}.y)) -> grad({prev}){', grad(' + skip + ')' if skip != 'x' else ''} time 70us")
            prev = skip = f"add{i}.y"
    lines.append(f"  output {prev}")
    return "\n".join(lines) + "\n"


def spec_with_operators(target: int) -> str:
    """The synthetic spec whose forward + backward op count is closest to ``target``."""
    low, high = 1, target
    while low < high:
        mid = (low + high + 1) // 2
        spec = parse_spec(synthetic_spec(mid))
        if len(spec.network.forward_ops) + len(spec.network.backward_ops) <= target:
            low = mid
        else:
            high = mid - 1
    return format_spec(parse_spec(synthetic_spec(low)))  # canonical form, as monetdsl writes it


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(text: str, repeat: int) -> dict:
    spec = parse_spec(text)
    return {
        "forward ops": len(spec.network.forward_ops),
        "backward ops": len(spec.network.backward_ops),
        "lines": text.count("\n"),
        "KiB": round(len(text) / 1024),
        "parse + validate s": round(median_seconds(lambda: parse_spec(text), repeat), 3),
        "print s": round(median_seconds(lambda: format_spec(spec), repeat), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--operators", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = {
        f"{args.operators} operators (forward + backward)": measure(spec_with_operators(args.operators), args.repeat),
        f"{args.operators} forward ops": measure(format_spec(parse_spec(synthetic_spec(args.operators))), max(1, args.repeat // 2)),
    }
    columns = list(next(iter(rows.values())))
    table = "| spec | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    for name, row in rows.items():
        table += f"| {name} | " + " | ".join(str(row[c]) for c in columns) + " |\n"
    first = next(iter(rows.values()))["parse + validate s"]
    verdict = f"target (< 2 s for {args.operators} operators): {'met' if first < 2 else 'NOT met'}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"Parse speed, {date.today()}, {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f},"
        f" Python {platform.python_version()}\n\n"
    )
    print(header + table + "\n" + verdict)
    out = Path(__file__).resolve().parent / "results" / "parse_speed.md"
    out.write_text(header + table + "\n" + verdict + "\n")


if __name__ == "__main__":
    main()
