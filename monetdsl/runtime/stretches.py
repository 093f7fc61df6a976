"""Stretches: runs of stored ops whose backward is autograd's own, run by autograd's engine.

Step by step, every backward op of the schedule is a Python call: arguments rebuilt, the
op's traced local backward called, gradients moved. Eager PyTorch's backward is one call
into autograd's C++ engine. On a small model that difference is the runtime's whole
overhead (an unrolled GRU of a few hundred tiny ops: x12 of eager's step). Where the schedule does what eager does anyway, the runtime can do it the same way:

* a **stretch** is a maximal run of consecutive backward stages that recompute nothing
  and whose backward ops belong to forward ops that are stored (never recomputed) and run
  PyTorch's own implementation forward and backward, with an autograd graph that saves
  only what those backward implementations read
  (:attr:`~monetdsl.lowering.program.StepFn.records_autograd`); every backward op of such
  a forward op lies in the same stretch, and a stretch has at least
  :data:`MIN_STRETCH_OPS` forward ops;
* its forward ops run with grad enabled. Parameters are read as the model's own;
  other tensors from outside whose gradient the stretch writes enter through
  :class:`Enter` (an alias with a graph node that holds no storage, so an activation the
  plan frees is not kept alive by the graph); of every tensor it makes whose gradient
  comes from outside (the **roots**) the gradient edge is kept;
* its backward stages become one step: ``torch.autograd.backward`` from the roots with
  their gradients. The engine accumulates the parameters' ``.grad`` itself (as eager's
  does: stolen when there is none, added in place otherwise), and the entered tensors'
  gradients land in the stretch's box when it reaches :class:`Enter`; those are
  delivered as any step's are (set, or added into an earlier writer's). The schedule's
  releases of the stretch happen before the call (autograd holds what it saved and frees
  it as it goes).

With DDP or gradient hooks listening the plan runs step by step (its sink delivers every
parameter's gradient once, whole), and so it does for an observer, which sees every step.

The schedule's frees and recomputations outside stretches stay explicit. Gradients equal
eager's: the graph is eager's own formulas on the same values. Where the engine would hold
memory the plan does not have room for, the ops concerned run step by step (the rules
below, each found by the allocator probe of ``benchmarks/fidelity.py``), or, for a layer
whose one backward node would make its gradients beside an input the plan frees first,
as a planned node in the stretch (:mod:`.planned_nodes`: its backward the plan's own
steps, in the plan's order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ir import Network, Schedule, TensorKind, grad_name
from ..lowering.program import Program, StepFn
from ..search.simulator import simulate
from .planned_nodes import node_spec, planned_node_overshoot

__all__ = ["MIN_STRETCH_OPS", "ENGINE_ROOM", "Stretch", "Enter", "find_stretches", "composite_steps", "run_stretch"]

#: a stretch saves a Python backward step per op and costs an engine call, a node per
#: entered tensor and grad mode in its forward: on the 2-core CPU runs of three to five
#: ops (a batch norm, its ReLU, a pool, between convolutions run step by step) came out
#: slower than step by step (small CNN x1.25 against x1.15 of eager's step), so only runs
#: of at least this many forward ops are made
MIN_STRETCH_OPS = 6

#: share of the planned peak an op's backward node may add to it and still run in a
#: stretch (the plan then reports the higher peak): autograd makes a layer's weight
#: gradient beside its input gradient and adds it into ``.grad`` afterwards, where the
#: plan's peak, at the input-gradient step, has the weight gradient already added. On
#: the fidelity models that was 1 KiB (MobileNet-style) to 18 KiB (UNet-style, 0.18 % of
#: its peak), and it kept their whole backward out of the engine (x1.22 of eager's step
#: against x1.04 in it, MobileNet-style)
ENGINE_ROOM = 0.005


@dataclass(frozen=True)
class Stretch:
    """One stretch: its forward ops (in forward order); its roots (tensors it makes whose
    gradient, read by its backward, comes from outside or is a seed); the parameters whose
    gradient it writes (read as the model's own parameters, so the engine accumulates
    their ``.grad`` as eager's does); the other tensors from outside whose gradient it
    writes (``entered`` through :class:`Enter`, the forward op before which each is
    entered, and the op that reads each one's alias last); its backward stages."""

    index: int
    ops: tuple[str, ...]
    roots: tuple[str, ...]
    params: tuple[str, ...]
    entered: tuple[str, ...]
    enter_before: dict  # forward op -> names entered right before it
    alias_last: dict  # forward op -> entered names whose alias it reads last
    stages: tuple[int, ...]  # backward stage indices (0-based in schedule.stages)
    nodes: dict = field(default_factory=dict)  # forward op -> its NodeSpec: recorded as a planned node (:mod:`.planned_nodes`)

    @property
    def writes(self) -> tuple[str, ...]:
        """The gradients its backward step returns (the parameters' go to ``.grad``)."""
        return tuple(grad_name(n) for n in self.entered)


class Enter(torch.autograd.Function):
    """Aliases of tensors from outside a stretch that require grad, hanging off a
    storage-less anchor: the node saves nothing, so an activation the plan frees is not
    kept alive by the graph. Its backward, when the engine reaches it, puts each alias's
    gradient in the stretch's ``box`` at its position and stops there. The runtime
    enters one tensor per node: the engine runs a node once all its gradients are in,
    and a gradient (a slice of a larger one) waiting there for another would hold
    memory the plan does not count."""

    @staticmethod
    def forward(ctx, anchor, box, positions, *values):
        ctx.box, ctx.positions = box, positions
        return tuple(v.view_as(v) for v in values)

    @staticmethod
    def backward(ctx, *grads):
        box, ctx.box = ctx.box, None  # the node outlives the call (a kept output's grad_fn reaches it): keep no gradient
        for i, g in zip(ctx.positions, grads):
            box[i] = _owning(g)
        return (None, None, None, *(None for _ in grads))


def _owning(g: torch.Tensor) -> torch.Tensor:
    """``g``, or a copy when it is part of a larger storage (a slice of the gradient a
    ``cat`` received): the memory model gives every gradient a storage of its own and
    frees the incoming one after the step, and a slice would hold all of it."""
    if g.untyped_storage().nbytes() > g.numel() * g.element_size():
        return g.clone(memory_format=torch.contiguous_format)
    return g


def find_stretches(network: Network, schedule: Schedule, program: Program, backward: list,
                   room: int = 0) -> tuple[list[Stretch], int]:
    """The schedule's stretches (module docstring) and the bytes their engine calls reach
    above the plan's peak (at most ``room``: an op whose backward node would go further
    runs step by step); ``backward``: the planned backward steps
    (:class:`~.executor.PlannedStep`, what each releases)."""
    recomputed = {n for stage in schedule.stages for n in stage.recompute}
    stored = [op.name for op in network.forward_ops if op.name not in recomputed]
    eligible = {op for op in stored if program.forward[op].records_autograd}
    of = {bop.name: bop.of for bop in network.backward_ops}
    stage_of = {stage.backward: t for t, stage in enumerate(schedule.stages)}
    bops_of: dict[str, list[str]] = {}
    for bop in network.backward_ops:
        bops_of.setdefault(bop.of, []).append(bop.name)
    headroom = _stage_headroom(network, schedule)
    overshoot = _joint_overshoot(network, eligible, bops_of, stage_of, headroom, backward, schedule.impls)
    # planned nodes: layers autograd's own node would take past the room, and layers whose
    # chosen implementations are not autograd's (a pool's backward from its indices alone)
    candidates = [op for op, over in overshoot.items() if over > room] + [op for op in stored if op not in eligible]
    nodes = {}
    for op in candidates:
        spec = node_spec(network, program, op, bops_of.get(op, []), stage_of, schedule.impls)
        if spec is not None:
            overshoot[op] = planned_node_overshoot(network, bops_of[op], stage_of, headroom)
            nodes[op] = spec
            eligible.add(op)
    eligible -= {op for op, over in overshoot.items() if over > room}
    eligible -= _reading_recomputed(network, schedule, eligible, recomputed)
    part_writes = {stage_of[b]: program.backward[b].part_gradients for b in stage_of
                   if b in program.backward and program.backward[b].part_gradients}  # stage -> {gradient: (owner, part)}
    while True:
        groups, current = [], []
        for t, stage in enumerate(schedule.stages):
            if not stage.recompute and of.get(stage.backward) in eligible:
                current.append(t)
            elif current:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
        group_of = {t: g for g, ts in enumerate(groups) for t in ts}
        split = {op for op in eligible
                 if len({group_of.get(stage_of.get(b)) for b in bops_of[op]}) != 1 or any(b not in stage_of for b in bops_of[op])}
        split |= _early_additions(network, schedule, groups, of)
        split |= _held_root_gradients(network, schedule, groups, of, headroom, part_writes)
        if not split:
            break
        eligible -= split
    order = {op.name: k for k, op in enumerate(network.forward_ops)}
    stretches = []
    for stages in groups:
        ops = sorted({of[schedule.stages[t].backward] for t in stages}, key=order.__getitem__)
        if len(ops) >= MIN_STRETCH_OPS:
            stretches.append(_stretch(len(stretches), network, ops, stages, schedule,
                                      {op: nodes[op] for op in ops if op in nodes}))
    inside = {op for s in stretches for op in s.ops}
    return stretches, max((max(over, 0) for op, over in overshoot.items() if op in inside), default=0)


def _reading_recomputed(network: Network, schedule: Schedule, ops: set[str], recomputed: set[str]) -> set[str]:
    """Ops whose backward reads a tensor that another op makes and the schedule recomputes
    (an LSTM's zero initial state): autograd's graph saves the forward pass's copy until
    the stretch's backward, where the plan frees it and makes it again when needed."""
    made_by = {n: op.name for op in network.forward_ops for n in op.outputs}
    out = set()
    for bop in network.backward_ops:
        if bop.of in ops and any(made_by.get(n, bop.of) != bop.of and made_by[n] in recomputed
                                 for n in _reads(network, schedule, bop.name)):
            out.add(bop.of)
    return out


def _stage_headroom(network: Network, schedule: Schedule) -> dict[int, int]:
    """Per backward stage (0-based): the planned peak less the stage's own highest step."""
    simulation = simulate(network, schedule)
    highest: dict[int, int] = {}
    for step in simulation.steps:
        if step.stage > 0:
            highest[step.stage - 1] = max(highest.get(step.stage - 1, 0), step.peak)
    return {t: simulation.peak_bytes - peak for t, peak in highest.items()}


def _joint_overshoot(network: Network, ops: set[str], bops_of: dict, stage_of: dict, headroom: dict,
                     backward: list, impls: dict) -> dict[str, int]:
    """Per op with several backward ops, the bytes its autograd node reaches above the
    plan's peak (negative: below it). Autograd runs such a backward as one node where the
    plan runs one backward op at a time (a convolution's weight gradient, then its input
    gradient): the node makes every gradient at once, beside the scratch of the one
    kernel that makes them (for ``convolution_backward`` on the CPU, the weight
    gradient's own). Where that goes over the plan's peak by more than the caller allows,
    the op runs step by step.

    When the op's backward ops fill consecutive stages, the engine runs the node where the
    plan runs the first of them (it runs a stretch's nodes latest-made first, and the
    stretch's stages follow that order), and it frees what the node saved when the node
    returns, as the plan frees after that step what only that step reads. So, against
    the plan's own steps: at the first stage the node holds the gradients the later
    stages make and the kernel's scratch instead of that step's workspace; at each later
    stage, the gradients the stages after it make (the engine made them early). Otherwise
    the node may run at any of the op's stages: it is charged everything it makes, the
    scratch, and what the plan frees between those stages."""
    tensors = network.tensors
    released = {p.stage - 1: sum(tensors[n].nbytes for n in (*p.release_before, *p.release_after))
                for p in backward if p.kind == "backward"}
    out = {}
    for op in ops:
        bops = [b for b in bops_of.get(op, ()) if b in stage_of]
        if len(bops_of.get(op, ())) < 2 or len(bops) < 2:
            continue
        made = {stage_of[b]: sum(tensors[n].nbytes for n in network.op(b).outputs) for b in bops}
        workspace = {stage_of[b]: network.op(b).impl(impls.get(b, network.op(b).impls[0].name)).workspace for b in bops}
        stages = sorted(made)
        if stages == list(range(stages[0], stages[-1] + 1)):
            scratch = _joint_scratch(network, bops, workspace, stage_of)
            first, later = stages[0], stages[1:]
            excess = {first: sum(made[t] for t in later) + scratch - workspace[first]}
            excess.update({t: sum(made[u] for u in later if u > t) for t in later})
        else:
            extra = sum(made.values()) + sum(released.get(t, 0) for t in stages[:-1]) + max(workspace.values())
            excess = {t: extra - workspace[t] for t in stages}
        out[op] = max(bytes_ - headroom.get(t, 0) for t, bytes_ in excess.items())
    return out


def _joint_scratch(network: Network, bops: list[str], workspace: dict, stage_of: dict) -> int:
    """The scratch of the one kernel that makes all of an op's gradients: on the CPU,
    ``convolution_backward``'s is its weight gradient's own (measured on plain, 1x1,
    depthwise, transposed and DenseNet-sized convolutions), so the workspace of the step
    that makes a parameter's gradient; the largest of the steps' without one."""
    param_grads = {grad_name(n) for n, t in network.tensors.items() if t.kind is TensorKind.PARAM}
    for b in bops:
        if param_grads.intersection(network.op(b).outputs):
            return workspace[stage_of[b]]
    return max(workspace.values())


def _held_root_gradients(network: Network, schedule: Schedule, groups: list[list[int]], of: dict, headroom: dict,
                         part_writes: dict) -> set[str]:
    """Ops to take out of their stretch because the gradients it starts from stay alive
    until its engine call returns (the caller holds them), where the plan frees each after
    its last reader: at a later stage of the stretch without room for them, the stretch
    ends before that stage's op. The network output's gradient is held by the caller to
    the end in the plan too.

    Gradients made of parts (``part_writes``: stage -> {gradient: (owner bytes, part
    bytes)}, the time steps of a recurrent layer's input projection) count as the engine
    holds them: it keeps the parts it has received and forms the owner's gradient once,
    when the last is in, through autograd's backward of the alias calls (the parts
    stacked beside the result). The plan holds the whole gradient from its first writer
    on and a temporary at each later writer, room the engine does not use; where the
    stretch writes only one part, the plan holds just the result where the engine also
    holds the stacked parts and zero pieces beside it (at most the owner's bytes)."""
    tensors = network.tensors
    seeds = {grad_name(n) for n in network.outputs}
    written_at: dict[str, list[int]] = {}
    for t, stage in enumerate(schedule.stages):
        for g in network.op(stage.backward).outputs:
            written_at.setdefault(g, []).append(t)
    out = set()
    for stages in groups:
        first, last = stages[0], stages[-1]
        ops = {of[schedule.stages[t].backward] for t in stages}
        inside = {schedule.stages[t].backward for t in stages}
        held_from: dict[int, int] = {}
        for op in ops:
            for name in network.op(op).outputs:
                g = grad_name(name)
                if g in seeds or not any(g in network.op(b.name).outputs for b in network.backward_ops if b.name not in inside):
                    continue
                readers = [t for t in stages if g in _reads(network, schedule, schedule.stages[t].backward)]
                if readers:
                    held_from[max(readers) + 1] = held_from.get(max(readers) + 1, 0) + tensors[g].nbytes
        extra = _part_gradients_in_engine(stages, part_writes, written_at)
        held = 0
        for t in range(first, last + 1):
            held += held_from.get(t, 0)
            needed = held + extra.get(t, 0)
            if needed > 0 and headroom.get(t, 0) < needed:
                out.add(of[schedule.stages[t].backward])
    return out


def _part_gradients_in_engine(stages: list[int], part_writes: dict, written_at: dict) -> dict[int, int]:
    """Per stage of a stretch: the bytes the engine holds beyond the plan (negative: fewer)
    for the gradients the stretch makes from parts (:func:`_held_root_gradients`)."""
    parts: dict[str, list[tuple[int, int, int]]] = {}
    for t in stages:
        for g, (owner, part) in part_writes.get(t, {}).items():
            parts.setdefault(g, []).append((t, owner, part))
    extra: dict[int, int] = {}
    for g, written in parts.items():
        if len(written) == 1:
            t, owner, _ = written[0]
            extra[t] = extra.get(t, 0) + owner
            continue
        if any(t < stages[0] for t in written_at.get(g, ())):
            continue  # the gradient exists before the stretch: the plan's whole one is real
        formed = written[-1][0]
        writer_stages = {t for t, _, _ in written[1:-1]}
        received, k = 0, 0
        for t in range(written[0][0], formed):
            while k < len(written) and written[k][0] <= t:
                received += written[k][2]
                k += 1
            owner = written[0][1]
            credit = max(0, owner - received) + (owner if t in writer_stages else 0)
            extra[t] = extra.get(t, 0) - credit
    return extra


def _reads(network: Network, schedule: Schedule, bop: str) -> frozenset:
    op = network.op(bop)
    return op.impl(schedule.impls.get(bop, op.impls[0].name)).reads


def _early_additions(network: Network, schedule: Schedule, groups: list[list[int]], of: dict) -> set[str]:
    """Ops to take out of their stretch because the engine would hold a gradient the plan
    does not: a tensor from outside whose gradient exists before the stretch (an earlier
    writer made it) gets the stretch's part in the engine's buffer from its first
    contribution until the whole stretch is done, while the plan adds each part as it is
    made. That is the same memory only when the one stage that writes it is the
    stretch's last; the ops of earlier writing stages run step by step."""
    writers_at: dict[str, list[int]] = {}
    for t, stage in enumerate(schedule.stages):
        for g in network.op(stage.backward).outputs:
            writers_at.setdefault(g, []).append(t)
    tensors = network.tensors
    out = set()
    for stages in groups:
        first, last = stages[0], stages[-1]
        ops = {of[schedule.stages[t].backward] for t in stages}
        made = {n for op in ops for n in network.op(op).outputs}
        for op in ops:
            for name in network.op(op).inputs:
                g = grad_name(name)
                if name in made or tensors[name].kind is TensorKind.PARAM or g not in writers_at:
                    continue
                if not any(t < first for t in writers_at[g]):
                    continue
                inside = [t for t in writers_at[g] if first <= t <= last]
                out.update(of[schedule.stages[t].backward] for t in inside if t != last)
        for name in made:  # a root's gradient comes in from outside: the engine adds the stretch's parts out of place
            inside = [t for t in writers_at.get(grad_name(name), ()) if first <= t <= last]
            if inside and any(t < first for t in writers_at[grad_name(name)]):
                out.update(of[schedule.stages[t].backward] for t in inside)
    return out


def _stretch(index: int, network: Network, ops: list[str], stages: list[int], schedule: Schedule, nodes: dict) -> Stretch:
    tensors = network.tensors
    inside_bops = {schedule.stages[t].backward for t in stages}
    made = {n for op in ops for n in network.op(op).outputs}
    written_inside = {n for b in inside_bops for n in network.op(b).outputs}
    written_outside = {n for bop in network.backward_ops if bop.name not in inside_bops for n in bop.outputs}
    seeds = {grad_name(n) for n in network.outputs}
    roots = tuple(n for op in ops for n in network.op(op).outputs
                  if grad_name(n) in written_outside or grad_name(n) in seeds)
    outside = tuple(dict.fromkeys(n for op in ops for n in network.op(op).inputs
                                  if n not in made and grad_name(n) in written_inside))
    params = tuple(n for n in outside if tensors[n].kind is TensorKind.PARAM)
    entered = tuple(n for n in outside if n not in params)
    enter_before: dict[str, list[str]] = {}
    alias_last: dict[str, list[str]] = {}
    for name in entered:
        readers = [op for op in ops if name in network.op(op).inputs]
        enter_before.setdefault(readers[0], []).append(name)
        alias_last.setdefault(readers[-1], []).append(name)
    return Stretch(index, tuple(ops), roots, params, entered, {k: tuple(v) for k, v in enter_before.items()},
                   {k: tuple(v) for k, v in alias_last.items()}, tuple(stages), nodes)


def composite_steps(backward: list, stretches: list[Stretch], layouts: dict) -> list:
    """The planned backward steps with each stretch's stages replaced by one step of kind
    ``"stretch"`` (its :class:`StepFn` reads the roots' gradients and writes the entered
    tensors' gradients; its ``release_before`` holds every other name the stages
    released, popped before the engine runs)."""
    from .executor import PlannedStep

    by_stage = {}
    for k, s in enumerate(stretches):
        for t in s.stages:
            by_stage[t + 1] = k
    out, done = [], set()
    for planned in backward:
        k = by_stage.get(planned.stage)
        if k is None:
            out.append(planned)
            continue
        if k in done:
            continue
        done.add(k)
        stretch = stretches[k]
        members = [p for p in backward if by_stage.get(p.stage) == k]
        writes = stretch.writes
        released = dict.fromkeys(n for p in members for n in (*p.release_before, *p.release_after, *p.grad_release))
        params = {grad_name(n) for n in stretch.params}
        first_writer = {}
        for p in members:
            for n in p.step.writes:
                first_writer.setdefault(n, p)
        accumulate = frozenset(n for n in writes if n in first_writer[n].accumulate)
        reads = tuple(grad_name(n) for n in stretch.roots)
        step = StepFn(f"stretch{k}", reads, writes, _stretch_fn(k, [layouts[n] for n in stretch.entered]))
        out.append(PlannedStep(members[0].stage, "stretch", step,
                               release_before=tuple(n for n in released if n not in writes and n not in params),
                               accumulate=accumulate,
                               grad_release=tuple(n for n in released if n in writes)))
    return out


def _stretch_fn(index: int, entered: list[tuple]):
    """The stretch's step: ``fn(graph, *root gradients) -> entered tensors' gradients``
    (``graph``: what the forward recorded, by stretch)."""
    zeros = list(entered)

    def fn(graph, *grads):
        return run_stretch(graph.pop(index), grads, zeros)

    return fn


def run_stretch(recorded, grads, zeros) -> tuple:
    """One stretch's backward through autograd's engine: ``recorded`` (the roots' gradient
    edges, the box the entered tensors' gradients land in) as the forward left it,
    ``grads`` the roots' gradients. The engine accumulates the parameters' ``.grad`` as
    in eager training. A gradient the engine does not reach is zeros (``zeros``: shape and
    dtype per entered tensor); one that is part of a larger storage (a slice of an
    incoming gradient) is copied, as the memory model gives every gradient a storage of
    its own."""
    roots, box = recorded
    outputs, seeds = [], []
    for edge, grad in zip(roots, grads):
        if edge is not None:
            outputs.append(edge)
            seeds.append(grad)
    if outputs:
        torch.autograd.backward(outputs, seeds)
    result = []
    for g, (shape, dtype) in zip(box, zeros):
        result.append(g if g is not None else torch.zeros(shape, dtype=dtype, device=seeds[0].device if seeds else "cpu"))
    return tuple(result)
