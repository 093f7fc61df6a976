"""``monetdsl import checkmate GRAPH.json -o OUT.monet``: solve published benchmark graphs."""
from __future__ import annotations

import sys
from pathlib import Path

from ..grammar import format_spec
from ..importers import load_node_link, network_from_node_link
from ..ir import Spec
from ..validate import validate_spec
from .common import EXIT_OK, EXIT_USAGE, add_parser, check_output, usage_error, write_after_work


def register(subparsers) -> None:
    parser = add_parser(
        subparsers,
        "import",
        help="convert a graph from another tool into a .monet spec",
        description="Convert a Checkmate / Moccasin benchmark graph (networkx node-link JSON: nodes with"
        " name, backward, cost_cpu, cost_ram; links or edges with source and target) into a spec."
        " Each forward node becomes an op with one output; each backward node a network-level"
        " backward op.",
        examples=[
            "monetdsl import checkmate vgg16.json -o vgg16.monet",
            "monetdsl import checkmate graph.json --time-unit ms --memory-unit MB -o graph.monet",
        ],
    )
    parser.add_argument("format", choices=["checkmate"], help="the input format (checkmate: node-link JSON)")
    parser.add_argument("graph", help="the JSON file")
    parser.add_argument("-o", "--output", help="the spec to write (default: stdout); a different file already there is kept as NAME.bak")
    parser.add_argument("--name", help="network name (default: the file's stem)")
    parser.add_argument("--time-unit", default="us", help="what cost_cpu counts: s, ms, us (default) or ns")
    parser.add_argument("--memory-unit", default="B", help="what cost_ram counts: B (default), KiB, MiB, KB, MB, ...")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.output:
        if Path(args.output).resolve() == Path(args.graph).resolve():
            raise usage_error("refusing to write the spec over the graph file; choose another -o")
        check_output(args.output, stdout_is_json=getattr(args, "json", False))
    data = load_node_link(args.graph)
    name = args.name or Path(args.graph).stem
    network = network_from_node_link(data, name=name, time_unit=args.time_unit, memory_unit=args.memory_unit, path=args.graph)
    spec = Spec(network, path=args.output or "<stdout>")
    validate_spec(spec)
    header = f"# imported by monetdsl from {args.graph} ({args.format} node-link JSON; cost_cpu in {args.time_unit}, cost_ram in {args.memory_unit})\n"
    text = header + format_spec(spec)
    if args.output:
        result: dict = {}
        if write_after_work(args.output, text, result) is None:
            return EXIT_USAGE
        print(f"wrote {args.output}: network {name}, {len(network.forward_ops)} forward and {len(network.backward_ops)} backward nodes")
    else:
        sys.stdout.write(text)
    return EXIT_OK
