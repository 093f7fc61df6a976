"""Checkmate / Moccasin benchmark graphs (networkx node-link JSON) to and from the IR.

Those graphs are plain DAGs of a training step: every node computes one tensor, has a
compute cost ``cost_cpu`` and an output size ``cost_ram``, is marked ``backward`` or not,
and needs all its predecessors. In the IR each forward node becomes a forward op with one
output, and each backward node a network-level backward op whose output is a gradient
tensor; the spec then solves with every method (implementation choice is trivial: one
implementation per op). Edges from a backward node to a forward node cannot happen in a
training step and are refused.

    >>> data = {"directed": True, "nodes": [
    ...     {"id": 0, "name": "x", "backward": False, "cost_cpu": 0, "cost_ram": 4},
    ...     {"id": 1, "name": "f", "backward": False, "cost_cpu": 3, "cost_ram": 8},
    ...     {"id": 2, "name": "df", "backward": True, "cost_cpu": 5, "cost_ram": 4}],
    ...   "links": [{"source": 0, "target": 1}, {"source": 1, "target": 2}, {"source": 0, "target": 2}]}
    >>> net = network_from_node_link(data, name="toy")
    >>> [op.name for op in net.forward_ops], [op.name for op in net.backward_ops]
    (['x', 'f'], ['df'])
    >>> sorted(net.backward_ops[0].impls[0].reads)
    ['f', 'x']
"""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import networkx as nx

from ..errors import Diagnostic, MonetError
from ..io import read_input
from ..ir import BackwardImpl, BackwardOp, ForwardImpl, ForwardOp, Network, Tensor, TensorKind
from ..units import MEMORY_UNITS, TIME_UNITS

__all__ = ["network_from_node_link", "node_link_from_network", "load_node_link"]


def load_node_link(path: str | Path) -> dict:
    """Read a node-link JSON file; unreadable or malformed files are user errors."""
    text = read_input(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MonetError(Diagnostic(f"not valid JSON: {exc.msg}", str(path), exc.lineno, exc.colno)) from None


def _graph(data: dict, path: str) -> nx.DiGraph:
    if not isinstance(data, dict) or "nodes" not in data:
        raise MonetError(Diagnostic("expected a networkx node-link object with a 'nodes' list", path))
    edges = "links" if "links" in data else "edges"
    try:
        graph = nx.node_link_graph(data, directed=True, multigraph=False, edges=edges)
    except (KeyError, TypeError, nx.NetworkXError) as exc:
        raise MonetError(Diagnostic(f"malformed node-link graph: {exc}", path)) from None
    if not nx.is_directed_acyclic_graph(graph):
        cycle = nx.find_cycle(graph)
        raise MonetError(Diagnostic(f"the graph has a cycle through node {cycle[0][0]!r}", path))
    return graph


def _number(value, node, field: str, path: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise MonetError(Diagnostic(f"node {node!r}: {field} must be a non-negative number, not {value!r}", path))
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def network_from_node_link(
    data: dict, *, name: str = "imported", time_unit: str = "us", memory_unit: str = "B", path: str = "<json>"
) -> Network:
    """The IR of a Checkmate/Moccasin node-link graph.

    ``time_unit`` and ``memory_unit`` say what ``cost_cpu`` and ``cost_ram`` count (the
    published graphs use abstract units; microseconds and bytes by default).
    """
    if time_unit not in TIME_UNITS:
        raise MonetError(Diagnostic(f"unknown time unit {time_unit!r}; use one of {', '.join(TIME_UNITS)}", path))
    if memory_unit not in MEMORY_UNITS:
        raise MonetError(Diagnostic(f"unknown memory unit {memory_unit!r}; use one of {', '.join(MEMORY_UNITS)}", path))
    graph = _graph(data, path)
    order = list(nx.lexicographical_topological_sort(graph, key=lambda n: (str(type(n)), n)))
    names: dict = {}
    used: set[str] = set()
    for node in order:
        attrs = graph.nodes[node]
        base = str(attrs.get("name", node)) or str(node)
        label = base if base not in used else f"{base}.{node}"
        while label in used:
            label += "_"
        used.add(label)
        names[node] = label
    tensors: dict[str, Tensor] = {}
    forward: list[ForwardOp] = []
    backward: list[BackwardOp] = []
    for node in order:
        attrs = graph.nodes[node]
        is_backward = bool(attrs.get("backward", False))
        cost = _number(attrs.get("cost_cpu", 0), node, "cost_cpu", path) * TIME_UNITS[time_unit]
        size = int(_number(attrs.get("cost_ram", 0), node, "cost_ram", path) * MEMORY_UNITS[memory_unit])
        label = names[node]
        preds = sorted(graph.predecessors(node), key=order.index)
        kind = TensorKind.GRADIENT if is_backward else TensorKind.ACTIVATION
        tensors[label] = Tensor(label, kind, size)
        if is_backward:
            reads = frozenset(names[p] for p in preds)
            backward.append(BackwardOp(label, (label,), (BackwardImpl("default", reads, float(cost)),)))
        else:
            bad = [names[p] for p in preds if graph.nodes[p].get("backward", False)]
            if bad:
                raise MonetError(Diagnostic(f"forward node {label!r} depends on backward node {bad[0]!r}", path))
            forward.append(ForwardOp(label, tuple(names[p] for p in preds), (label,), (ForwardImpl("default", float(cost)),)))
    return Network(name, tensors, tuple(forward), tuple(backward))


def node_link_from_network(network: Network) -> dict:
    """A plain-DAG network (one implementation and one output per op) as node-link data.

    Sizes are bytes and times microseconds. Raises :class:`MonetError` for networks with
    features a plain DAG cannot express (several implementations or outputs, fixed tensors).
    """
    graph = nx.DiGraph()
    index = {}
    for op in (*network.forward_ops, *network.backward_ops):
        if len(op.impls) != 1 or len(op.outputs) != 1:
            raise MonetError(f"{op.name} has several implementations or outputs: not a plain DAG")
        index[op.outputs[0]] = len(index)
    for op in network.forward_ops:
        out = op.outputs[0]
        graph.add_node(index[out], name=op.name, backward=False, cost_cpu=op.impls[0].time_us, cost_ram=network.tensors[out].nbytes)
        for name in op.inputs:
            if name not in index:
                raise MonetError(f"{op.name} reads {name}, which no node produces: not a plain DAG")
            graph.add_edge(index[name], index[out])
    for op in network.backward_ops:
        out = op.outputs[0]
        graph.add_node(index[out], name=op.name, backward=True, cost_cpu=op.impls[0].time_us, cost_ram=network.tensors[out].nbytes)
        for name in sorted(op.impls[0].reads):
            if name not in index:
                raise MonetError(f"{op.name} reads {name}, which no node produces: not a plain DAG")
            graph.add_edge(index[name], index[out])
    return nx.node_link_data(graph, edges="links")
