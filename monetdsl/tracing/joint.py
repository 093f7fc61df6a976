"""Facts about a captured joint graph: storage owners, live ops, gradient flow, groups.

* **Storage owners.** A view (``view``, ``t``, ``transpose``, ``split``..., anything whose
  schema says it aliases its input) and ``detach``/``alias``/``_unsafe_view`` share the
  storage of their input, so every tensor is resolved to the value that owns its storage.
  The running-statistics outputs of functional batch norm are the buffers themselves.
* **Live forward ops**: those the loss or some backward op depends on.
* **requires-grad**: which values carry a gradient (floating point and computed from a
  trainable parameter or an input that requires grad).
* **Backward groups**: backward nodes grouped by the sequence number of the forward op
  they differentiate, and the forward values each group reads.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .capture import Captured

__all__ = ["JointFacts", "analyse", "packet_name", "is_alias", "tensor_args"]

_ALIAS_OPS = frozenset({"_unsafe_view", "detach", "alias", "lift_fresh"})
_BN_FUNCTIONAL = "_native_batch_norm_legit_functional"


def packet_name(target) -> str:
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def is_alias(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    if getattr(node.target, "is_view", False):
        return True
    return packet_name(node.target) in _ALIAS_OPS


def tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def visit(a):
        if isinstance(a, fx.Node):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)

    visit(node.args)
    visit(node.kwargs)
    return [n for n in found if isinstance(n.meta.get("val"), torch.Tensor)]


@dataclass
class JointFacts:
    captured: Captured
    graph: fx.Graph
    forward: set = field(default_factory=set)
    backward: list = field(default_factory=list)
    loss: fx.Node | None = None
    compute: list = field(default_factory=list)  # live forward compute nodes, in graph order
    requires_grad: dict = field(default_factory=dict)  # value node -> bool
    groups: dict = field(default_factory=dict)  # compute node -> [backward nodes]
    reads: dict = field(default_factory=dict)  # compute node -> [owner values read by its group]
    outputs: dict = field(default_factory=dict)  # compute node -> {index or None: value node}
    unattributed: list = field(default_factory=list)
    saved_clones: set = field(default_factory=set)  # forward clones only the backward reads

    def owner(self, node: fx.Node) -> fx.Node:
        """The value whose storage ``node`` uses."""
        seen = 0
        while seen < 10_000:
            seen += 1
            if node.op != "call_function":
                return node
            if node.target is operator.getitem:
                base = node.args[0]
                if is_alias(base):  # split / unbind / chunk: a list of views
                    node = base.args[0]
                    continue
                if packet_name(base.target) == _BN_FUNCTIONAL and node.args[1] in (3, 4):
                    node = base.args[node.args[1]]
                    continue
                return node
            if is_alias(node) or node in self.saved_clones:
                node = node.args[0]
                continue
            return node
        raise RuntimeError("alias chain does not end")  # pragma: no cover

    def compute_of(self, value: fx.Node) -> fx.Node | None:
        if value.op != "call_function":
            return None
        return value.args[0] if value.target is operator.getitem else value

    def is_fixed(self, value: fx.Node) -> bool:
        return value.op == "placeholder"


def analyse(captured: Captured) -> JointFacts:
    graph = captured.joint.graph
    facts = JointFacts(captured, graph)
    nodes = list(graph.nodes)
    for node in nodes:
        tag = node.meta.get("partitioner_tag")
        if node.op == "call_function":
            if tag == "is_backward":
                facts.backward.append(node)
            else:
                facts.forward.add(node)
    facts.loss = _find_loss(graph, facts)
    # an in-place op whose derivative needs its original input (hardtanh_, leaky_relu_) makes
    # autograd keep a copy: the functional graph reads the same value as the input itself
    backward_set = set(facts.backward)
    for node in nodes:
        if node in facts.forward and packet_name(node.target) == "clone" and node.users and all(u in backward_set for u in node.users):
            facts.saved_clones.add(node)

    # requires-grad, in graph order ----------------------------------------------------------
    rg: dict[fx.Node, bool] = {}
    for node in nodes:
        val = node.meta.get("val")
        is_float = isinstance(val, torch.Tensor) and (val.is_floating_point() or val.is_complex())
        if node.op == "placeholder":
            ph = captured.placeholders.get(node.name)
            rg[node] = bool(ph and ph.requires_grad and is_float)
        elif node in facts.forward:
            if node.target is operator.getitem:
                rg[node] = is_float and rg.get(node.args[0], False)
            elif packet_name(node.target) == "detach":
                rg[node] = False
            else:
                any_rg = any(rg.get(a, False) for a in tensor_args(node))
                rg[node] = any_rg and (is_float or not isinstance(val, torch.Tensor))
    facts.requires_grad = rg

    # live forward compute nodes --------------------------------------------------------------
    needed: set[fx.Node] = set()
    stack = [facts.owner(facts.loss)]
    for bnode in facts.backward:
        for arg in tensor_args(bnode):
            owner = facts.owner(arg)
            if owner in facts.forward or owner.op == "placeholder":
                stack.append(owner)
    while stack:
        value = stack.pop()
        if value in needed:
            continue
        needed.add(value)
        comp = facts.compute_of(value)
        if comp is None:
            continue
        needed.add(comp)
        for arg in tensor_args(comp):
            stack.append(facts.owner(arg))
    facts.compute = [n for n in nodes if n in facts.forward and n in needed and n.target is not operator.getitem
                     and not is_alias(n) and n not in facts.saved_clones]
    for comp in facts.compute:
        outs: dict = {}
        val = comp.meta.get("val")
        if isinstance(val, torch.Tensor):
            outs[None] = comp
        else:
            for user in comp.users:
                if user.target is operator.getitem and facts.owner(user) is user:
                    outs[user.args[1]] = user
        facts.outputs[comp] = dict(sorted(outs.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))

    # backward groups by sequence number ---------------------------------------------------------
    by_seq: dict[int, list[fx.Node]] = {}
    for comp in facts.compute:
        seq = comp.meta.get("seq_nr")
        if seq is not None and any(rg.get(v, False) for v in facts.outputs[comp].values()):
            by_seq.setdefault(seq, []).append(comp)
    for bnode in facts.backward:
        seq = bnode.meta.get("seq_nr")
        owners = by_seq.get(seq)
        if not owners and seq is not None:
            owners = by_seq.get(seq + 1)  # an in-place op records its forward one number later
        reads = [facts.owner(a) for a in tensor_args(bnode)]
        reads = [r for r in reads if r in facts.forward or r.op == "placeholder" and not r.name.startswith("tangents")]
        if not owners:
            if reads:
                facts.unattributed.append(bnode)
            continue
        comp = owners[-1]
        facts.groups.setdefault(comp, []).append(bnode)
        bucket = facts.reads.setdefault(comp, [])
        for r in reads:
            if r not in bucket:
                bucket.append(r)
    return facts


def _find_loss(graph: fx.Graph, facts: JointFacts) -> fx.Node:
    out = next(n for n in graph.nodes if n.op == "output")
    flat = out.args[0]
    flat = flat if isinstance(flat, (list, tuple)) else [flat]
    for item in flat:
        if isinstance(item, fx.Node) and item in facts.forward:
            val = item.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() == 0 and val.is_floating_point():
                return item
    raise ValueError("the captured step has no scalar floating-point loss")
