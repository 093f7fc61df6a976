"""Lowering: every op of a traced spec, with its chosen implementation, as a callable step.

A :class:`StepFn` reads IR tensors (by name, in ``reads`` order) and returns the IR
tensors it writes (in ``writes`` order); the executor only moves names and values.
Forward ops get two steps, the first forward and the recomputation (which reads the
implementation's ``recompute reads`` and reproduces the first forward exactly); every
backward op gets one.

Arguments are rebuilt from their storage owners (:class:`~monetdsl.lowering.graphs.ArgPath`),
so only owners are ever held. Gradients come out per owner: a step computes gradients of
its arguments, then the backward of the alias calls turns them into the owners'.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ..catalogue.base import GradTarget
from ..ir import Network, TensorKind, grad_name
from ..slicing import is_segment
from ..tracing.joint import tensor_args
from ..tracing.to_ir import OpRecord
from .alternatives import ADOPTING, AUTOGRAD_FORWARDS, RECOMPUTE, OpContext, backward_function, forward_function
from .autograd_saves import saves_key, saves_only
from .graphs import ArgPath, LoweringError, arg_path, example_of, is_part_scatter, local_backward, owner_adapter, run_group
from .step_source import StepSource

__all__ = ["StepFn", "DirectCall", "GradTarget", "AccumulatedGrad", "Program", "lower", "first_forward_step"]


@dataclass(frozen=True)
class DirectCall:
    """A forward step that is one captured call, spelled out so a pass's generated code
    can write the call itself (:mod:`monetdsl.runtime.forward_code`) instead of calling
    the step: ``target`` (the captured callable: an aten overload), its positional and keyword
    arguments as templates (leaves: ``ArgPath`` for a tensor argument, anything else a
    constant; lists and tuples nest), and per write the item of the result it is
    (``None``: the result itself)."""

    target: Callable
    args: tuple
    kwargs: dict
    picks: tuple


@dataclass(frozen=True)
class AccumulatedGrad:
    """A gradient a step adds into in place: the layout of its owner (``like``, a traced
    example) and whether the step writes every element (``covers``: then a fresh
    ``.grad`` need not be zeroed first)."""

    like: torch.Tensor
    covers: bool


@dataclass
class StepFn:
    """One executable step: ``fn(*values of reads) -> tuple of values of writes``.

    ``overwrites`` names the input a forward step writes its first output into (in place).
    A backward step with ``accumulates`` (gradient name -> :class:`AccumulatedGrad`) is
    called ``fn(*values, into={name: GradTarget})`` and returns ``None`` for those
    gradients: it has added them into the targets (without ``into`` it adds into zeroed
    scratch tensors of its own, so a profiler can run it like any other step). With
    ``adopts`` it also takes targets to adopt (no tensor: the gradient is handed over whole).
    """

    op: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    fn: Callable
    overwrites: str | None = None
    accumulates: dict = field(default_factory=dict)
    adopts: bool = False
    #: a forward step that, run with grad enabled, records PyTorch's own backward for the
    #: op, saving only what the op's chosen backward implementations read
    #: (:mod:`.autograd_saves`): it may run in a stretch under autograd
    records_autograd: bool = False
    #: the step as one call with its arguments' paths (a forward step that is a single
    #: captured call), for code that writes the call inline; ``fn`` does the same
    direct: DirectCall | None = None
    #: a backward step that makes an owner's gradient from one part of it by writing into
    #: zeros (:func:`~.graphs.owner_adapter`, one time step of a recurrent layer's input
    #: projection): gradient name -> (the owner's bytes, the part's bytes). Autograd's
    #: engine forms such a gradient otherwise (:mod:`monetdsl.runtime.stretches`)
    part_gradients: dict = field(default_factory=dict)

    def scratch_targets(self, device) -> dict[str, GradTarget]:
        """Zeroed stand-ins for the gradients the step adds into (timing, workspace probes)."""
        return {g: GradTarget(torch.empty_strided(tuple(a.like.shape), tuple(a.like.stride()), dtype=a.like.dtype, device=device).zero_())
                for g, a in self.accumulates.items()}

    def with_scratch_targets(self, device) -> Callable:
        """``fn`` as a plain step (values in, writes out) adding into scratch targets made
        now: what a profiler or a workspace probe runs."""
        if not self.accumulates:
            return self.fn
        scratch = self.scratch_targets(device)
        return lambda *values: self.fn(*values, into=scratch)


@dataclass
class Program:
    """The lowered network: first-forward, recompute and backward steps by op name."""

    network: Network
    forward: dict[str, StepFn] = field(default_factory=dict)
    recompute: dict[str, StepFn] = field(default_factory=dict)
    backward: dict[str, StepFn] = field(default_factory=dict)
    output_paths: dict[str, ArgPath] = field(default_factory=dict)
    #: (shape, dtype) of every tensor as traced, by name (zeros for a gradient nothing reached)
    layouts: dict[str, tuple] = field(default_factory=dict)


class _OpLowering:
    """Shared facts about one traced op: its calls, argument paths and output names."""

    def __init__(self, record: OpRecord, facts, value_names: dict, network: Network):
        self.record = record
        self.facts = facts
        self.network = network
        group = facts.fused.get(record.node)
        self.members = list(group.members) if group is not None else [record.node]
        self.arg_nodes = _distinct(facts.inputs_of(record.node) if group is not None else tensor_args(record.node))
        self.paths = [arg_path(facts, value_names, n) for n in self.arg_nodes]
        self.arg_index = {n: i for i, n in enumerate(self.arg_nodes)}
        out_map = facts.outputs[record.node]
        self.out_nodes = [v for v in out_map.values() if v in value_names]
        self.out_names = [value_names[v] for v in self.out_nodes]
        kind, binding = record.kind, record.binding
        self.kind = kind
        self.attrs = binding.attrs if binding is not None else {}
        # role -> name and output roles of catalogue ops
        self.role_names = dict(record.role_names)
        self.out_role: dict[int, str] = {}
        if kind is not None:
            by_index = {idx: role for role, idx in binding.outputs.items()}
            for k, (idx, v) in enumerate((i, v) for i, v in out_map.items() if v in value_names):
                role = by_index.get(idx, "y" if idx is None else None)
                if role is not None:
                    self.out_role[k] = role

    # -- forward --------------------------------------------------------------------------
    def call(self, args: list) -> list:
        """Run the captured call(s) on argument values; returns the named outputs in order."""
        return run_group(self.members, self.arg_nodes, args, self.out_nodes, owner=self.record.name)

    def compiled_call(self) -> Callable[[list], list]:
        """:meth:`call` without per-call interpretation: the argument template of a single
        captured call is built once (groups of several calls use :meth:`call`)."""
        if len(self.members) != 1:
            return self.call
        node = self.members[0]
        position = self.arg_index
        target = node.target

        def getter(a):
            if isinstance(a, fx.Node):
                i = position[a]
                return lambda args: args[i]
            if isinstance(a, (list, tuple)) and any(isinstance(b, fx.Node) for b in a):
                parts = [getter(b) for b in a]
                kind = type(a)
                return lambda args: kind(g(args) for g in parts)
            return lambda args, a=a: a

        arg_getters = [getter(a) for a in node.args]
        kw_getters = {k: getter(v) for k, v in node.kwargs.items()}
        picks = []
        for v in self.out_nodes:
            if v is node:
                picks.append(None)
            elif v.target is operator.getitem and v.args[0] is node:
                picks.append(v.args[1])
            else:
                return self.call

        def run(args):
            result = target(*[g(args) for g in arg_getters], **{k: g(args) for k, g in kw_getters.items()})
            return [result if k is None else result[k] for k in picks]

        return run

    def direct_forward(self, reads: tuple[str, ...], writes: tuple[str, ...]) -> Callable | None:
        """The step ``values of reads -> values of writes`` as one generated call
        (:mod:`.step_source`); None for a group of several calls or outputs that are not
        the call's result or its items (:meth:`call` runs those)."""
        if len(self.members) != 1:
            return None
        node = self.members[0]
        source = StepSource(reads)
        picks = []
        for w in writes:
            out = self.out_nodes[self.out_names.index(w)]
            if out is node:
                picks.append(None)
            elif out.target is operator.getitem and out.args[0] is node and isinstance(out.args[1], int):
                picks.append(out.args[1])
            else:
                return None
        args = [source.param(p.owner) if p.is_identity else f"{source.const(p.materialize, 'path')}({source.param(p.owner)})"
                for p in self.paths]

        def expression(a) -> str:
            if isinstance(a, fx.Node):
                return args[self.arg_index[a]]
            if isinstance(a, (list, tuple)) and any(isinstance(b, fx.Node) for b in a):
                inner = "".join(expression(b) + ", " for b in a)
                return f"[{inner}]" if isinstance(a, list) else f"({inner})"
            return source.const(a)

        try:
            call = source.call(node.target, [expression(a) for a in node.args], {k: expression(v) for k, v in node.kwargs.items()})
        except ValueError:  # keywords that cannot be written as Python: the interpreted call runs it
            return None
        source.assign("r", call)
        fn = source.build(["r" if k is None else f"r[{k}]" for k in picks], self.record.name)

        def template(a):
            if isinstance(a, fx.Node):
                return self.paths[self.arg_index[a]]
            if isinstance(a, (list, tuple)) and any(isinstance(b, fx.Node) for b in a):
                return type(a)(template(b) for b in a)
            return a

        fn.direct = DirectCall(node.target, tuple(template(a) for a in node.args),
                               {k: template(v) for k, v in node.kwargs.items()},
                               tuple(picks))
        return fn

    def outputs_by_role(self, outs: list) -> dict:
        return {self.out_role[k]: v for k, v in enumerate(outs) if k in self.out_role}


def _distinct(nodes) -> list:
    seen, out = set(), []
    for n in nodes:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out


def value_nodes(built) -> dict | None:
    """IR tensor name -> the joint-graph node holding its value, for a
    :class:`~monetdsl.tracing.to_ir.BuiltNetwork`; ``None`` when the trace carries no joint
    graph (nothing can be run then)."""
    if built.facts is None:
        return None
    return {name: node for node, name in built.value_names.items()}


def lower(trace, network: Network, impls: dict[str, str], autograd_verdicts: dict[str, bool] | None = None) -> Program:
    """Lower every op of ``trace`` (a :class:`~monetdsl.tracing.TraceResult` whose network
    is ``network``, possibly with the loss stripped) with implementations ``impls``.

    ``autograd_verdicts``: :func:`.autograd_saves.saves_only`'s verdicts by
    :func:`.autograd_saves.saves_key`, read from a previous process; those found are used
    instead of running the check, and the new ones are added to it.

    A batch-sliced segment op (:func:`monetdsl.slicing.is_segment`) has no record of its
    own: it is left out here and lowered from its member ops by the runtime
    (:mod:`monetdsl.runtime.segment_steps`)."""
    facts, value_names = trace.built.facts, trace.built.value_names
    if facts is None:
        raise LoweringError("this trace does not carry its joint graph; trace the model again")
    program = Program(network)
    lowerings = {}
    for record in trace.built.records:
        if not network.has_op(record.name):
            continue  # the loss, when the caller computes its own
        op = network.op(record.name)
        low = _OpLowering(record, facts, value_names, network)
        lowerings[record.name] = low
        impl = op.impl(impls.get(op.name, op.impls[0].name))
        program.forward[op.name] = _forward_step(low, op, impl, recompute=False)
        program.recompute[op.name] = _forward_step(low, op, impl, recompute=True)
    for bop in network.backward_ops:
        if bop.of not in lowerings and is_segment(network.op(bop.of)):
            continue
        low = lowerings[bop.of]
        impl = bop.impl(impls.get(bop.name, bop.impls[0].name))
        try:
            program.backward[bop.name] = _backward_step(low, bop, impl, first=impl.name == bop.impls[0].name)
        except LoweringError as exc:
            if str(exc).startswith(bop.name):
                raise
            raise LoweringError(f"{bop.name} ({impl.name}): {exc}") from None
    node_of = value_nodes(trace.built)
    program.layouts = {name: (tuple(v.shape), v.dtype) for name, node in node_of.items()
                       if isinstance(v := node.meta.get("val"), torch.Tensor)}
    _mark_autograd_steps(program, lowerings, impls, node_of, autograd_verdicts)
    return program


def first_forward_step(trace, network: Network, name: str, sliced_input: str | None = None) -> StepFn | None:
    """The first-forward step of op ``name`` of ``network`` (the traced ops one by one)
    with its first implementation (PyTorch's): what a batch-sliced segment runs for each
    member op, slice by slice. None when the trace has no record of it, when that
    implementation is a function of the runtime's own that does not record autograd's
    backward, or when the op reads ``sliced_input`` through a view (a view's arguments
    may name the whole batch's shape, which a slice does not have)."""
    record = next((r for r in trace.built.records if r.name == name), None)
    if record is None or trace.built.facts is None:
        return None
    op = network.op(name)
    low = _OpLowering(record, trace.built.facts, trace.built.value_names, network)
    if any(p.owner == sliced_input and not p.is_identity for p in low.paths):
        return None
    kind = low.kind.name if low.kind is not None else None
    if kind is not None and forward_function(kind, op.impls[0].name) is not None \
            and (kind, op.impls[0].name) not in AUTOGRAD_FORWARDS:
        return None
    return _forward_step(low, op, op.impls[0], recompute=False)


def _mark_autograd_steps(program: Program, lowerings: dict, impls: dict[str, str], node_of: dict,
                         verdicts: dict[str, bool] | None = None) -> None:
    """Set :attr:`StepFn.records_autograd` on the first-forward steps whose op runs PyTorch's
    own implementation forward and backward and whose autograd graph saves only what
    those backward implementations read (:func:`.autograd_saves.saves_only`)."""
    network = program.network
    tensors = network.tensors
    backward_of: dict[str, list] = {}
    for bop in network.backward_ops:
        backward_of.setdefault(bop.of, []).append(bop)
    for op in network.forward_ops:
        step, bops = program.forward.get(op.name), backward_of.get(op.name)
        if step is None or not bops or step.overwrites is not None:
            continue
        low = lowerings[op.name]
        impl = impls.get(op.name, op.impls[0].name)
        if impl != op.impls[0].name or any(impls.get(b.name, b.impls[0].name) != b.impls[0].name for b in bops):
            continue
        chosen = [b.impl(b.impls[0].name) for b in bops]
        allowed = {n for i in chosen for n in i.reads if tensors[n].kind is not TensorKind.GRADIENT}
        if low.kind is not None and forward_function(low.kind.name, impl) is not None \
                and (low.kind.name, impl) not in AUTOGRAD_FORWARDS:
            continue
        allowed |= {n for n in step.reads if tensors[n].is_fixed}
        grads = {n for b in bops for n in b.outputs}
        wanted = [n for n in step.reads if grad_name(n) in grads]
        examples = {n: example_of(node_of[n]) for n in step.reads}
        if verdicts is None:
            step.records_autograd = saves_only(step.fn, step.reads, step.writes, examples, wanted, allowed)
            continue
        key = saves_key(map(_call_text, low.members), step.reads, step.writes, examples, wanted, allowed)
        if key not in verdicts:
            verdicts[key] = saves_only(step.fn, step.reads, step.writes, examples, wanted, allowed)
        step.records_autograd = verdicts[key]


def _call_text(node) -> str:
    """A member call as text: its target and constant arguments (values as ``%``)."""
    if not isinstance(node, fx.Node):
        return repr(node)
    constants = fx.map_arg((node.args, node.kwargs), lambda _: "%")
    return f"{node.target}{constants!r}"


# ------------------------------------------------------------------------------ forward steps
def _forward_step(low: _OpLowering, op, impl, *, recompute: bool) -> StepFn:
    writes = tuple(op.outputs) + tuple(impl.derived)
    reads = tuple(op.inputs) + (tuple(sorted(impl.recompute_reads)) if recompute else ())
    kind = low.kind.name if low.kind is not None else None
    special = forward_function(kind, impl.name) if kind else None
    names_by_role = low.role_names
    if special is None and kind is not None and impl.name != op.impls[0].name and impl.derived:
        raise LoweringError(f"{op.name}: the runtime has no implementation of {kind} alternative {impl.name}")
    saved_roles = {}
    if recompute and kind is not None:
        role_of = {n: r for r, n in names_by_role.items()}
        saved_roles = {role_of[n]: n for n in impl.recompute_reads if n in role_of}
    use_saved = recompute and (kind, impl.name) in RECOMPUTE

    direct = low.direct_forward(reads, writes) if special is None else None
    if direct is not None:
        fn = direct
    elif special is None:
        call = low.compiled_call()
        getters = _arg_getters(low.paths, reads)
        picks = [low.out_names.index(w) for w in writes]

        def fn(*values):
            outs = call([g(values) for g in getters])
            return tuple(outs[k] for k in picks)
    else:
        # positions decided once: argument getters, each input role's argument, each saved role's read
        arg_getters = _arg_getters(low.paths, reads)
        role_args = [(role, low.arg_index[node]) for role, node in low.record.binding.inputs.items() if isinstance(node, fx.Node)]
        saved_reads = [(role, reads.index(name)) for role, name in saved_roles.items()] if use_saved else None

        def fn(*values):
            args = [g(values) for g in arg_getters]
            ctx = OpContext(kind, low.attrs, {role: args[i] for role, i in role_args}, lambda: low.outputs_by_role(low.call(args)))
            saved = {role: values[i] for role, i in saved_reads} if saved_reads is not None else None
            outs = special(ctx, saved)
            by_name = {names_by_role[role]: value for role, value in outs.items() if role in names_by_role}
            return tuple(by_name[w] for w in writes)

    return StepFn(op.name, reads, writes, fn, impl.overwrites, direct=getattr(direct, "direct", None))


def _arg_getters(paths, reads) -> list[Callable]:
    """For each argument path: a function of the step's read values (in ``reads`` order)
    that rebuilds the argument from its owner."""
    getters = []
    for path in paths:
        i = reads.index(path.owner)
        if path.is_identity:
            getters.append(lambda values, i=i: values[i])
        else:
            getters.append(lambda values, i=i, path=path: path.materialize(values[i]))
    return getters


# ----------------------------------------------------------------------------- backward steps
def _wanted_args(low: _OpLowering, bop) -> list[int]:
    """Argument positions whose gradient this backward op computes."""
    outputs = set(bop.outputs)
    if low.kind is None:
        return [i for i, p in enumerate(low.paths) if grad_name(p.owner) in outputs]
    step_name = bop.local_name
    steps = {s.name: s for s in low.kind.backward_steps(low.record.binding)}
    if step_name not in steps:
        raise LoweringError(f"{bop.name}: {low.kind.name} has no backward step {step_name}")
    nodes = [low.record.binding.inputs[r] for r in steps[step_name].grads if isinstance(low.record.binding.inputs.get(r), fx.Node)]
    wanted = _distinct(i for i in (low.arg_index[n] for n in nodes) if grad_name(low.paths[i].owner) in outputs)
    for other in steps.values():
        if other.name == step_name:
            continue
        shared = {low.arg_index[low.record.binding.inputs[r]] for r in other.grads if isinstance(low.record.binding.inputs.get(r), fx.Node)}
        if shared & set(wanted):
            raise LoweringError(f"{bop.name}: one tensor feeds operands whose gradients are separate backward steps")
    return wanted


def _adapters(low: _OpLowering, bop, wanted: list[int]) -> list[tuple[str, list[int], Callable | None]]:
    """For each gradient the op writes: the wanted argument positions of that owner and
    the adapter from their gradients to the owner's."""
    result = []
    for g in bop.outputs:
        positions = [i for i in wanted if grad_name(low.paths[i].owner) == g]
        if not positions:
            raise LoweringError(f"{bop.name} writes {g}, but none of its arguments is that tensor or a view of it")
        owner_node = _owner_node(low, positions[0])
        adapter = owner_adapter(example_of(owner_node), [low.paths[i] for i in positions])
        result.append((g, positions, adapter))
    return result


def _owner_node(low: _OpLowering, position: int) -> fx.Node:
    return low.facts.owner(low.arg_nodes[position])


def _backward_step(low: _OpLowering, bop, impl, *, first: bool) -> StepFn:
    reads = tuple(sorted(impl.reads))
    writes = tuple(bop.outputs)
    wanted = _wanted_args(low, bop)
    adapters = _adapters(low, bop, wanted)
    grad_outs = [k for k, name in enumerate(low.out_names) if grad_name(name) in impl.reads]
    kind = low.kind.name if low.kind is not None else None
    custom = backward_function(kind, impl.name, first) if kind is not None else None
    tensors = low.network.tensors
    allowed = set(impl.reads)
    if custom is None:
        if not first:
            raise LoweringError(f"{bop.name}: the runtime has no implementation of backward alternative {impl.name}")
        if impl.accumulates:
            raise LoweringError(f"{bop.name} ({impl.name}): PyTorch's own backward returns its gradients; it cannot"
                                f" accumulate {sorted(impl.accumulates)} in place")
        resident = [i for i, p in enumerate(low.paths) if tensors[p.owner].is_fixed]
        local = local_backward(low.members, low.arg_nodes, low.out_nodes, wanted, grad_outs, resident)
        arg_reads = [low.paths[i] for i in local.args_read]
        out_reads = [low.out_names[k] for k in local.outputs_read]
        grad_reads = [grad_name(low.out_names[k]) for k in grad_outs]
        for name in [p.owner for p in arg_reads] + out_reads:
            if name not in allowed and not tensors[name].is_fixed:
                raise LoweringError(f"{bop.name} ({impl.name}): PyTorch's backward reads {name}, which the spec's"
                                    f" implementation does not list")
        position = {w: j for j, w in enumerate(wanted)}
        reads = reads + tuple(sorted({p.owner for p in arg_reads if p.owner not in allowed}))
        plans = [([position[i] for i in positions], adapter) for _, positions, adapter in adapters]
        shapes = {j: example_of(low.arg_nodes[i]) for i, j in position.items()}
        fn = _direct_backward(bop.name, reads, arg_reads, (*out_reads, *grad_reads), local.module.forward, plans, shapes)
        if _returns_views(local.module.graph):
            fn = _owning_results(fn)
        accumulated, into_paths = {}, {}
    else:
        role_of_arg = {low.arg_index[n]: r for r, n in low.record.binding.inputs.items() if isinstance(n, fx.Node)}
        alt = next(a for s in low.kind.backward_steps(low.record.binding) for a in s.alts if a.name == impl.name)
        read_roles = [r for r in alt.reads if r in low.role_names]
        input_roles = {r: low.record.binding.inputs[r] for r in read_roles if isinstance(low.record.binding.inputs.get(r), fx.Node)}
        ctx_attrs = low.attrs
        extra = {low.paths[low.arg_index[n]].owner for n in input_roles.values()} | {low.role_names[r] for r in read_roles if r not in input_roles}
        reads = reads + tuple(sorted(n for n in extra if n not in allowed))
        out_roles = {low.out_role[k]: grad_name(low.out_names[k]) for k in grad_outs if k in low.out_role}
        saved_getters = {r: (_arg_getters([low.paths[low.arg_index[node]]], reads)[0] if (node := input_roles.get(r)) is not None
                             else (lambda values, i=reads.index(low.role_names[r]): values[i])) for r in read_roles}
        grad_getters = {role: (lambda values, i=reads.index(g): values[i]) for role, g in out_roles.items()}
        wanted_roles = [role_of_arg[i] for i in wanted]
        plans = [([wanted.index(i) for i in positions], adapter) for _, positions, adapter in adapters]
        shapes = {j: example_of(low.arg_nodes[i]) for j, i in enumerate(wanted)}
        ctx = OpContext(kind, ctx_attrs, {}, lambda: {})
        accumulated, into_paths = _accumulated(low, bop, impl, alt, wanted, adapters)
        skip = {k for k, (g, _, _) in enumerate(adapters) if g in accumulated}

        def fn(*values, into=None):
            saved = {r: g(values) for r, g in saved_getters.items()}
            grads = {role: g(values) for role, g in grad_getters.items()}
            if not accumulated:
                role_grads = custom(ctx, saved, grads)
                return _owner_grads(plans, [role_grads.get(r) for r in wanted_roles], shapes)
            if into is None:
                into = step.scratch_targets(values[0].device)
            role_into = {role: (into[g] if into[g].tensor is None else GradTarget(path.materialize(into[g].tensor), into[g].overwrite))
                         for role, (g, path) in into_paths.items()}
            role_grads = custom(ctx, saved, grads, into=role_into)
            return _owner_grads(plans, [role_grads.get(r) for r in wanted_roles], shapes, skip)

    adopts = bool(into_paths) and (kind, impl.name) in ADOPTING and all(path.is_identity for _, path in into_paths.values())
    parts = {g: (_bytes(example_of(_owner_node(low, positions[0]))), _bytes(example_of(low.arg_nodes[positions[0]])))
             for g, positions, adapter in adapters if g not in accumulated and is_part_scatter(adapter)}
    step = StepFn(bop.name, reads, writes, fn, accumulates=accumulated, adopts=adopts, part_gradients=parts)
    return step  # the accumulating form's fn reads it


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _direct_backward(label: str, reads: tuple[str, ...], arg_reads: list[ArgPath], value_reads: tuple[str, ...],
                     backward: Callable, plans, shapes: dict) -> Callable:
    """PyTorch's local backward as one generated step (:mod:`.step_source`): the argument
    values rebuilt from their owners, the traced backward called, and the owners'
    gradients made from the arguments' as :func:`_owner_grads` makes them (a missing
    gradient is zeros)."""
    source = StepSource(reads)
    inputs = [source.param(p.owner) if p.is_identity else f"{source.const(p.materialize, 'path')}({source.param(p.owner)})"
              for p in arg_reads]
    inputs += [source.param(n) for n in value_reads]
    source.assign("g", f"{source.const(backward, 'backward')}({', '.join(inputs)})")
    results = []
    for positions, adapter in plans:
        parts = []
        for j in positions:
            like = shapes[j]
            zeros = source.const(functools.partial(torch.zeros, tuple(like.shape), dtype=like.dtype, device=like.device), "zeros")
            parts.append(f"(g[{j}] if g[{j}] is not None else {zeros}())")
        results.append(parts[0] if adapter is None else f"{source.const(adapter, 'adapt')}({', '.join(parts)})")
    return source.build(results, label)


def _returns_views(graph: fx.Graph) -> bool:
    """Whether a local backward graph returns a view of one of its inputs (the slices of
    the incoming gradient a ``cat`` backward returns)."""
    output = next(n for n in graph.nodes if n.op == "output")
    for node in (n for n in output.all_input_nodes):
        viewed = False
        while node.op == "call_function" and getattr(node.target, "is_view", False):
            node, viewed = node.args[0], True
        if viewed and node.op == "placeholder":
            return True
    return False


def _owning_results(fn: Callable) -> Callable:
    """``fn`` whose results each own their storage: a result that is part of a larger
    storage (a slice of the incoming gradient) becomes a contiguous copy. The memory model
    gives every gradient a storage of its own and frees the incoming one after the step;
    a slice would keep all of it alive until its last part dies (a UNet's skip gradient
    held the whole concatenation's gradient through the decoder's backward), and a
    non-contiguous slice is copied by the next kernel anyway."""
    def run(*values):
        return tuple(r.clone(memory_format=torch.contiguous_format) if r is not None and _is_part(r) else r for r in fn(*values))

    return run


def _is_part(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() > t.numel() * t.element_size()


def _accumulated(low: _OpLowering, bop, impl, alt, wanted: list[int], adapters) -> tuple[dict, dict]:
    """For an implementation that accumulates parameter gradients: gradient name ->
    :class:`AccumulatedGrad`, and role -> (gradient name, the argument's path from its
    owner), the path turning the owner's ``.grad`` into the view the alternative writes
    (a linear layer's ``weight.t()``). A path that repeats elements (an expand), and an
    owner that also feeds another argument of the op, cannot be added into in place from
    one view and are refused."""
    accumulated, into_paths = {}, {}
    positions_of = {g: positions for g, positions, _ in adapters}
    for role in alt.accumulates:
        node = low.record.binding.inputs.get(role)
        if not isinstance(node, fx.Node) or low.arg_index.get(node) not in wanted:
            continue
        path = low.paths[low.arg_index[node]]
        g = grad_name(path.owner)
        if g not in impl.accumulates:
            continue
        if len(positions_of.get(g, ())) > 1:
            raise LoweringError(f"{bop.name} ({impl.name}): {path.owner} feeds several arguments; its gradient is a sum"
                                " the step cannot add into .grad from one view")
        like = example_of(_owner_node(low, low.arg_index[node]))
        probe = path.materialize(torch.empty_strided(tuple(like.shape), tuple(like.stride()), dtype=like.dtype, device="meta"))
        if any(st == 0 and n > 1 for n, st in zip(probe.shape, probe.stride())) or probe.numel() > like.numel():
            raise LoweringError(f"{bop.name} ({impl.name}): {role} is a view of {path.owner} that repeats elements;"
                                " its gradient cannot be added into .grad in place")
        accumulated[g] = AccumulatedGrad(like, covers=probe.numel() == like.numel())
        into_paths[role] = (g, path)
    if set(accumulated) != set(impl.accumulates):
        raise LoweringError(f"{bop.name} ({impl.name}): the spec accumulates {sorted(impl.accumulates)},"
                            f" the alternative {sorted(accumulated)}")
    return accumulated, into_paths


def _owner_grads(plans, arg_grads, shapes, skip=frozenset()) -> tuple:
    """Gradients of the owners from the gradients of the arguments (``plans``: per owner
    the argument positions and the adapter; ``None`` gradients become zeros; owners in
    ``skip``, added into ``.grad`` by the step itself, get ``None``)."""
    out = []
    for k, (positions, adapter) in enumerate(plans):
        if k in skip:
            out.append(None)
            continue
        grads = [arg_grads[j] if arg_grads[j] is not None else torch.zeros(shapes[j].shape, dtype=shapes[j].dtype, device=shapes[j].device) for j in positions]
        out.append(grads[0] if adapter is None else adapter(*grads))
    return tuple(out)
