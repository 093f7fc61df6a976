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
* **Folded groups**: a decomposed ``nn.RMSNorm`` (pow, mean, add, rsqrt, mul) and a
  cross-entropy (``_log_softmax`` feeding only ``nll_loss_forward``) become one op each;
  a linear layer whose logits feed nothing but that cross-entropy joins it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .capture import Captured

__all__ = ["JointFacts", "FusedCrossEntropy", "FusedLinearCrossEntropy", "analyse", "packet_name", "is_alias", "tensor_args"]

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
    fused: dict = field(default_factory=dict)  # leader node -> FusedRMSNorm | FusedCrossEntropy | FusedLinearCrossEntropy

    def inputs_of(self, comp: fx.Node) -> list[fx.Node]:
        """The tensors an op reads: its arguments, or a fused group's external inputs."""
        group = self.fused.get(comp)
        if group is not None:
            return [n for n in group.inputs if n is not None]
        return tensor_args(comp)

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
    member_of = _fuse_rms_norms(facts)
    member_of.update(_fuse_cross_entropies(facts))
    member_of.update(_fuse_linear_heads(facts))
    for comp in facts.compute:
        outs: dict = {}
        group = facts.fused.get(comp)
        if group is not None:
            facts.outputs[comp] = group.outputs(comp)
            continue
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
    for member, leader in member_of.items():
        seq = member.meta.get("seq_nr")
        if seq is not None and leader not in by_seq.get(seq, []):
            by_seq.setdefault(seq, []).append(leader)
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


@dataclass
class FusedRMSNorm:
    """One call of ``nn.RMSNorm`` that torch decomposed (pow, mean, add, rsqrt, mul, mul)."""

    members: list
    x: fx.Node
    w: fx.Node | None
    rstd: fx.Node
    xhat: fx.Node
    eps: float
    dims: tuple

    @property
    def inputs(self) -> tuple:
        return (self.x, self.w)

    def outputs(self, leader: fx.Node) -> dict:
        return {0: leader, 1: self.rstd, 2: self.xhat} if self.w is not None else {0: leader, 1: self.rstd}


@dataclass
class FusedCrossEntropy:
    """``_log_softmax`` over dim 1 of a 2-d tensor feeding only ``nll_loss_forward`` (no
    class weights) in the forward pass: ``F.cross_entropy`` as autograd sees it."""

    members: list  # [log_softmax, nll_loss_forward]
    x: fx.Node
    target: fx.Node
    lsm: fx.Node
    loss: fx.Node  # getitem 0 of nll_loss_forward
    total_weight: fx.Node  # getitem 1
    reduction: int
    ignore_index: int

    @property
    def inputs(self) -> tuple:
        return (self.x, self.target)

    def outputs(self, leader: fx.Node) -> dict:
        return {0: self.lsm, 1: self.loss, 2: self.total_weight}


@dataclass
class FusedLinearCrossEntropy:
    """``mm(x, w)`` or ``addmm(b, x, w)`` whose logits reach a folded cross-entropy
    through views only and feed nothing else, forward or backward (autograd's product
    keeps its operands, not its result): a language model's output layer with its loss."""

    members: list  # [mm or addmm, its views in order, log_softmax, nll_loss_forward]
    x: fx.Node
    w: fx.Node
    b: fx.Node | None
    target: fx.Node
    lsm: fx.Node
    loss: fx.Node
    total_weight: fx.Node
    reduction: int
    ignore_index: int

    @property
    def inputs(self) -> tuple:
        return (self.x, self.w, self.b, self.target)

    def outputs(self, leader: fx.Node) -> dict:
        return {0: self.lsm, 1: self.loss, 2: self.total_weight}


def _module_class(node: fx.Node):
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None, None
    path, cls = list(stack.values())[-1]
    return path, cls


def _is_rms_norm_class(cls) -> bool:
    try:
        return cls is not None and issubclass(cls, torch.nn.RMSNorm)
    except TypeError:
        return False


def _fuse_rms_norms(facts: JointFacts) -> dict:
    """Fold each decomposed ``nn.RMSNorm`` call into one op (the last node leads it).

    Only the exact decomposition ``y = x * rsqrt(mean(x^2) + eps) [* w]`` is folded; any
    other sequence stays as separate generic ops. Returns member -> leader."""
    runs: list[list[fx.Node]] = []
    last_path = None
    for comp in facts.compute:
        path, cls = _module_class(comp)
        if not _is_rms_norm_class(cls):
            last_path = None
            continue
        if path != last_path or packet_name(comp.target) == "pow":
            runs.append([])
        runs[-1].append(comp)
        last_path = path
    member_of: dict = {}
    for run in runs:
        names = [packet_name(n.target) for n in run]
        if names not in (["pow", "mean", "add", "rsqrt", "mul"], ["pow", "mean", "add", "rsqrt", "mul", "mul"]):
            continue
        pow_, mean, add, rsqrt, mul = run[:5]
        x = pow_.args[0]
        if pow_.args[1] != 2 or mean.args[0] is not pow_ or add.args[0] is not mean or rsqrt.args[0] is not add:
            continue
        if not isinstance(add.args[1], (int, float)) or set(mul.args[:2]) != {x, rsqrt}:
            continue
        w = None
        if len(run) == 6:
            last = run[5]
            if last.args[0] is not mul or not isinstance(last.args[1], fx.Node) or last.args[1].op != "placeholder":
                continue
            w = last.args[1]
        leader = run[-1]
        facts.fused[leader] = FusedRMSNorm(run, x, w, rsqrt, mul, float(add.args[1]), tuple(mean.args[1]))
        for member in run:
            member_of[member] = leader
    members = {m for m, leader in member_of.items() if m is not leader}
    facts.compute = [n for n in facts.compute if n not in members]
    return member_of


def _only_backward_users(node: fx.Node, backward: set) -> bool:
    """Whether every use of ``node`` is in the backward (directly or through aliases)."""
    return all(u in backward or (is_alias(u) and _only_backward_users(u, backward)) for u in node.users)


def _fuse_cross_entropies(facts: JointFacts) -> dict:
    """Fold each ``_log_softmax`` + ``nll_loss_forward`` pair into one op (the loss call
    leads it). Only the plain form is folded: a 2-d input, dimension 1, no dtype change,
    no class weights, the log-probabilities read by nothing else in the forward pass (the
    backward may read them) and both results of the loss named. Returns member -> leader."""
    backward = set(facts.backward)
    compute = set(facts.compute)
    member_of: dict = {}
    for comp in facts.compute:
        if packet_name(comp.target) != "nll_loss_forward" or len(comp.args) < 5:
            continue
        lsm, target, weight, reduction, ignore_index = comp.args[:5]
        if weight is not None or not isinstance(lsm, fx.Node) or lsm not in compute or packet_name(lsm.target) != "_log_softmax":
            continue
        x, dim, half_to_float = lsm.args[:3]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() != 2 or dim not in (1, -1) or half_to_float:
            continue
        if any(u is not comp and not (u in backward or (is_alias(u) and _only_backward_users(u, backward))) for u in lsm.users):
            continue
        items = {u.args[1]: u for u in comp.users if u.target is operator.getitem}
        if set(items) != {0, 1} or not isinstance(target, fx.Node):
            continue
        facts.fused[comp] = FusedCrossEntropy([lsm, comp], x, target, lsm, items[0], items[1], int(reduction), int(ignore_index))
        member_of[lsm] = comp
        member_of[comp] = comp
    facts.compute = [n for n in facts.compute if member_of.get(n, n) is n]
    return member_of


def _fuse_linear_heads(facts: JointFacts) -> dict:
    """Fold the product (``mm``, or ``addmm`` with a bias) that makes a folded
    cross-entropy's logits into it, when
    the logits reach the log-softmax through views only, each value on the way has that
    one user, and both sit on the same side of the model/loss boundary (a loss the tracer
    adds outside the model is stripped for ``--loss output``; the model's last product
    must stay). Returns member -> leader."""
    compute = set(facts.compute)
    member_of: dict = {}
    for leader, group in list(facts.fused.items()):
        if not isinstance(group, FusedCrossEntropy):
            continue
        chain, node = [], group.x
        while is_alias(node) and len(node.users) == 1:
            chain.append(node)
            node = node.args[0]
        mm = node
        kind = packet_name(mm.target) if mm in compute else None
        if kind not in ("mm", "addmm") or len(mm.users) != 1 or (chain[-1] if chain else group.lsm) not in mm.users:
            continue
        if kind == "addmm" and (mm.kwargs.get("beta", 1) != 1 or mm.kwargs.get("alpha", 1) != 1):
            continue
        b, x, w = (None, *mm.args[:2]) if kind == "mm" else mm.args[:3]
        if not all(isinstance(n, fx.Node) for n in (x, w) + ((b,) if kind == "addmm" else ())):
            continue
        if b is not None and tuple(b.meta["val"].shape) != (w.meta["val"].shape[1],):
            continue  # a bias broadcast from another shape: left unfolded
        if bool(mm.meta.get("nn_module_stack")) != bool(leader.meta.get("nn_module_stack")):
            continue
        lsm, nll = group.members
        facts.fused[leader] = FusedLinearCrossEntropy([mm, *reversed(chain), lsm, nll], x, w, b, group.target, lsm, group.loss,
                                                      group.total_weight, group.reduction, group.ignore_index)
        for member in (mm, *chain):
            member_of[member] = leader
    facts.compute = [n for n in facts.compute if n not in member_of]
    return member_of


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
