"""IR to canonical .monet text.

The canonical form is what ``monetdsl`` writes and what the spec fingerprint hashes:
two-space indentation, one statement per line, activations declared where their op
produces them, fixed tensors first in order of first use, gradients ``grad(x)`` implicit,
reads and keep lists in a fixed order, times in microseconds and sizes in the largest
binary unit that divides them. Parsing the printed text gives back an equal IR.
"""
from __future__ import annotations

import json
import re

from ..ir import (
    BackwardImpl,
    BackwardOp,
    Constraints,
    ForwardOp,
    Network,
    Schedule,
    Spec,
    Tensor,
    TensorKind,
)
from ..units import format_bytes, format_fraction, format_time_us

__all__ = ["format_network", "format_constraints", "format_spec", "format_schedule", "quote_name", "tensor_order_key"]

KEYWORDS = frozenset(
    "network fixed tensor output op backward impl time workspace overwrites recompute reads accumulates view of grad "
    "constraints memory overhead keep never in schedule for fingerprint forward stage free "
    "input param buffer activation gradient".split()
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\Z")
_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+\Z")
_WRAP = 96


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def quote_name(name: str) -> str:
    """A name as it must be written: bare when it is a plain identifier, else quoted."""
    if _NAME.match(name) and name not in KEYWORDS:
        return name
    return _quote(name)


def _ref(name: str, network: Network | None = None) -> str:
    tensor = network.tensors.get(name) if network is not None else None
    if tensor is not None and tensor.grad_of is not None:
        return f"grad({quote_name(tensor.grad_of)})"
    if tensor is None and name.startswith("grad(") and name.endswith(")"):
        return f"grad({quote_name(name[5:-1])})"
    return quote_name(name)


def tensor_order_key(name: str, network: Network) -> tuple:
    """Canonical order of tensors in lists: gradients first, then by name."""
    tensor = network.tensors.get(name)
    is_grad = tensor is not None and tensor.kind is TensorKind.GRADIENT
    return (0 if is_grad else 1, name)


def _sorted_refs(names, network: Network) -> list[str]:
    return [_ref(n, network) for n in sorted(names, key=lambda n: tensor_order_key(n, network))]


def _type_text(tensor: Tensor) -> str:
    if tensor.dtype is not None and tensor.shape is not None:
        return f"{tensor.dtype}[{','.join(str(d) for d in tensor.shape)}]"
    return format_bytes(tensor.nbytes)


def _decl(tensor: Tensor, network: Network) -> str:
    text = f"{_ref(tensor.name, network)} {_type_text(tensor)}"
    if tensor.view_of is not None:
        text += f" view of {quote_name(tensor.view_of)}"
    return text


def _fixed_tensors_in_order(network: Network) -> list[Tensor]:
    order: dict[str, None] = {}
    for op in network.forward_ops:
        for name in op.inputs:
            if network.tensors[name].is_fixed:
                order.setdefault(name)
    for bop in network.backward_ops:
        for impl in bop.impls:
            for name in sorted(impl.reads):
                if network.tensors[name].is_fixed:
                    order.setdefault(name)
    rest = sorted(n for n, t in network.tensors.items() if t.is_fixed and n not in order)
    names = list(order) + rest
    # a view must follow its base so the printed text declares the base first
    placed: list[str] = []
    pending = list(names)
    while pending:
        progressed = False
        for name in list(pending):
            base = network.tensors[name].view_of
            if base is None or base in placed or not network.tensors[base].is_fixed:
                placed.append(name)
                pending.remove(name)
                progressed = True
        if not progressed:  # pragma: no cover - cycles are refused earlier
            placed.extend(pending)
            break
    return [network.tensors[n] for n in placed]


def _forward_attrs(time_us: float, workspace: int, recompute_time: float | None, recompute_reads, network) -> str:
    text = f" time {format_time_us(time_us)}"
    if workspace:
        text += f" workspace {format_bytes(workspace)}"
    if recompute_time is not None:
        text += f" recompute time {format_time_us(recompute_time)}"
    if recompute_reads:
        text += f" recompute reads ({', '.join(_sorted_refs(recompute_reads, network))})"
    return text


def _forward_op_lines(op: ForwardOp, network: Network, declared: set[str]) -> list[str]:
    outs = []
    for name in op.outputs:
        if name in declared:
            outs.append(_ref(name, network))
        else:
            outs.append(_decl(network.tensors[name], network))
            declared.add(name)
    head = f"  op {quote_name(op.name)} ({', '.join(_ref(i, network) for i in op.inputs)}) -> {', '.join(outs)}"
    single = len(op.impls) == 1 and op.impls[0].name == "default" and op.impls[0].overwrites is None and not op.impls[0].derived
    if single:
        impl = op.impls[0]
        return [head + _forward_attrs(impl.time_us, impl.workspace, impl.recompute_time_us, impl.recompute_reads, network)]
    lines = [head]
    for impl in op.impls:
        text = f"    impl {quote_name(impl.name)}"
        if impl.overwrites is not None:
            text += f" overwrites {quote_name(impl.overwrites)}"
        if impl.derived:
            parts = []
            for name in impl.derived:
                if name in declared:
                    parts.append(_ref(name, network))
                else:
                    parts.append(_decl(network.tensors[name], network))
                    declared.add(name)
            text += f" -> {', '.join(parts)}"
        text += _forward_attrs(impl.time_us, impl.workspace, impl.recompute_time_us, impl.recompute_reads, network)
        lines.append(text)
    return lines


def _backward_op_lines(bop: BackwardOp, network: Network, declared: set[str], nested: bool) -> list[str]:
    indent = "    " if nested else "  "
    name = bop.local_name if nested else bop.name
    common = frozenset.intersection(*(impl.reads for impl in bop.impls))
    outs = []
    for out in bop.outputs:
        tensor = network.tensors[out]
        if tensor.grad_of is not None or out in declared:
            outs.append(_ref(out, network))
        else:
            outs.append(_decl(tensor, network))
            declared.add(out)
    head = f"{indent}backward"
    if not (nested and name == "backward"):
        head += f" {quote_name(name)}"
    single = len(bop.impls) == 1 and bop.impls[0].name == "default"
    reads = bop.impls[0].reads if single else common
    if reads or single:
        head += f" reads ({', '.join(_sorted_refs(reads, network))})"
    head += f" -> {', '.join(outs)}"
    if single:
        impl = bop.impls[0]
        head += f" time {format_time_us(impl.time_us)}"
        if impl.workspace:
            head += f" workspace {format_bytes(impl.workspace)}"
        head += _accumulates(impl, network)
        return [head]
    lines = [head]
    for impl in bop.impls:
        text = f"{indent}  impl {quote_name(impl.name)}"
        extra = impl.reads - common
        if extra:
            text += f" reads ({', '.join(_sorted_refs(extra, network))})"
        text += f" time {format_time_us(impl.time_us)}"
        if impl.workspace:
            text += f" workspace {format_bytes(impl.workspace)}"
        text += _accumulates(impl, network)
        lines.append(text)
    return lines


def _accumulates(impl: BackwardImpl, network: Network) -> str:
    """The in-place attributes of a backward implementation: what it overwrites, accumulates."""
    text = f" overwrites {_ref(impl.overwrites, network)}" if impl.overwrites is not None else ""
    if impl.accumulates:
        text += f" accumulates ({', '.join(_sorted_refs(impl.accumulates, network))})"
    return text


def format_network(network: Network) -> str:
    """Canonical text of a network section."""
    lines = [f"network {quote_name(network.name)}"]
    for item in network.fixed:
        lines.append(f"  fixed {quote_name(item.name)} {format_bytes(item.nbytes)}")
    declared: set[str] = set()
    for tensor in _fixed_tensors_in_order(network):
        text = f"  tensor {quote_name(tensor.name)} {_type_text(tensor)}"
        if tensor.view_of is not None:
            text += f" view of {quote_name(tensor.view_of)}"
        lines.append(f"{text} {tensor.kind.value}")
        declared.add(tensor.name)
    nested: dict[str, list[BackwardOp]] = {}
    top_level: list[BackwardOp] = []
    for bop in network.backward_ops:
        (nested.setdefault(bop.of, []) if bop.of is not None else top_level).append(bop)
    for op in network.forward_ops:
        lines.extend(_forward_op_lines(op, network, declared))
        for bop in nested.get(op.name, ()):
            lines.extend(_backward_op_lines(bop, network, declared, nested=True))
    for bop in top_level:
        lines.extend(_backward_op_lines(bop, network, declared, nested=False))
    if network.outputs:
        lines.append(f"  output {', '.join(quote_name(o) for o in network.outputs)}")
    return "\n".join(lines) + "\n"


def _pattern(text: str) -> str:
    return text if _PATTERN.match(text) and text not in KEYWORDS else _quote(text)


def format_constraints(constraints: Constraints) -> str:
    """Canonical text of a constraints section (empty string when there are none)."""
    if constraints.is_empty():
        return ""
    lines = ["constraints"]
    if constraints.memory_budget is not None:
        lines.append(f"  memory <= {format_bytes(constraints.memory_budget)}")
    if constraints.max_overhead is not None:
        lines.append(f"  overhead <= {format_fraction(constraints.max_overhead)}")
    if constraints.keep:
        lines.append(f"  keep {', '.join(_pattern(p.text) for p in constraints.keep)}")
    if constraints.never_recompute:
        lines.append(f"  never recompute {', '.join(_pattern(p.text) for p in constraints.never_recompute)}")
    for pin in constraints.impls:
        if len(pin.allowed) == 1:
            lines.append(f"  impl {_pattern(pin.pattern.text)} = {quote_name(pin.allowed[0])}")
        else:
            lines.append(f"  impl {_pattern(pin.pattern.text)} in ({', '.join(quote_name(a) for a in pin.allowed)})")
    return "\n".join(lines) + "\n"


def format_spec(spec: Spec) -> str:
    """Canonical text of a whole spec: the network, then its constraints."""
    text = format_network(spec.network)
    constraints = format_constraints(spec.constraints)
    return text + ("\n" + constraints if constraints else "")


def _wrapped(indent: str, keyword: str, items: list[str]) -> list[str]:
    lines: list[str] = []
    current: list[str] = []
    width = len(indent) + len(keyword) + 1
    for item in items:
        if current and width + len(item) + 2 > _WRAP:
            lines.append(f"{indent}{keyword} {', '.join(current)}")
            current, width = [], len(indent) + len(keyword) + 1
        current.append(item)
        width += len(item) + 2
    if current:
        lines.append(f"{indent}{keyword} {', '.join(current)}")
    return lines


def format_schedule(
    schedule: Schedule,
    network: Network | None = None,
    *,
    header: list[str] | tuple[str, ...] = (),
    stage_notes: dict[int, str] | None = None,
) -> str:
    """Canonical text of a schedule. ``header`` lines become leading ``#`` comments;
    ``stage_notes[i]`` is written as a comment after stage ``i``'s line (0 = forward)."""
    notes = stage_notes or {}
    lines = [f"# {h}" if h else "#" for h in header]
    lines.append(f"schedule for {_quote(schedule.spec_path)} fingerprint {schedule.fingerprint}")
    for op in sorted(schedule.impls, key=lambda n: _op_order(n, network)):
        lines.append(f"  impl {quote_name(op)} = {quote_name(schedule.impls[op])}")
    head = "  forward"
    if 0 in notes:
        head += f"  # {notes[0]}"
    lines.append(head)
    lines.extend(_wrapped("    ", "keep", [_ref(n, network) for n in schedule.forward_keep]))
    for i, stage in enumerate(schedule.stages, start=1):
        head = f"  stage {quote_name(stage.backward)}"
        if i in notes:
            head += f"  # {notes[i]}"
        lines.append(head)
        lines.extend(_wrapped("    ", "recompute", [quote_name(n) for n in stage.recompute]))
        lines.extend(_wrapped("    ", "keep", [_ref(n, network) for n in stage.keep]))
        lines.extend(_wrapped("    ", "free", [_ref(n, network) for n in stage.free]))
    return "\n".join(lines) + "\n"


def _op_order(name: str, network: Network | None) -> tuple:
    if network is None:
        return (0, name)
    for i, op in enumerate(network.forward_ops):
        if op.name == name:
            return (0, i)
    for i, op in enumerate(network.backward_ops):
        if op.name == name:
            return (1, i)
    return (2, name)
