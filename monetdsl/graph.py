"""Graph views of a :class:`~monetdsl.ir.Network`: producers, readers, orders, cut points.

Plain functions over a network plus one cached :class:`NetworkIndex`, in the style of a
networkx algorithm module. Every other part (validation, simulator, solvers, runtime)
asks these questions here, so the answers are the same everywhere.

    >>> from monetdsl.grammar.parser import parse_spec
    >>> net = parse_spec('''
    ... network chain
    ...   tensor x f32[4] input
    ...   op a (x) -> ya f32[4] time 1us
    ...     backward reads (grad(ya)) -> grad(x) time 1us
    ...   op b (ya) -> yb f32[4] time 1us
    ...     backward reads (grad(yb), ya) -> grad(ya) time 1us
    ...   output yb
    ... ''').network
    >>> index(net).forward_order, index(net).backward_order
    (('a', 'b'), ('b.backward', 'a.backward'))
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx

from .ir import BackwardOp, ForwardOp, Network, Tensor, TensorKind

__all__ = [
    "NetworkIndex",
    "index",
    "forward_dag",
    "backward_dag",
    "checkpoint_candidates",
    "storage_root",
]


@dataclass
class NetworkIndex:
    """Derived facts about a network, computed once (networks are treated as immutable)."""

    network: Network
    forward_order: tuple[str, ...] = ()
    position: dict[str, int] = field(default_factory=dict)
    producer: dict[str, str] = field(default_factory=dict)
    derived_by: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    forward_readers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gradient_writers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    backward_of: dict[str, tuple[str, ...]] = field(default_factory=dict)
    backward_order: tuple[str, ...] = ()
    forward_ops: dict[str, ForwardOp] = field(default_factory=dict)
    backward_ops: dict[str, BackwardOp] = field(default_factory=dict)

    def tensor(self, name: str) -> Tensor:
        return self.network.tensors[name]

    def is_forward_tensor(self, name: str) -> bool:
        """Produced by the forward pass (a main output or a derived tensor): recomputable."""
        return name in self.producer or name in self.derived_by

    def producing_op(self, name: str) -> str | None:
        if name in self.producer:
            return self.producer[name]
        if name in self.derived_by:
            return self.derived_by[name][0]
        return None

    def seeds(self) -> tuple[str, ...]:
        """Gradients present when the backward starts: the gradient of every output."""
        return tuple(f"grad({o})" for o in self.network.outputs if f"grad({o})" in self.network.tensors)


def index(network: Network) -> NetworkIndex:
    """The (cached) :class:`NetworkIndex` of ``network``."""
    cached = network.__dict__.get("_index_cache")
    if cached is not None and cached.network is network:
        return cached
    idx = _build_index(network)
    network.__dict__["_index_cache"] = idx
    return idx


def _build_index(network: Network) -> NetworkIndex:
    idx = NetworkIndex(network)
    idx.forward_ops = {op.name: op for op in network.forward_ops}
    idx.backward_ops = {op.name: op for op in network.backward_ops}
    readers: dict[str, list[str]] = defaultdict(list)
    for op in network.forward_ops:
        for out in op.outputs:
            idx.producer.setdefault(out, op.name)
        for impl in op.impls:
            for derived in impl.derived:
                owner = idx.derived_by.get(derived)
                if owner is None:
                    idx.derived_by[derived] = (op.name, (impl.name,))
                elif owner[0] == op.name:
                    idx.derived_by[derived] = (op.name, owner[1] + (impl.name,))
        for name in op.inputs:
            if op.name not in readers[name]:
                readers[name].append(op.name)
    writers: dict[str, list[str]] = defaultdict(list)
    for bop in network.backward_ops:
        for out in bop.outputs:
            writers[out].append(bop.name)
    by_forward: dict[str, list[str]] = defaultdict(list)
    for bop in network.backward_ops:
        if bop.of is not None:
            by_forward[bop.of].append(bop.name)
    idx.backward_of = {k: tuple(v) for k, v in by_forward.items()}
    idx.gradient_writers = {k: tuple(v) for k, v in writers.items()}

    dag = forward_dag(network)
    declared = {op.name: i for i, op in enumerate(network.forward_ops)}
    try:
        order = tuple(nx.lexicographical_topological_sort(dag, key=lambda n: declared[n]))
    except nx.NetworkXUnfeasible:
        order = tuple(op.name for op in network.forward_ops)  # the validator reports the cycle
    idx.forward_order = order
    idx.position = {name: i for i, name in enumerate(order)}
    idx.forward_readers = {k: tuple(sorted(v, key=lambda n: idx.position.get(n, 0))) for k, v in readers.items()}
    idx.backward_order = _canonical_backward_order(network, idx)
    return idx


def forward_dag(network: Network) -> nx.DiGraph:
    """Forward ops as nodes, an edge u -> v when v reads a main output of u."""
    producer = {}
    for op in network.forward_ops:
        for out in op.outputs:
            producer.setdefault(out, op.name)
    dag = nx.DiGraph()
    dag.add_nodes_from(op.name for op in network.forward_ops)
    for op in network.forward_ops:
        for name in op.inputs:
            src = producer.get(name)
            if src is not None:
                dag.add_edge(src, op.name, tensor=name)
    return dag


def backward_dag(network: Network) -> nx.DiGraph:
    """Backward ops as nodes, an edge u -> v when v reads a gradient that u writes.

    Reads are taken over all implementations: a gradient dependency does not depend on
    the implementation chosen.
    """
    writers: dict[str, list[str]] = defaultdict(list)
    for bop in network.backward_ops:
        for out in bop.outputs:
            writers[out].append(bop.name)
    dag = nx.DiGraph()
    dag.add_nodes_from(b.name for b in network.backward_ops)
    for bop in network.backward_ops:
        reads = set().union(*(impl.reads for impl in bop.impls)) if bop.impls else set()
        for name in reads:
            for src in writers.get(name, ()):
                if src != bop.name:
                    dag.add_edge(src, bop.name, tensor=name)
    return dag


def _canonical_backward_order(network: Network, idx: NetworkIndex) -> tuple[str, ...]:
    """Gradient-respecting order: later forward ops first, declaration order within an op.

    A top-level (plain DAG) backward op sorts by the latest forward op whose output it
    reads, so Checkmate-style graphs come out in their natural reverse order.
    """
    declared = {b.name: i for i, b in enumerate(network.backward_ops)}

    def anchor(bop: BackwardOp) -> int:
        if bop.of is not None and bop.of in idx.position:
            return idx.position[bop.of]
        reads = set().union(*(impl.reads for impl in bop.impls)) if bop.impls else set()
        positions = [idx.position[idx.producing_op(r)] for r in reads if idx.producing_op(r) in idx.position]
        return max(positions) if positions else -1

    keys = {b.name: (-anchor(b), declared[b.name]) for b in network.backward_ops}
    dag = backward_dag(network)
    try:
        return tuple(nx.lexicographical_topological_sort(dag, key=lambda n: keys[n]))
    except nx.NetworkXUnfeasible:
        return tuple(sorted(keys, key=keys.get))


def storage_root(network: Network, name: str) -> str:
    """The tensor that owns ``name``'s storage, following ``view of`` links."""
    tensors = network.tensors
    seen = set()
    while tensors[name].view_of is not None and name not in seen:
        seen.add(name)
        name = tensors[name].view_of
    return name


def checkpoint_candidates(network: Network) -> tuple[str, ...]:
    """Tensors every path from the inputs to the outputs goes through: Chen's candidates.

    In the directed graph of data tensors (an edge from each input of an op to each of its
    outputs), these are the dominators of the network outputs seen from the inputs: the
    articulation points of the forward graph that lie on its main path. Tensors that only
    feed a side branch (saved statistics, say) are not candidates; parameters and buffers
    are left out, being always resident. Outputs are not candidates either (they are kept
    anyway). The result is in forward order.
    """
    idx = index(network)
    tensors = network.tensors
    graph = nx.DiGraph()
    source, sink = ("__source__",), ("__sink__",)
    graph.add_node(source)
    for name in idx.forward_order:
        op = idx.forward_ops[name]
        data_inputs = [i for i in op.inputs if tensors[i].kind in (TensorKind.ACTIVATION, TensorKind.INPUT)]
        for out in op.outputs:
            graph.add_node(out)
            if not data_inputs:
                graph.add_edge(source, out)
            for inp in data_inputs:
                graph.add_edge(inp, out)
    for name, tensor in tensors.items():
        if tensor.kind is TensorKind.INPUT and name in graph:
            graph.add_edge(source, name)
    for out in network.outputs:
        graph.add_edge(out, sink)
    if sink not in graph:
        return ()
    dominators = nx.immediate_dominators(graph, source)
    chain = set()
    node = dominators.get(sink)
    while node is not None and node != source:
        chain.add(node)
        node = dominators.get(node)
    order = [out for name in idx.forward_order for out in idx.forward_ops[name].outputs]
    outputs = set(network.outputs)
    return tuple(t for t in order if t in chain and t not in outputs and tensors[t].kind is TensorKind.ACTIVATION)
