"""Between MILP solutions and schedules, both ways, and the model's own accounting.

* :func:`decode` rounds the solver's decisions and writes the schedule they describe
  (implementations, forward keep, per-stage recompute/keep/free).
* :func:`encode` does the reverse for any schedule in the canonical stage order: the
  decisions, then every auxiliary column from its definition. A heuristic schedule
  encoded this way is the MIP start; a schedule outside the model's space (for example
  one that carries a tensor no later step reads) is reported, not silently changed.
* :func:`evaluate` gives the model's accounting of a set of decisions: the memory of every
  step that runs and the total compute. It uses the exact definitions of the auxiliary
  columns, so it does not depend on solver tolerances; tests assert that it equals the
  simulator's replay step by step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ir import Schedule, StagePlan
from ..simulator import chosen_impls
from .model import MIB, JointModel

__all__ = ["Accounting", "decode", "encode", "evaluate", "decisions_from_solution", "canonical"]


@dataclass
class Accounting:
    """What the model says about one set of decisions."""

    steps: list[tuple[int, str, str, int]]  # (stage, kind, op, peak bytes) of every step that runs
    compute_us: float
    peak_bytes: int
    values: np.ndarray

    @property
    def step_peaks(self) -> list[int]:
        return [s[3] for s in self.steps]


def decisions_from_solution(model: JointModel, x) -> dict[int, float]:
    """The integer columns of a solver solution, rounded."""
    integer = model.builder.integer
    return {col: float(round(x[col])) for col in range(len(integer)) if integer[col]}


def evaluate(model: JointModel, decisions: dict[int, float]) -> Accounting:
    values = model.builder.complete(decisions)
    steps = []
    for slot in model.slots:
        if slot.run.value(values) > 0.5:
            peak = model.fixed_bytes + slot.memory.value(values) * MIB
            steps.append((slot.stage, slot.kind, slot.op, int(round(peak))))
    peak = max((s[3] for s in steps), default=model.fixed_bytes)
    return Accounting(steps, model.compute.value(values), peak, values)


def _chosen(table, op_names, values) -> dict[str, str]:
    result = {}
    for (op, impl), expr in table.items():
        if expr.value(values) > 0.5:
            result[op] = impl
    return result


def decode(model: JointModel, decisions: dict[int, float], *, spec_path: str, fingerprint: str) -> Schedule:
    """The schedule described by (rounded) decisions."""
    net = model.network
    values = model.builder.complete(decisions)
    impls = {**_chosen(model.y, model.forward_order, values), **_chosen(model.z, model.stage_order, values)}
    choices = {op.name: impls[op.name] for op in (*net.forward_ops, *net.backward_ops) if len(op.impls) > 1}
    outputs = set(net.outputs)

    def carried(t: int) -> set[str]:
        return {x for x in model.tensors if model.carry.get((t, x)) is not None and model.carry[t, x].value(values) > 0.5}

    previous = carried(0)
    forward_keep = tuple(x for x in model.tensors if x in previous and x not in outputs)
    stages = []
    for t, name in enumerate(model.stage_order, start=1):
        now = carried(t)
        recompute = tuple(
            op for op in model.forward_order if (t, op) in model.recompute and model.recompute[t, op].value(values) > 0.5
        )
        keep = tuple(x for x in model.tensors if x in now and x not in previous and x not in outputs)
        free = tuple(x for x in model.tensors if x in previous and x not in now and x not in outputs)
        stages.append(StagePlan(name, recompute, keep, free))
        previous = now
    return Schedule(spec_path, fingerprint, choices, forward_keep, tuple(stages))


def canonical(model: JointModel, schedule: Schedule) -> Schedule:
    """The same schedule written the way the model expresses it (same memory, same compute).

    Two rewrites, both neutral for the simulator: a carried view carries its base tensor
    too (they share one storage, so nothing is added), and a tensor is no longer carried
    once no later step can read it (the model has no column for such a carry; dropping it
    only lowers memory).
    """
    net = model.network
    roots = {x: model_root for x in model.tensors if (model_root := _root(net, x)) != x}
    outputs = set(net.outputs)

    def fix(t: int, carried: set[str]) -> set[str]:
        carried = carried | {roots[x] for x in carried if x in roots and roots[x] in model.tensors}
        return {x for x in carried if x in outputs or (t, x) in model.carry}

    previous = fix(0, set(schedule.forward_keep) | outputs)
    forward_keep = tuple(x for x in model.tensors if x in previous and x not in outputs)
    raw = set(schedule.forward_keep) | outputs
    stages = []
    for t, stage in enumerate(schedule.stages, start=1):
        raw = (raw | set(stage.keep)) - set(stage.free)
        now = fix(t, raw)
        keep = tuple(x for x in model.tensors if x in now and x not in previous)
        free = tuple(x for x in model.tensors if x in previous and x not in now and x not in outputs)
        stages.append(StagePlan(stage.backward, stage.recompute, keep, free))
        previous = now
    return Schedule(schedule.spec_path, schedule.fingerprint, dict(schedule.impls), forward_keep, tuple(stages))


def _root(network, name: str) -> str:
    from ...graph import storage_root

    return storage_root(network, name)


def encode(model: JointModel, schedule: Schedule) -> tuple[dict[int, float], list[str]]:
    """Decisions for ``schedule`` and the ways it leaves the model's space (empty: inside)."""
    net = model.network
    outside: list[str] = []
    order = tuple(stage.backward for stage in schedule.stages)
    if order != model.stage_order:
        outside.append("its stages are not in the canonical backward order")
        return {}, outside
    impls = chosen_impls(net, schedule)
    decisions: dict[int, float] = {}

    def put(expr, want: bool, what: str) -> None:
        if expr is None:
            if want:
                outside.append(what)
            return
        if expr.is_const():
            if (expr.const > 0.5) != want:
                outside.append(what)
            return
        decisions[expr.var] = 1.0 if want else 0.0

    for table in (model.y, model.z):
        for (op, impl), expr in table.items():
            if len(expr.terms) == 1 or expr.is_const():
                put(expr, impls.get(op) == impl, f"implementation {impl} of {op} is not allowed")
    carried = set(schedule.forward_keep) | set(net.outputs)
    for x in model.tensors:
        put(model.carry.get((0, x)), x in carried, f"the forward pass keeps {x}")
    for t, stage in enumerate(schedule.stages, start=1):
        recomputed = set(stage.recompute)
        for op in model.forward_order:
            put(model.recompute.get((t, op)), op in recomputed, f"stage {stage.backward} recomputes {op}")
        carried = (carried | set(stage.keep)) - set(stage.free)
        for x in model.tensors:
            put(model.carry.get((t, x)), x in carried, f"stage {stage.backward} carries {x}")
    return decisions, outside
