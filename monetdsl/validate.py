"""Semantic checks of a spec, and the resolution of its constraints' name patterns.

The parser already refuses unknown names, duplicates and bad units. This module checks
what needs the whole graph: who produces each tensor, forward cycles, gradients that
nothing writes, backward cycles, in-place implementations that can never be legal, and
constraints whose patterns match nothing or contradict each other. Every problem is a
located :class:`~monetdsl.errors.Diagnostic` naming the offending item.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import networkx as nx

from .errors import Diagnostic, SpecError
from .graph import backward_dag, forward_dag, index
from .ir import BackwardImpl, BackwardOp, Constraints, Network, Spec, TensorKind

__all__ = ["ResolvedConstraints", "validate_network", "validate_spec", "resolve_constraints", "match_names", "backward_overwrite_problem"]


class _Report:
    def __init__(self, path: str, source: str):
        self.path = path
        self.lines = source.splitlines()
        self.items: list[Diagnostic] = []

    def __call__(self, message: str, line: int = 0) -> None:
        source_line = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        column = 0
        if source_line is not None:
            column = len(source_line) - len(source_line.lstrip()) + 1
        self.items.append(Diagnostic(message, self.path, line, column, source_line))


def validate_network(network: Network, path: str = "<input>", source: str = "") -> list[Diagnostic]:
    """Every semantic problem of ``network`` (an empty list when it is consistent)."""
    report = _Report(path, source)
    tensors = network.tensors
    idx = index(network)

    # producers ---------------------------------------------------------------------
    produced_by: dict[str, str] = {}
    for op in network.forward_ops:
        for out in op.outputs:
            tensor = tensors[out]
            if tensor.is_fixed:
                report(f"op {op.name} produces {out}, which is a {tensor.kind.value} (fixed memory, never produced)", op.line)
            elif tensor.kind is TensorKind.GRADIENT:
                report(f"op {op.name} produces {out}, which is a gradient; only backward ops produce gradients", op.line)
            if out in produced_by:
                report(f"tensor {out} is produced by both {produced_by[out]} and {op.name}", op.line)
            produced_by[out] = op.name
        if len(set(op.outputs)) != len(op.outputs):
            report(f"op {op.name} lists an output twice", op.line)
    derived_owner: dict[str, str] = {}
    for op in network.forward_ops:
        for impl in op.impls:
            for derived in impl.derived:
                if derived in produced_by:
                    report(f"impl {impl.name} of {op.name} produces {derived}, which {produced_by[derived]} already produces", impl.line)
                owner = derived_owner.setdefault(derived, op.name)
                if owner != op.name:
                    report(f"derived tensor {derived} is produced by implementations of both {owner} and {op.name}", impl.line)
                if tensors[derived].kind is not TensorKind.ACTIVATION:
                    report(f"impl {impl.name} of {op.name} produces {derived}, which is a {tensors[derived].kind.value}", impl.line)
    for name, tensor in tensors.items():
        if tensor.kind is TensorKind.ACTIVATION and name not in produced_by and name not in derived_owner:
            report(f"tensor {name} is an activation but no operator produces it (declare it as an input?)", tensor.line)
        if tensor.view_of is not None and tensors[tensor.view_of].kind is TensorKind.GRADIENT:
            report(f"tensor {name} is a view of the gradient {tensor.view_of}; views of gradients are not modelled", tensor.line)

    # forward ops ---------------------------------------------------------------------
    for op in network.forward_ops:
        for name in op.inputs:
            kind = tensors[name].kind
            if kind is TensorKind.GRADIENT:
                report(f"forward op {op.name} reads the gradient {name}", op.line)
            elif name in derived_owner:
                report(
                    f"forward op {op.name} reads {name}, which only some implementations of {derived_owner[name]} produce",
                    op.line,
                )
        for out in op.outputs:
            base = tensors[out].view_of
            if base is not None and base not in op.inputs and not _is_view_chain_of(network, base, op.inputs):
                report(f"op {op.name} outputs {out} as a view of {base}, which is not one of its inputs", op.line)
        for impl in op.impls:
            for name in impl.recompute_reads:
                if tensors[name].kind is TensorKind.GRADIENT:
                    report(f"recomputing {op.name} cannot read the gradient {name}", impl.line)
                elif derived_owner.get(name) == op.name and name not in impl.derived:
                    report(f"impl {impl.name} of {op.name} recomputes from {name}, which it does not produce", impl.line)
            if impl.overwrites is not None:
                _check_in_place(network, idx, op, impl, report)
    dag = forward_dag(network)
    if not nx.is_directed_acyclic_graph(dag):
        cycle = nx.find_cycle(dag)
        names = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        first = min((idx.forward_ops[u].line for u, _ in cycle), default=0)
        report(f"the forward ops form a cycle: {names}", first)

    # backward ops ----------------------------------------------------------------------
    writers = idx.gradient_writers
    seeds = set(idx.seeds())
    for bop in network.backward_ops:
        if bop.of is not None and bop.of not in idx.forward_ops:  # pragma: no cover - parser attaches
            report(f"backward op {bop.name} belongs to unknown op {bop.of}", bop.line)
        for out in bop.outputs:
            if tensors[out].kind is not TensorKind.GRADIENT:
                report(f"backward op {bop.name} outputs {out}, which is not a gradient", bop.line)
        for impl in bop.impls:
            if impl.overwrites is not None:
                problem = backward_overwrite_problem(network, bop, impl)
                if problem is not None:
                    report(f"backward op {bop.name} impl {impl.name} overwrites {impl.overwrites}: {problem}", impl.line or bop.line)
            for name in sorted(impl.accumulates):
                of = tensors[name].grad_of if name in tensors else None
                if of is None or not tensors[of].is_fixed:
                    report(f"backward op {bop.name} impl {impl.name} accumulates {name}: only a gradient of a param,"
                           " input or buffer (resident memory) can be accumulated in place", impl.line or bop.line)
            for name in sorted(impl.reads):
                tensor = tensors[name]
                if name in bop.outputs:
                    report(f"backward op {bop.name} both reads and writes {name}", impl.line or bop.line)
                    continue
                if tensor.grad_of is not None and tensors[tensor.grad_of].is_fixed:
                    report(
                        f"backward op {bop.name} reads {name}: gradients of {tensors[tensor.grad_of].kind.value}s go to"
                        " fixed memory and are not read in the backward pass",
                        impl.line or bop.line,
                    )
                    continue
                if tensor.kind is TensorKind.GRADIENT:
                    if name not in writers and name not in seeds:
                        hint = ""
                        if tensor.grad_of is not None:
                            hint = f" (no backward op writes it and {tensor.grad_of} is not an output)"
                        report(f"backward op {bop.name} reads {name}, which nothing produces{hint}", impl.line or bop.line)
                    elif writers.get(name) == (bop.name,) and name not in seeds:
                        report(f"backward op {bop.name} reads {name}, which only it produces", impl.line or bop.line)
    for bop in network.backward_ops:
        for impl in bop.impls:
            needs: dict[str, list[str]] = {}
            for name in sorted(impl.reads):
                if name in idx.derived_by:
                    needs.setdefault(idx.derived_by[name][0], []).append(name)
            for owner, names in needs.items():
                common = set.intersection(*(set(idx.derived_by[n][1]) for n in names))
                if not common:
                    report(
                        f"impl {impl.name} of backward op {bop.name} reads {', '.join(names)}, which no single"
                        f" implementation of {owner} produces together",
                        impl.line or bop.line,
                    )
    _check_derived_demands(network, idx, report)
    bdag = backward_dag(network)
    if not nx.is_directed_acyclic_graph(bdag):
        cycle = nx.find_cycle(bdag)
        names = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        report(f"the backward ops form a cycle through their gradients: {names}", idx.backward_ops[cycle[0][0]].line)

    # outputs -----------------------------------------------------------------------------
    for name in network.outputs:
        if name not in produced_by:
            report(f"output {name} is not produced by a forward op", tensors[name].line)
    return report.items


def _check_derived_demands(network: Network, idx, report) -> None:
    """Every backward op must be able to find its derived tensors under one choice per op.

    For each op that produces derived tensors, intersect over the backward ops that need
    some of them the implementations that would satisfy that backward op.
    """
    demands: dict[str, dict[str, set[str]]] = {}  # owner -> backward op -> allowed owner impls
    for bop in network.backward_ops:
        per_owner: dict[str, set[str]] = {}
        free_of: set[str] = set()  # owners some impl of this op does not need
        touched = {idx.derived_by[r][0] for impl in bop.impls for r in impl.reads if r in idx.derived_by}
        for impl in bop.impls:
            for owner in touched:
                producers = [set(idx.derived_by[r][1]) for r in impl.reads if r in idx.derived_by and idx.derived_by[r][0] == owner]
                if producers:
                    per_owner.setdefault(owner, set()).update(set.intersection(*producers))
                else:
                    free_of.add(owner)
        for owner, allowed in per_owner.items():
            if owner not in free_of:
                demands.setdefault(owner, {})[bop.name] = allowed
    for owner, by_op in sorted(demands.items()):
        possible = set(idx.forward_ops[owner].impl_names)
        for allowed in by_op.values():
            possible &= allowed
        if not possible:
            names = list(by_op)[:3]
            report(f"no implementation of {owner} produces the derived tensors that {' and '.join(names)} need", idx.forward_ops[owner].line)


def _is_view_chain_of(network: Network, base: str, inputs: tuple[str, ...]) -> bool:
    tensors = network.tensors
    seen = set()
    while base is not None and base not in seen:
        if base in inputs:
            return True
        seen.add(base)
        base = tensors[base].view_of
    return False


def _check_in_place(network: Network, idx, op, impl, report) -> None:
    tensors = network.tensors
    target = impl.overwrites
    where = f"impl {impl.name} of {op.name} overwrites {target}"
    if target not in op.inputs:
        report(f"{where}, which is not one of its inputs {op.inputs}", impl.line)
        return
    tensor = tensors[target]
    if tensor.kind is not TensorKind.ACTIVATION:
        report(f"{where}, which is a {tensor.kind.value}; only activations may be overwritten", impl.line)
        return
    if tensor.view_of is not None:
        report(f"{where}, which is a view; overwrite the tensor that owns the storage instead", impl.line)
    if target in network.outputs:
        report(f"{where}, which is a network output", impl.line)
    out = tensors[op.outputs[0]]
    if out.view_of is not None:
        report(f"{where} but its first output {out.name} is a view", impl.line)
    elif out.nbytes > tensor.storage_bytes:
        report(
            f"{where} but its output {out.name} ({out.nbytes} bytes) does not fit in {target} ({tensor.storage_bytes} bytes)",
            impl.line,
        )
    later = [r for r in idx.forward_readers.get(target, ()) if r != op.name and idx.position.get(r, -1) > idx.position.get(op.name, -1)]
    if later:
        report(f"{where}, which {later[0]} reads later in the forward pass; this implementation can never run", impl.line)


def backward_overwrite_problem(network: Network, bop: BackwardOp, impl: BackwardImpl) -> str | None:
    """Why backward implementation ``impl`` of ``bop`` may not write its output over the
    gradient it ``overwrites`` (None when it may). The memory model counts such a step as
    allocating nothing for that output and the gradient as gone after it, which is exact
    only when the step is the gradient's last reader in the fixed backward order, the two
    storages have the same size, and nothing else writes the output (a second writer
    would add into storage the step has taken)."""
    tensors, idx = network.tensors, index(network)
    target = impl.overwrites
    if target not in impl.reads:
        return "it does not read it"
    tensor = tensors[target]
    if tensor.kind is not TensorKind.GRADIENT or tensor.view_of is not None:
        return "only a gradient that owns its storage can be overwritten"
    if target in idx.seeds():
        return "it is the gradient of a network output, which the caller holds to the end"
    out_name = bop.overwriting_output(impl)
    if out_name is None:
        return "the op has no output that is not accumulated"
    out = tensors[out_name]
    if out.view_of is not None or (out.grad_of is not None and tensors[out.grad_of].is_fixed):
        return f"its output {out_name} is a parameter gradient or a view"
    if out.storage_bytes != tensor.storage_bytes:
        return f"its output {out_name} ({out.storage_bytes} B) and {target} ({tensor.storage_bytes} B) differ in size"
    if tuple(idx.gradient_writers.get(out_name, ())) != (bop.name,) or out_name in idx.seeds():
        return f"{out_name} has other writers (or is a seed), which add into it"
    order = idx.backward_order
    later = order[order.index(bop.name) + 1:] if bop.name in order else ()
    for name in later:
        if any(target in other.reads for other in idx.backward_ops[name].impls):
            return f"{name} reads it later"
    return None


def validate_spec(spec: Spec) -> None:
    """Raise :class:`SpecError` with every problem of the network and its constraints."""
    problems = validate_network(spec.network, spec.path, spec.source)
    if not problems:
        try:
            resolve_constraints(spec.network, spec.constraints, path=spec.path, source=spec.source)
        except SpecError as exc:
            problems = exc.diagnostics
    if problems:
        raise SpecError(problems)


# --------------------------------------------------------------------------- constraints
@dataclass(frozen=True)
class ResolvedConstraints:
    """Constraints with patterns expanded to concrete names.

    ``allowed_impls`` lists, for every op with a pin, the implementations it may use;
    ops without a pin are absent (all implementations allowed).
    """

    memory_budget: int | None
    max_overhead: float | None
    keep: frozenset[str]
    never_recompute: frozenset[str]
    allowed_impls: dict[str, tuple[str, ...]]

    def impls_for(self, op) -> tuple[str, ...]:
        return self.allowed_impls.get(op.name, op.impl_names)


def match_names(pattern: str, names) -> list[str]:
    """Names matching a shell-style glob (``*``, ``?``, ``[...]``), case-sensitively."""
    if not any(ch in pattern for ch in "*?["):
        return [pattern] if pattern in names else []
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def resolve_constraints(
    network: Network,
    constraints: Constraints,
    *,
    memory_budget: int | None = None,
    max_overhead: float | None = None,
    path: str = "<input>",
    source: str = "",
) -> ResolvedConstraints:
    """Expand patterns; raise :class:`SpecError` for patterns that match nothing or conflict.

    ``memory_budget`` and ``max_overhead`` override the spec's values (command-line flags).
    """
    report = _Report(path, source)
    idx = index(network)
    forward_tensors = [n for n in network.tensors if idx.is_forward_tensor(n)]
    keep: set[str] = set()
    for pattern in constraints.keep:
        matched = match_names(pattern.text, forward_tensors)
        if not matched:
            kind = network.tensors[pattern.text].kind.value if pattern.text in network.tensors else None
            extra = f" ({pattern.text} is a {kind}, which is always resident)" if kind and kind != "activation" else ""
            report(f"keep {pattern.text}: no forward tensor matches{extra}", pattern.line)
        keep.update(matched)
    never: set[str] = set()
    for pattern in constraints.never_recompute:
        matched = match_names(pattern.text, list(idx.forward_ops))
        if not matched:
            report(f"never recompute {pattern.text}: no forward op matches", pattern.line)
        never.update(matched)
    allowed: dict[str, tuple[str, ...]] = {}
    all_ops = {**idx.forward_ops, **idx.backward_ops}
    for pin in constraints.impls:
        matched = match_names(pin.pattern.text, list(all_ops))
        if not matched:
            report(f"impl {pin.pattern.text}: no operator matches", pin.pattern.line)
            continue
        known = set()
        is_glob = any(ch in pin.pattern.text for ch in "*?[")
        for name in matched:
            op = all_ops[name]
            known.update(op.impl_names)
            if is_glob and not any(i in pin.allowed for i in op.impl_names):
                continue  # a glob pins only the matched ops that have one of the named impls
            usable = tuple(i for i in op.impl_names if i in pin.allowed and i in allowed.get(name, op.impl_names))
            if not usable:
                wanted = pin.allowed[0] if len(pin.allowed) == 1 else f"any of ({', '.join(pin.allowed)})"
                report(
                    f"impl {pin.pattern.text}: op {name} has no implementation {wanted}; it has {', '.join(op.impl_names)}",
                    pin.pattern.line,
                )
                continue
            allowed[name] = usable
        unknown = [a for a in pin.allowed if a not in known]
        if unknown and is_glob:
            report(f"impl {pin.pattern.text}: no matching operator has an implementation called {unknown[0]}", pin.pattern.line)
        elif unknown and name in allowed:  # a misspelt name beside a real one would pass unnoticed
            report(f"impl {pin.pattern.text}: op {name} has no implementation {unknown[0]}; it has {', '.join(all_ops[name].impl_names)}",
                   pin.pattern.line)
    # keep vs. implementations that destroy or never produce the kept tensor
    for name in sorted(keep):
        if name in idx.derived_by:
            owner, impls = idx.derived_by[name]
            usable = allowed.get(owner, idx.forward_ops[owner].impl_names)
            if not any(i in impls for i in usable):
                report(f"keep {name}: only implementations {', '.join(impls)} of {owner} produce it, and none is allowed", _line_of(constraints.keep, name))
        for reader in idx.forward_readers.get(name, ()):
            op = idx.forward_ops[reader]
            usable = allowed.get(reader, op.impl_names)
            if all(op.impl(i).overwrites == name for i in usable):
                report(
                    f"keep {name} conflicts with op {reader}: every implementation it may use ({', '.join(usable)}) overwrites {name}",
                    _line_of(constraints.keep, name),
                )
    budget = memory_budget if memory_budget is not None else constraints.memory_budget
    overhead = max_overhead if max_overhead is not None else constraints.max_overhead
    if report.items:
        raise SpecError(report.items)
    return ResolvedConstraints(budget, overhead, frozenset(keep), frozenset(never), allowed)


def _line_of(patterns, name: str) -> int:
    for pattern in patterns:
        if match_names(pattern.text, [name]):
            return pattern.line
    return 0
