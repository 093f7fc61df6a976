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
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..catalogue import kind_for
from ..catalogue.base import Binding, OpKind
from ..ir import BackwardImpl, BackwardOp, ForwardImpl, ForwardOp, Network, Tensor, TensorKind, grad_name, shape_bytes
from .costs import MATMUL_KINDS, Roofline, node_flops
from .joint import JointFacts, tensor_args, is_alias, packet_name
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
    captured = facts.captured
    tensors: dict[str, Tensor] = {}
    value_name: dict[fx.Node, str] = {}
    notes: list[str] = []
    names = NameAllocator()

    # fixed tensors ------------------------------------------------------------------------------
    for node in facts.graph.nodes:
        if node.op != "placeholder" or node.name.startswith("tangents"):
            continue
        ph = captured.placeholders[node.name]
        kind = {"param": TensorKind.PARAM, "buffer": TensorKind.BUFFER, "input": TensorKind.INPUT}[ph.kind]
        tname = names.take(ph.name)
        tensors[tname] = _tensor_of(tname, _val(node), kind)
        value_name[node] = tname

    # op names -------------------------------------------------------------------------------------
    records: list[OpRecord] = []
    entries = []
    for comp in facts.compute:
        stack = comp.meta.get("nn_module_stack") or {}
        path = module_path(list(stack.values())[-1][0]) if stack else None
        kind = kind_for(packet_name(comp.target))
        binding = None
        group = facts.fused.get(comp)
        if group is not None:
            kind, binding = _rms_norm_binding(group)
        elif kind is not None:
            in_shapes = [tuple(a.meta["val"].shape) if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor) else ()
                         for a in comp.args if isinstance(a, fx.Node) or a is None]
            val = _val(comp)
            out_shapes = [tuple(val.shape)] if isinstance(val, torch.Tensor) else [tuple(v.shape) for v in val if isinstance(v, torch.Tensor)]
            try:
                binding = kind.bind(comp.target, comp.args, comp.kwargs, in_shapes, out_shapes)
            except Exception as exc:  # noqa: BLE001 - an unexpected signature: describe generically
                notes.append(f"{packet_name(comp.target)}: catalogue entry {kind.name} could not bind ({exc}); described generically")
                binding = None
            if binding is None:
                kind = None
        short = kind.name if kind is not None else _short_kind(packet_name(comp.target))
        entries.append((path, short))
        records.append(OpRecord("", comp, kind, binding, path))
    op_taken = NameAllocator()
    for record, op_name in zip(records, op_names(entries, captured.leaf_modules or None)):
        record.name = op_taken.take(op_name)

    # main outputs -------------------------------------------------------------------------------
    derived_roles_of: dict[str, set[str]] = {}
    for record in records:
        comp = record.node
        outs = facts.outputs[comp]
        role_of_index: dict = {}
        derived_roles: set[str] = set()
        if record.kind is not None:
            for alt in record.kind.forward_alts(record.binding):
                derived_roles.update(alt.derived)
            role_of_index = {idx: role for role, idx in record.binding.outputs.items()}
        derived_roles_of[record.name] = derived_roles
        for idx, value in outs.items():
            role = role_of_index.get(idx)
            if role is None and record.kind is not None and idx is None:
                role = "y"
            if role in ("running_mean_out", "running_var_out"):
                continue
            if role == "y" or (role is None and idx in (None, 0)):
                tname = names.take(record.name)
            else:
                tname = names.take(f"{record.name}.{role or f'out{idx}'}")
            if role is not None:
                record.role_names[role] = tname
            value_name[value] = tname
            tensors[tname] = _tensor_of(tname, _val(value), TensorKind.ACTIVATION)

    def name_of(node: fx.Node) -> str:
        owner = facts.owner(node)
        if owner not in value_name:
            raise KeyError(f"value {owner.name} is not in the network")
        return value_name[owner]

    def requires_grad(node: fx.Node) -> bool:
        return bool(facts.requires_grad.get(facts.owner(node), False))

    # forward ops ------------------------------------------------------------------------------------
    forward_ops: list[ForwardOp] = []
    never_recompute: list[str] = []
    readers_after: dict[str, int] = {}
    order = {r.name: i for i, r in enumerate(records)}
    for i, record in enumerate(records):
        for arg in facts.inputs_of(record.node):
            readers_after[name_of(arg)] = i  # last forward reader, by position
    for record in records:
        comp = record.node
        inputs = []
        for arg in facts.inputs_of(comp):
            n = name_of(arg)
            if n not in inputs:
                inputs.append(n)
        outputs = [value_name[v] for v in facts.outputs[comp].values() if v in value_name]
        outputs = [o for o in outputs if o not in inputs]
        # derived roles are never main outputs
        if record.kind is not None:
            for role in derived_roles_of[record.name]:
                tname = record.role_names.pop(role, None)
                if tname in outputs:
                    outputs.remove(tname)
                    tensors.pop(tname, None)
            for role, arg in record.binding.inputs.items():
                if isinstance(arg, fx.Node):
                    record.role_names[role] = name_of(arg)
        if not outputs:
            raise ValueError(f"op {record.name} has no outputs")
        impls = _forward_impls(record, inputs, outputs, tensors, facts, roofline, readers_after, order, name_of)
        if torch.Tag.nondeterministic_seeded in getattr(comp.target, "tags", ()) and record.kind is None:
            never_recompute.append(record.name)
        forward_ops.append(ForwardOp(record.name, tuple(inputs), tuple(outputs), tuple(impls)))

    # backward ops, from the loss backwards so only gradients that flow are read --------------------
    loss_name = name_of(facts.loss)
    produced = {grad_name(loss_name)}
    grad_tensor = {}

    def need_grad(tname: str) -> str:
        g = grad_name(tname)
        if g not in grad_tensor:
            base = tensors[tname]
            grad_tensor[g] = Tensor(g, TensorKind.GRADIENT, base.nbytes, base.dtype, base.shape, None, tname)
        return g

    need_grad(loss_name)
    rg_by_name = {n: bool(facts.requires_grad.get(node, False)) for node, n in value_name.items()}
    backward_by_op: dict[str, list[BackwardOp]] = {}
    for record, fop in reversed(list(zip(records, forward_ops))):
        comp = record.node
        record.backward_nodes = facts.groups.get(comp, [])
        joint_reads = [name_of(v) for v in facts.reads.get(comp, [])]
        record.autograd_reads = joint_reads
        grad_reads = [grad_name(o) for o in fop.outputs if grad_name(o) in produced]
        if not grad_reads:
            continue
        grad_inputs = [a for a in fop.inputs if rg_by_name.get(a, False)]
        if not grad_inputs:
            continue
        bops = None
        if record.kind is not None:
            bops = _catalogue_backward(record, fop, grad_reads, joint_reads, tensors, roofline, facts, name_of, requires_grad, need_grad)
        if bops is None:
            time_us = round(sum(_node_cost(n, roofline) for n in record.backward_nodes), 3)
            reads = frozenset(grad_reads + joint_reads)
            outs = tuple(need_grad(a) for a in grad_inputs)
            bops = [BackwardOp(f"{record.name}.backward", outs, (BackwardImpl("default", reads, time_us),), record.name)]
        for bop in bops:
            produced.update(bop.outputs)
        backward_by_op[record.name] = bops
    backward_ops = [b for r in records for b in backward_by_op.get(r.name, [])]
    tensors.update(grad_tensor)
    if facts.unattributed:
        notes.append(f"{len(facts.unattributed)} backward node(s) read forward tensors but belong to no op: "
                     + ", ".join(n.name for n in facts.unattributed[:5]))
    for record in records:
        if record.note:
            notes.append(f"{record.name}: {record.note}")
    network = Network(name, tensors, tuple(forward_ops), tuple(backward_ops), (loss_name,), ())
    return BuiltNetwork(network, records, never_recompute, notes)


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


def _short_kind(packet: str) -> str:
    """``nll_loss_forward`` -> ``nll_loss``, ``_unsafe_index`` -> ``unsafe_index``."""
    name = packet.lstrip("_")
    for suffix in ("_forward", "_functional", "_default"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or packet


# ----------------------------------------------------------------------------------------- forward
def _flops(record: OpRecord, roofline: Roofline) -> float:
    comp = record.node
    args, kwargs = _meta_args(comp)
    val = _val(comp)
    flops = node_flops(comp.target, args, kwargs, val)
    y = val if isinstance(val, torch.Tensor) else next(v for v in val if isinstance(v, torch.Tensor))
    fpe = record.kind.flops_per_element if record.kind is not None else 1.0
    if record.kind is not None and record.kind.name == "sdpa":
        q, k = args[0], args[1]
        flops = 4.0 * q.numel() * k.shape[-2]
    return max(flops, y.numel() * fpe)


def _forward_impls(record, inputs, outputs, tensors, facts, roofline, readers_after, order, name_of) -> list[ForwardImpl]:
    comp = record.node
    dtype = _main_dtype(_val(comp))
    if record.kind is None:
        return [ForwardImpl("default", _node_cost(comp, roofline))]
    kind, binding = record.kind, record.binding
    matmul = kind.name in MATMUL_KINDS
    flops = _flops(record, roofline)
    in_bytes = sum(tensors[n].nbytes for n in inputs)
    out_bytes = sum(tensors[n].nbytes for n in outputs)
    x_name = record.role_names.get("x")
    extra = tensors[x_name].nbytes if (kind.two_pass_forward and x_name) else 0
    y_val = _val(comp) if isinstance(_val(comp), torch.Tensor) else _val(comp)[0]
    impls = []
    for alt in kind.forward_alts(binding):
        overwrites = None
        if alt.overwrites is not None:
            target = record.role_names.get(alt.overwrites)
            if not _in_place_legal(record, target, outputs, tensors, facts, readers_after, order, binding, alt.overwrites):
                continue
            overwrites = target
        derived = []
        for role in alt.derived:
            tname = f"{record.name}.{role}"
            if tname not in tensors:
                dt, shape = kind.derived_type(role, binding, y_val.dtype, tuple(y_val.shape))
                irdt = ir_dtype(dt)
                tensors[tname] = Tensor(tname, TensorKind.ACTIVATION, shape_bytes(irdt, shape), irdt, tuple(shape))
            record.role_names[role] = tname
            derived.append(tname)
        derived_bytes = sum(tensors[d].nbytes for d in derived)
        time_us = roofline.time_us(flops, in_bytes + out_bytes + derived_bytes + extra, dtype, matmul)
        recompute_time = None
        if alt.cheaper_recompute:
            recompute_time = roofline.time_us(flops, in_bytes + out_bytes, dtype, matmul)
        reads = []
        for role in alt.recompute_reads:
            tname = record.role_names.get(role, f"{record.name}.{role}")
            reads.append(tname)
        impls.append(ForwardImpl(alt.name, time_us, 0, overwrites, tuple(derived), recompute_time, frozenset(reads)))
    return impls


def _in_place_legal(record, target, outputs, tensors, facts, readers_after, order, binding, role) -> bool:
    if target is None or target not in tensors:
        return False
    t = tensors[target]
    if t.kind is not TensorKind.ACTIVATION:
        return False
    arg = binding.inputs.get(role)
    if not isinstance(arg, fx.Node) or facts.owner(arg) is not arg:
        return False  # the op reads a view: writing the whole storage would be wrong
    y = tensors[outputs[0]]
    if (y.dtype, y.shape) != (t.dtype, t.shape):
        return False
    if readers_after.get(target, -1) > order[record.name]:
        return False  # a later forward op still reads the input
    if facts.owner(facts.loss) is arg:
        return False
    return True


# ---------------------------------------------------------------------------------------- backward
def _catalogue_backward(record, fop, grad_reads, joint_reads, tensors, roofline, facts, name_of, requires_grad, need_grad):
    kind, binding = record.kind, record.binding
    binding.attrs["param_roles"] = tuple(
        role for role, arg in binding.inputs.items() if isinstance(arg, fx.Node) and tensors[name_of(arg)].kind is TensorKind.PARAM
    )
    produced_roles = set(record.role_names)
    steps = []
    for step in kind.backward_steps(binding):
        roles = [r for r in step.grads if r in binding.inputs and isinstance(binding.inputs[r], fx.Node) and requires_grad(binding.inputs[r])]
        if roles:
            steps.append((step, roles))
    if not steps:
        record.note = "no input of this op needs a gradient although its output does"
        return None
    # the first alternatives together must read what the captured backward reads; with a
    # single step, whichever alternative does is put first (in-place LeakyReLU keeps its
    # output where the out-of-place one keeps its input)
    wanted = {n for n in joint_reads if not tensors[n].is_fixed}

    def nonfixed(alt):
        return {record.role_names[r] for r in alt.reads if r in record.role_names and not tensors[record.role_names[r]].is_fixed}

    if len(steps) == 1:
        step, roles = steps[0]
        matching = [a for a in step.alts if all(r in record.role_names for r in a.reads) and nonfixed(a) == wanted]
        if matching and matching[0] is not step.alts[0]:
            alts = (matching[0],) + tuple(a for a in step.alts if a is not matching[0])
            steps = [(type(step)(step.name, step.grads, alts), roles)]
    first_reads = set()
    for step, _ in steps:
        first_reads.update(record.role_names[r] for r in step.alts[0].reads if r in record.role_names)
    have = {n for n in first_reads if not tensors[n].is_fixed}
    if wanted != have:
        record.note = (f"catalogue entry {kind.name} would keep {sorted(have)} but autograd keeps {sorted(wanted)};"
                       " described generically")
        record.kind = None
        return None
    extra_fixed = [n for n in joint_reads if tensors[n].is_fixed and n not in first_reads]
    flops_fwd = _flops(record, roofline)
    dtype = _main_dtype(_val(record.node))
    matmul = kind.name in MATMUL_KINDS
    grad_bytes = sum(tensors[g[5:-1]].nbytes for g in grad_reads)
    bops = []
    for i, (step, roles) in enumerate(steps):
        outs = []
        for r in roles:
            g = need_grad(name_of(binding.inputs[r]))
            if g not in outs:
                outs.append(g)
        out_bytes = sum(tensors[g[5:-1]].nbytes for g in outs)
        impls = []
        for j, alt in enumerate(step.alts):
            if not all(r in produced_roles or r in record.role_names for r in alt.reads):
                continue
            reads = [record.role_names[r] for r in alt.reads]
            if i == 0 and j == 0:
                reads += extra_fixed
            read_bytes = sum(tensors[n].nbytes for n in set(reads))
            if kind.name in ("conv", "matmul"):
                flops = flops_fwd
            elif kind.name == "sdpa":
                flops = flops_fwd * (2.5 if alt.name == "flash" else 2.0)
            else:
                flops = 2 * flops_fwd
                if alt.name == "from_input" and kind.name == "max_pool2d":
                    flops += flops_fwd
            time_us = roofline.time_us(flops, read_bytes + grad_bytes + out_bytes, dtype, matmul)
            impls.append(BackwardImpl(alt.name, frozenset(reads + grad_reads), time_us))
        bops.append(BackwardOp(f"{record.name}.{step.name}", tuple(outs), tuple(impls), record.name))
    return bops
