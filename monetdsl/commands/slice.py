"""``monetdsl slice SPEC``: make chains of per-sample ops batch-sliced segments.

Writes a new spec in which the chosen chains (``--segments first..last``, or by default
the widest blocks whose forced recomputation fits in ``--allowance`` of the spec's
no-recompute time) are single ops with ``slicedK`` implementations; ``solve`` then chooses
how many slices each runs in (``docs/search.md``, "Batch-sliced segments").
"""
from __future__ import annotations

import sys

from ..grammar import load_spec
from ..grammar.printer import format_spec
from ..slicing import (DEFAULT_ALLOWANCE, Run, block_width, blocks, per_sample_runs, segment_name, sliced_spec,
                       with_widest_segments)
from ..units import human_bytes, parse_fraction
from .common import add_parser, usage_error, write_after_work

__all__ = ["register", "named_segments"]


def register(subparsers) -> None:
    parser = add_parser(
        subparsers,
        "slice",
        help="make chains of per-sample ops batch-sliced segments (a new spec)",
        description="Replace chains of per-sample ops (convolutions, activations, pooling) by segments that run"
        " slice by slice of the batch: the memory of a whole block drops to its input, its output and one"
        " slice's intermediates, for one more forward of the block.",
        examples=["monetdsl slice specs/vgg16.monet --list",
                  "monetdsl slice specs/vgg16.monet -o vgg16.sliced.monet",
                  "monetdsl slice specs/vgg16.monet --segments features.0..features.4 --slices 8,16 -o out.monet"],
    )
    parser.add_argument("spec", help="the spec file")
    parser.add_argument("--list", action="store_true", help="list the candidate blocks and write nothing")
    parser.add_argument("--segments", help="comma-separated FIRST..LAST op names (default: the widest blocks"
                        " within --allowance)")
    parser.add_argument("--allowance", default=f"{DEFAULT_ALLOWANCE:.0%}", help="recomputation the automatic choice may force, as a"
                        " fraction of the no-recompute time (default 10%%)")
    parser.add_argument("--slices", help="comma-separated slice counts to offer (default: those whose working"
                        " set is below the block's widest step)")
    parser.add_argument("-o", "--output", help="where to write the new spec (default: stdout)")
    parser.set_defaults(run=run)


def named_segments(network, text: str) -> list[Run]:
    """``first..last`` names (comma-separated) as runs: each must lie in one per-sample run."""
    runs = per_sample_runs(network)
    chosen = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        first, sep, last = item.partition("..")
        if not sep or not first or not last:
            raise usage_error(f"--segments: {item!r} is not FIRST..LAST")
        run = next((r for r in runs if first in r.ops and last in r.ops), None)
        if run is None or run.ops.index(first) >= run.ops.index(last):
            raise usage_error(f"--segments: {first} .. {last} is not a chain of per-sample ops in forward order"
                              " (monetdsl slice SPEC --list shows the candidates)")
        ops = run.ops[run.ops.index(first):run.ops.index(last) + 1]
        source = run.source if ops[0] == run.ops[0] else network.op(run.ops[run.ops.index(first) - 1]).outputs[0]
        chosen.append(Run(ops, source, network.op(last).outputs[0], run.batch))
    return chosen


def _slice_counts(text: str | None):
    if text is None:
        return None
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise usage_error(f"--slices takes whole numbers separated by commas, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise usage_error("--slices: slice counts are whole numbers >= 1")
    return counts


def run(args) -> int:
    spec = load_spec(args.spec)
    network = spec.network
    counts = _slice_counts(args.slices)
    if args.list:
        for whole in per_sample_runs(network):
            for piece in blocks(network, whole):
                forward_us = sum(network.op(name).impls[0].time_us for name in piece.ops)
                print(f"{segment_name(piece)}  ({len(piece.ops)} ops, widest step {human_bytes(block_width(network, piece))},"
                      f" forward {forward_us:.0f} us)")
        return 0
    if args.segments:
        runs = named_segments(network, args.segments)
        sliced = sliced_spec(spec, runs, counts)
    else:
        try:
            allowance = parse_fraction(args.allowance)
        except Exception:
            raise usage_error(f"--allowance takes a fraction such as 10%, not {args.allowance!r}") from None
        sliced, runs = with_widest_segments(spec, allowance, counts)
        if not runs:
            raise usage_error(f"no block of per-sample ops both fits an allowance of {args.allowance} and is wider"
                              " than every op outside the blocks; name one with --segments (--list shows them)")
    text = format_spec(sliced)
    print("segments: " + ", ".join(segment_name(r) for r in runs), file=sys.stderr)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    return 0 if write_after_work(args.output, text, {}) is not None else 2
