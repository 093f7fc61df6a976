"""Turn the facts of a joint graph into a :class:`~monetdsl.ir.Network`.

One IR forward op per live forward aten call (views are folded into the tensor whose
storage they share); its backward ops are the backward nodes carrying its sequence
number. For op kinds in the catalogue the op gets every legal alternative, with the
first forward and first backward alternatives keeping exactly what autograd keeps
(checked against the captured graph: an op whose catalogue description disagrees with
what the graph reads falls back to the generic description and a note says so). Every
other op gets one implementation that reads what the captured backward reads.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from ..catalogue import CATALOGUE, kind_for
from ..catalogue.base import Binding, OpKind
from ..graph import index
from ..ir import DTYPE_BITS, BackwardImpl, BackwardOp, ForwardImpl, ForwardOp, Network, Tensor, TensorKind, grad_name, shape_bytes
from ..validate import backward_overwrite_problem
from .costs import MATMUL_KINDS, Roofline, node_flops
from .joint import FusedCrossEntropy, FusedLinearCrossEntropy, JointFacts, tensor_args, is_alias, packet_name
from .naming import NameAllocator, module_path, op_names

__all__ = ["BuiltNetwork", "OpRecord", "build_network", "ir_dtype"]

_DTYPES = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool", torch.complex64: "c64", torch.complex128: "c128",
}
for _name, _ir in (("float8_e4m3fn", "f8e4m3"), ("float8_e5m2", "f8e5m2"), ("uint16", "u16"), ("uint32", "u32"), ("uint64", "u64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _ir


def ir_dtype(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no .monet spelling") from None


@dataclass
class OpRecord:
    """What the tracer knows about one IR op (kept for costs, profiling and tests)."""

    name: str
    node: fx.Node
    kind: OpKind | None
    binding: Binding | None
    module: str | None
    role_names: dict[str, str] = field(default_factory=dict)
    autograd_reads: list[str] = field(default_factory=list)  # tensor names the captured backward reads
    backward_nodes: list[fx.Node] = field(default_factory=list)
    note: str | None = None


@dataclass
class BuiltNetwork:
    network: Network
    records: list[OpRecord]
    never_recompute: list[str]
    notes: list[str]
    #: the joint-graph facts and the tensor name of every storage-owning value: what the
    #: runtime needs to replay the captured calls (views are re-derived from their owners)
    facts: JointFacts | None = None
    value_names: dict = field(default_factory=dict)
    #: what measuring every implementation's workspace found (monetdsl.costs.estimated_workspace)
    workspace: object | None = None


def _val(node: fx.Node):
    return node.meta.get("val")


def _tensor_of(name: str, val: torch.Tensor, kind: TensorKind) -> Tensor:
    dtype = ir_dtype(val.dtype)
    shape = tuple(int(d) for d in val.shape)
    return Tensor(name, kind, shape_bytes(dtype, shape), dtype, shape)


def _nbytes(val) -> int:
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    if isinstance(val, (list, tuple)):
        return sum(_nbytes(v) for v in val)
    return 0


def _meta_args(node: fx.Node):
    def conv(a):
        if isinstance(a, fx.Node):
            return a.meta.get("val")
        if isinstance(a, (list, tuple)):
            return type(a)(conv(b) for b in a)
        return a

    return conv(node.args), {k: conv(v) for k, v in node.kwargs.items()}


def _node_cost(node: fx.Node, roofline: Roofline, fpe: float = 1.0) -> float:
    if node.target is operator.getitem or is_alias(node):
        return 0.0
    args, kwargs = _meta_args(node)
    val = _val(node)
    flops = node_flops(node.target, args, kwargs, val)
    out_numel = val.numel() if isinstance(val, torch.Tensor) else sum(v.numel() for v in (val or ()) if isinstance(v, torch.Tensor))
    flops = max(flops, out_numel * fpe)
    nbytes = sum(_nbytes(a.meta.get("val")) for a in tensor_args(node)) + _nbytes(val)
    dtype = _main_dtype(val)
    matmul = packet_name(node.target) in ("mm", "bmm", "addmm", "convolution", "convolution_backward", "baddbmm") or "attention" in packet_name(node.target)
    return roofline.time_us(flops, nbytes, dtype, matmul)


def _main_dtype(val) -> str:
    if isinstance(val, torch.Tensor):
        try:
            return ir_dtype(val.dtype)
        except ValueError:
            return "f32"
    for v in val or ():
        if isinstance(v, torch.Tensor):
            return _main_dtype(v)
    return "f32"


def build_network(facts: JointFacts, name: str, roofline: Roofline) -> BuiltNetwork:
    """The IR of a captured step: tensors, forward ops with alternatives, backward ops."""
    return _Builder(facts, name, roofline).build()


class _Builder:
    """Builds a network in passes: fixed tensors, op records, outputs, catalogue plans,
    forward ops, then backward ops from the loss backwards."""

    def __init__(self, facts: JointFacts, name: str, roofline: Roofline):
        self.facts = facts
        self.name = name
        self.roofline = roofline
        self.tensors: dict[str, Tensor] = {}
        self.value_name: dict[fx.Node, str] = {}
        self.notes: list[str] = []
        self.names = NameAllocator()
        self.records: list[OpRecord] = []
        self.steps: dict[str, list] = {}  # op name -> [(BackwardStep, roles)] for catalogue ops
        self.grad_tensors: dict[str, Tensor] = {}

    def build(self) -> BuiltNetwork:
        self._fixed_tensors()
        self._op_records()
        self._outputs_and_roles()
        for record in self.records:
            if record.kind is not None:
                self._plan_catalogue(record)
        forward_ops, never_recompute = self._forward_ops()
        backward_ops = self._backward_ops(forward_ops)
        self.tensors.update(self.grad_tensors)
        if self.facts.unattributed:
            self.notes.append(f"{len(self.facts.unattributed)} backward node(s) read forward tensors but belong to no op: "
                              + ", ".join(n.name for n in self.facts.unattributed[:5]))
        self.notes.extend(f"{r.name}: {r.note}" for r in self.records if r.note)
        network = _legal_overwrites(Network(self.name, self.tensors, tuple(forward_ops), tuple(backward_ops),
                                            (self.name_of(self.facts.loss),), ()))
        return BuiltNetwork(network, self.records, never_recompute, self.notes, self.facts, dict(self.value_name))

    # helpers -------------------------------------------------------------------------------
    def name_of(self, node: fx.Node) -> str:
        owner = self.facts.owner(node)
        if owner not in self.value_name:
            raise KeyError(f"value {owner.name} is not in the network")
        return self.value_name[owner]

    def requires_grad(self, node: fx.Node) -> bool:
        return bool(self.facts.requires_grad.get(self.facts.owner(node), False))

    def need_grad(self, tname: str) -> str:
        g = grad_name(tname)
        if g not in self.grad_tensors:
            base = self.tensors[tname]
            self.grad_tensors[g] = Tensor(g, TensorKind.GRADIENT, base.nbytes, base.dtype, base.shape, None, tname)
        return g

    # passes ----------------------------------------------------------------------------------
    def _fixed_tensors(self) -> None:
        kinds = {"param": TensorKind.PARAM, "buffer": TensorKind.BUFFER, "input": TensorKind.INPUT}
        for node in self.facts.graph.nodes:
            if node.op != "placeholder" or node.name.startswith("tangents"):
                continue
            ph = self.facts.captured.placeholders[node.name]
            tname = self.names.take(ph.name)
            self.tensors[tname] = _tensor_of(tname, _val(node), kinds[ph.kind])
            self.value_name[node] = tname

    def _op_records(self) -> None:
        entries = []
        for comp in self.facts.compute:
            stack = comp.meta.get("nn_module_stack") or {}
            path = module_path(list(stack.values())[-1][0]) if stack else None
            kind, binding = self._bind(comp)
            short = kind.name if kind is not None else _short_kind(packet_name(comp.target))
            entries.append((path, short))
            self.records.append(OpRecord("", comp, kind, binding, path))
        taken = NameAllocator()
        for record, op_name in zip(self.records, op_names(entries, self.facts.captured.leaf_modules or None)):
            record.name = taken.take(op_name)

    def _bind(self, comp: fx.Node):
        group = self.facts.fused.get(comp)
        if isinstance(group, FusedLinearCrossEntropy):
            kind, binding = _linear_cross_entropy_binding(group)
            binding.attrs["grad_roles"] = tuple(r for r in ("x", "w", "b") if r in binding.inputs and self.requires_grad(binding.inputs[r]))
            return kind, binding
        if isinstance(group, FusedCrossEntropy):
            return _cross_entropy_binding(group)
        if group is not None:
            return _rms_norm_binding(group)
        kind = kind_for(packet_name(comp.target))
        if kind is None:
            return None, None
        in_shapes = [tuple(a.meta["val"].shape) if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) else ()
                     for a in comp.args if isinstance(a, fx.Node) or a is None]
        val = _val(comp)
        out_shapes = [tuple(val.shape)] if isinstance(val, torch.Tensor) else [tuple(v.shape) for v in val if isinstance(v, torch.Tensor)]
        try:
            binding = kind.bind(comp.target, comp.args, comp.kwargs, in_shapes, out_shapes)
        except Exception as exc:  # noqa: BLE001 - an unexpected signature: describe generically
            self.notes.append(f"{packet_name(comp.target)}: catalogue entry {kind.name} could not bind ({exc}); described generically")
            return None, None
        return (kind, binding) if binding is not None else (None, None)

    def _outputs_and_roles(self) -> None:
        """Name every output; record which tensor plays which role of a catalogue kind."""
        for record in self.records:
            role_of_index = {idx: role for role, idx in record.binding.outputs.items()} if record.kind else {}
            for idx, value in self.facts.outputs[record.node].items():
                role = role_of_index.get(idx, "y" if record.kind is not None and idx is None else None)
                if role in ("running_mean_out", "running_var_out"):
                    continue  # the buffers themselves (see JointFacts.owner)
                if role == "y" or (role is None and idx in (None, 0)):
                    tname = self.names.take(record.name)
                else:
                    tname = self.names.take(f"{record.name}.{role or f'out{idx}'}")
                if role is not None:
                    record.role_names[role] = tname
                self.value_name[value] = tname
                self.tensors[tname] = _tensor_of(tname, _val(value), TensorKind.ACTIVATION)
        for record in self.records:
            if record.kind is None:
                continue
            for role, arg in record.binding.inputs.items():
                if isinstance(arg, fx.Node):
                    record.role_names[role] = self.name_of(arg)
            for alt in record.kind.forward_alts(record.binding):
                for role in alt.derived:  # derived tensors get their names now, their types later
                    if role not in record.role_names:
                        record.role_names[role] = self.names.take(f"{record.name}.{role}")

    def _plan_catalogue(self, record: OpRecord) -> None:
        """Choose the backward steps of a catalogue op, or fall back to the generic description
        when its first alternatives would not keep what the captured backward keeps."""
        kind, binding, tensors = record.kind, record.binding, self.tensors
        binding.attrs["param_roles"] = tuple(
            role for role, arg in binding.inputs.items() if isinstance(arg, fx.Node) and tensors[self.name_of(arg)].kind is TensorKind.PARAM
        )
        steps = []
        for step in kind.backward_steps(binding):
            roles = [r for r in step.grads if isinstance(binding.inputs.get(r), fx.Node) and self.requires_grad(binding.inputs[r])]
            if roles:
                steps.append((step, roles))
        joint_reads = [self.name_of(v) for v in self.facts.reads.get(record.node, [])]
        wanted = {n for n in joint_reads if not tensors[n].is_fixed}

        def nonfixed(alt):
            return {record.role_names[r] for r in alt.reads if not tensors.get(record.role_names[r], _DERIVED).is_fixed}

        def usable(alt):
            return all(r in record.role_names for r in alt.reads)

        if len(steps) == 1:  # whichever alternative keeps what autograd keeps goes first
            step, roles = steps[0]
            matching = [a for a in step.alts if usable(a) and nonfixed(a) == wanted]
            if matching and matching[0] is not step.alts[0]:
                steps = [(type(step)(step.name, step.grads, (matching[0],) + tuple(a for a in step.alts if a is not matching[0])), roles)]
        have = set().union(*(nonfixed(step.alts[0]) for step, _ in steps)) if steps else set()
        if steps and wanted != have:
            record.note = (f"catalogue entry {kind.name} would keep {sorted(have)} but autograd keeps {sorted(wanted)};"
                           " described generically")
            record.kind = None
            record.role_names = {}
            return
        self.steps[record.name] = steps

    def _forward_ops(self) -> tuple[list[ForwardOp], list[str]]:
        readers_after: dict[str, int] = {}
        for i, record in enumerate(self.records):
            for arg in self.facts.inputs_of(record.node):
                readers_after[self.name_of(arg)] = i  # last forward reader, by position
        forward_ops, never_recompute = [], []
        for i, record in enumerate(self.records):
            inputs = []
            for arg in self.facts.inputs_of(record.node):
                n = self.name_of(arg)
                if n not in inputs:
                    inputs.append(n)
            outputs = [self.value_name[v] for v in self.facts.outputs[record.node].values() if v in self.value_name]
            if record.kind is not None:  # derived tensors belong to alternatives, not to the op
                derived = {record.role_names[r] for alt in record.kind.forward_alts(record.binding) for r in alt.derived}
                for tname in derived & set(outputs):
                    outputs.remove(tname)
                    del self.tensors[tname]
            outputs = [o for o in outputs if o not in inputs]
            if not outputs:
                raise ValueError(f"op {record.name} has no outputs")
            impls = _forward_impls(record, inputs, outputs, self.tensors, self.facts, self.roofline,
                                   lambda target: readers_after.get(target, -1) > i)
            if torch.Tag.nondeterministic_seeded in getattr(record.node.target, "tags", ()) and record.kind is None:
                never_recompute.append(record.name)  # a recomputation would draw other numbers
            forward_ops.append(ForwardOp(record.name, tuple(inputs), tuple(outputs), tuple(impls)))
        return forward_ops, never_recompute

    def _backward_ops(self, forward_ops: list[ForwardOp]) -> list[BackwardOp]:
        """From the loss backwards, so an op reads only output gradients that really flow."""
        loss_name = self.name_of(self.facts.loss)
        produced = {self.need_grad(loss_name)}
        rg_by_name = {n: bool(self.facts.requires_grad.get(node, False)) for node, n in self.value_name.items()}
        by_op: dict[str, list[BackwardOp]] = {}
        for record, fop in reversed(list(zip(self.records, forward_ops))):
            record.backward_nodes = self.facts.groups.get(record.node, [])
            joint_reads = [self.name_of(v) for v in self.facts.reads.get(record.node, [])]
            record.autograd_reads = joint_reads
            grad_reads = [grad_name(o) for o in fop.outputs if grad_name(o) in produced]
            grad_inputs = [a for a in fop.inputs if rg_by_name.get(a, False)]
            if not grad_reads or not grad_inputs:
                continue
            if record.kind is not None and self.steps.get(record.name):
                bops = self._catalogue_backward(record, grad_reads, joint_reads)
            else:
                time_us = round(sum(_node_cost(n, self.roofline) for n in record.backward_nodes), 3)
                outs = tuple(self.need_grad(a) for a in grad_inputs)
                impl = BackwardImpl("default", frozenset(grad_reads + joint_reads), time_us)
                bops = [BackwardOp(f"{record.name}.backward", outs, (impl,), record.name)]
            for bop in bops:
                produced.update(bop.outputs)
            by_op[record.name] = bops
        return [b for r in self.records for b in by_op.get(r.name, [])]

    def _catalogue_backward(self, record: OpRecord, grad_reads: list[str], joint_reads: list[str]) -> list[BackwardOp]:
        kind, binding, tensors = record.kind, record.binding, self.tensors
        steps = self.steps[record.name]
        first_reads = {record.role_names[r] for step, _ in steps for r in step.alts[0].reads}
        extra_fixed = [n for n in joint_reads if tensors[n].is_fixed and n not in first_reads]
        flops_fwd = _flops(record)
        dtype = _main_dtype(_val(record.node))
        itemsize = DTYPE_BITS[dtype] // 8 if DTYPE_BITS.get(dtype, 0) >= 8 else 1
        matmul = kind.name in MATMUL_KINDS
        grad_bytes = sum(tensors[g[5:-1]].nbytes for g in grad_reads)
        bops = []
        for i, (step, roles) in enumerate(steps):
            outs = []
            for r in roles:
                g = self.need_grad(self.name_of(binding.inputs[r]))
                if g not in outs:
                    outs.append(g)
            out_bytes = sum(tensors[g[5:-1]].nbytes for g in outs)
            impls = []
            for j, alt in enumerate(step.alts):
                if not all(r in record.role_names and record.role_names[r] in tensors for r in alt.reads):
                    continue  # reads a tensor no legal forward alternative produces
                accumulates = frozenset(self.need_grad(self.name_of(binding.inputs[r])) for r in alt.accumulates if r in roles)
                owners = [self.name_of(a) for a in binding.inputs.values() if isinstance(a, fx.Node)]
                if any(tensors[self.name_of(binding.inputs[r])].kind is not TensorKind.PARAM
                       or owners.count(self.name_of(binding.inputs[r])) > 1 for r in alt.accumulates if r in roles):
                    continue  # only a parameter's gradient, reaching the op through one argument, is added in place
                overwrites = None
                if alt.overwrites is not None:
                    overwrites = grad_name(record.role_names.get(alt.overwrites, ""))
                    if overwrites not in grad_reads:
                        continue  # that output's gradient does not flow here
                reads = [record.role_names[r] for r in alt.reads] + (extra_fixed if i == 0 and j == 0 else [])
                read_bytes = sum(tensors[n].nbytes for n in set(reads))
                own = kind.flops("backward", alt.name, binding)
                if own is not None:
                    flops = own
                elif kind.name in ("conv", "matmul"):
                    flops = flops_fwd
                elif kind.name == "sdpa":
                    flops = flops_fwd * (2.5 if alt.name == "flash" else 2.0)  # flash recomputes the probabilities
                else:
                    flops = 2 * flops_fwd + (flops_fwd if alt.name == "from_input" and kind.name == "max_pool2d" else 0)
                moved = read_bytes + grad_bytes + out_bytes + kind.temporary_traffic(alt.name, binding, itemsize)
                workspace = sum(tensors[record.role_names[r]].nbytes for r in kind.workspace_roles(alt.name))
                moved += 2 * workspace  # written once and read once more
                time_us = self.roofline.time_us(flops, moved, dtype, matmul)
                impls.append(BackwardImpl(alt.name, frozenset(reads + grad_reads), time_us, workspace, accumulates=accumulates,
                                          overwrites=overwrites))
            bops.append(BackwardOp(f"{record.name}.{step.name}", tuple(outs), tuple(impls), record.name))
        return bops


_DERIVED = Tensor("<derived>", TensorKind.ACTIVATION, 0)


def _legal_overwrites(network: Network) -> Network:
    """``network`` without the backward implementations that would overwrite a gradient
    the memory model does not let them (read later, another writer of their output, a
    size change) or that may share its tensor at run time: the catalogue offers them by
    role, the graph decides."""
    backward = []
    for bop in network.backward_ops:
        keep = tuple(i for i in bop.impls if i.overwrites is None
                     or (backward_overwrite_problem(network, bop, i) is None and not _may_be_shared(network, i.overwrites)))
        backward.append(bop if len(keep) == len(bop.impls) else replace(bop, impls=keep))
    if all(a is b for a, b in zip(backward, network.backward_ops)):
        return network
    return Network(network.name, network.tensors, network.forward_ops, tuple(backward), network.outputs, network.fixed)


def _may_be_shared(network: Network, gradient: str) -> bool:
    """Whether, at run time, ``gradient`` may be the very tensor of another gradient: a
    step that writes several activation gradients may hand them all one tensor (an
    addition's backward passes its incoming gradient to both inputs), and one that reads a
    seed may pass the caller's tensor on. Writing over it would change the other."""
    tensors, idx = network.tensors, index(network)
    seeds = set(idx.seeds())
    for name in idx.gradient_writers.get(gradient, ()):
        bop = idx.backward_ops[name]
        activation_grads = [o for o in bop.outputs if not (tensors[o].grad_of is not None and tensors[tensors[o].grad_of].is_fixed)]
        if len(activation_grads) > 1 or any(seeds & i.reads for i in bop.impls):
            return True
    return False


def _rms_norm_binding(group):
    """A decomposed RMS norm as the catalogue's fused ``rms_norm`` kind."""
    x_val = group.x.meta["val"]
    dims = tuple(d % x_val.dim() for d in group.dims)
    shape = tuple(int(x_val.shape[d]) for d in sorted(dims))
    inputs = {"x": group.x}
    outputs = {"y": 0, "rstd": 1}
    if group.w is not None:
        inputs["w"] = group.w
        outputs["xhat"] = 2
    attrs = {"normalized_shape": shape, "eps": group.eps, "shape": tuple(x_val.shape), "decomposed": True}
    return kind_for("_fused_rms_norm"), Binding(inputs, outputs, attrs)


def _cross_entropy_binding(group: FusedCrossEntropy):
    """A folded ``_log_softmax`` + ``nll_loss_forward`` as the catalogue's ``cross_entropy``."""
    kind = CATALOGUE["cross_entropy"]
    return kind, kind.binding(group.x, group.target, 0, 1, 2, group.reduction, group.ignore_index, tuple(group.x.meta["val"].shape))


def _linear_cross_entropy_binding(group: FusedLinearCrossEntropy):
    """A folded linear output layer + cross-entropy as the catalogue's ``linear_cross_entropy``."""
    kind = CATALOGUE["linear_cross_entropy"]
    x, w = group.x.meta["val"], group.w.meta["val"]
    return kind, kind.binding(group.x, group.w, group.b, group.target, 0, 1, 2, group.reduction, group.ignore_index,
                              tuple(x.shape), tuple(w.shape), x.element_size())


def _short_kind(packet: str) -> str:
    """``nll_loss_forward`` -> ``nll_loss``, ``_unsafe_index`` -> ``unsafe_index``."""
    name = packet.lstrip("_")
    for suffix in ("_forward", "_functional", "_default"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or packet


# ----------------------------------------------------------------------------------------- forward
def _flops(record: OpRecord) -> float:
    comp = record.node
    args, kwargs = _meta_args(comp)
    val = _val(comp)
    flops = node_flops(comp.target, args, kwargs, val)
    y = val if isinstance(val, torch.Tensor) else next(v for v in val if isinstance(v, torch.Tensor))
    fpe = record.kind.flops_per_element if record.kind is not None else 1.0
    if record.kind is not None and record.kind.name == "cross_entropy":  # per element of the logits
        return record.binding.inputs["x"].meta["val"].numel() * record.kind.flops_per_element
    if record.kind is not None and record.kind.name == "sdpa":
        q, k = args[0], args[1]
        flops = 4.0 * q.numel() * k.shape[-2]
    return max(flops, y.numel() * fpe)


def _forward_impls(record, inputs, outputs, tensors, facts, roofline, read_later) -> list[ForwardImpl]:
    comp = record.node
    dtype = _main_dtype(_val(comp))
    if record.kind is None:
        return [ForwardImpl("default", _node_cost(comp, roofline))]
    kind, binding = record.kind, record.binding
    matmul = kind.name in MATMUL_KINDS
    flops = _flops(record)
    in_bytes = sum(tensors[n].nbytes for n in inputs)
    out_bytes = sum(tensors[n].nbytes for n in outputs)
    x_name = record.role_names.get("x")
    extra = tensors[x_name].nbytes if (kind.two_pass_forward and x_name) else 0  # the statistics pass
    y_val = _val(comp) if isinstance(_val(comp), torch.Tensor) else _val(comp)[0]
    impls = []
    for alt in kind.forward_alts(binding):
        overwrites = None
        if alt.overwrites is not None:
            target = record.role_names.get(alt.overwrites)
            if not _in_place_legal(target, outputs, tensors, facts, binding.inputs.get(alt.overwrites), read_later):
                continue
            overwrites = target
        derived = []
        for role in alt.derived:
            tname = record.role_names[role]
            if tname not in tensors:
                dt, shape = kind.derived_type(role, binding, y_val.dtype, tuple(y_val.shape))
                irdt = ir_dtype(dt)
                tensors[tname] = Tensor(tname, TensorKind.ACTIVATION, shape_bytes(irdt, shape), irdt, tuple(shape))
            derived.append(tname)
        derived_bytes = sum(tensors[d].nbytes for d in derived)
        own = kind.flops("forward", alt.name, binding)
        flops = flops if own is None else own
        time_us = roofline.time_us(flops, in_bytes + out_bytes + derived_bytes + extra, dtype, matmul)
        reads = _recompute_reads(record, alt)
        reuses_all = all(role in record.role_names for role in alt.recompute_reads)
        recompute_time = roofline.time_us(flops, in_bytes + out_bytes, dtype, matmul) if alt.cheaper_recompute and reuses_all else None
        impls.append(ForwardImpl(alt.name, time_us, 0, overwrites, tuple(derived), recompute_time, reads))
    return impls


def _recompute_reads(record: OpRecord, alt) -> frozenset[str]:
    """The tensors a recomputation of ``alt`` reads: the roles of its ``recompute_reads``
    that the captured step produces.

    Statistics such as batch norm's mean and invstd exist in the joint graph only when a
    backward reads them: when no gradient flows through the op (a frozen batch norm or
    layer norm on an input that needs none: a frozen backbone) autograd drops them and
    they have no name. A recomputation then normalises again from its input, as the
    first forward did (batch norm without touching the running statistics), so it reads
    nothing more than the op's inputs and costs the full forward (no cheaper recompute).
    """
    return frozenset(record.role_names[role] for role in alt.recompute_reads if role in record.role_names)


def _in_place_legal(target, outputs, tensors, facts, arg, read_later) -> bool:
    """Overwriting ``target`` is legal when it is an activation the op reads directly (not
    through a view), of the output's type, that no later forward op reads and that is not
    the loss."""
    if target is None or target not in tensors:
        return False
    t = tensors[target]
    if t.kind is not TensorKind.ACTIVATION:
        return False
    if not isinstance(arg, fx.Node) or facts.owner(arg) is not arg:
        return False  # the op reads a view: writing the whole storage would be wrong
    y = tensors[outputs[0]]
    if (y.dtype, y.shape) != (t.dtype, t.shape):
        return False
    if read_later(target):
        return False
    return facts.owner(facts.loss) is not arg
