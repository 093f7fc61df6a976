"""The simulator: the one referee of every schedule.

Given a network and a schedule it replays one training step operation by operation,
checks that every step is legal and measures memory exactly under the model documented
in ``docs/memory-model.md``. Every solver's schedule passes through :func:`simulate`
before it is printed or written; a solver's own accounting is never trusted alone.

Execution model, in short:

* **Fixed memory** (inputs, params, buffers, ``fixed`` items) is resident throughout.
* **Stage 0** runs every forward op once, in forward order. **Stage t >= 1** runs the
  listed recomputations (forward ops) in order, then one backward op.
* A step allocates its outputs (a view or an in-place output allocates nothing) and its
  workspace; the step's peak is ``fixed + live + outputs + workspace``.
* After each step, a tensor is released as soon as no later step of the same stage reads
  it, unless it is *carried* to the next stage: kept by the forward pass
  (``forward keep``) or by a stage (``keep``), and not yet dropped (``free``). Network
  outputs are carried to the end.
* Gradients live from their first writer to their last reader. A second writer of the
  same gradient allocates a temporary that is added into it; gradients of fixed tensors
  (parameter gradients) are temporaries that go to fixed memory, unless the
  implementation ``accumulates`` them (added into the resident gradient piece by piece:
  no new bytes, the pieces are its workspace). A backward implementation that
  ``overwrites`` a gradient it reads (its last reader) writes its first output into that
  gradient's storage: no new bytes, and the overwritten gradient is gone. The seeds (gradients of
  the network outputs) are the caller's: allocated when the backward starts, held to its end.
* An in-place implementation destroys the input it overwrites (and any view of it): the
  input must not be read later in the stage nor be carried.

    >>> from monetdsl.grammar.parser import parse_spec, parse_schedule
    >>> spec = parse_spec('''
    ... network n
    ...   tensor x f32[256] input
    ...   op a (x) -> y f32[256] time 1us
    ...     backward reads (grad(y), x) -> grad(x) time 2us
    ...   output y
    ... ''')
    >>> sched = parse_schedule(f'''
    ... schedule for "n.monet" fingerprint {spec.fingerprint}
    ...   stage a.backward
    ... ''')
    >>> result = simulate(spec.network, sched)
    >>> result.valid, result.peak_bytes   # x, y, grad(y) and the new grad(x): 4 x 1 KiB
    (True, 4096)
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from ..errors import Diagnostic
from ..graph import index
from ..ir import BackwardOp, ForwardImpl, ForwardOp, Network, Schedule, TensorKind
from ..units import human_bytes
from ..validate import ResolvedConstraints
from .impl_choice import cheapest_impls, no_recompute_compute_us

__all__ = ["Step", "Simulation", "simulate", "chosen_impls"]

_FIXED = -1  # storage id of fixed memory: resident, never counted as live


@dataclass(frozen=True)
class Step:
    """One executed operation. Byte counts: ``live_*`` exclude fixed memory, ``peak`` includes it."""

    index: int
    stage: int
    stage_name: str
    kind: str  # "forward", "recompute" or "backward"
    op: str
    impl: str
    live_before: int
    peak: int
    live_after: int
    time_us: float

    def describe(self) -> str:
        where = "the forward pass" if self.stage == 0 else f"stage {self.stage_name}"
        what = {"forward": "running", "recompute": "recomputing", "backward": "running"}[self.kind]
        return f"{where}, {what} {self.op}"


@dataclass
class Simulation:
    """What the simulator found. ``valid``: every step legal; ``ok``: valid and within the
    constraints it was given (budget, overhead, pins)."""

    network: Network
    schedule: Schedule
    errors: list[Diagnostic] = field(default_factory=list)
    violations: list[Diagnostic] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    fixed_bytes: int = 0
    peak_bytes: int = 0
    peak_step: Step | None = None
    forward_us: float = 0.0
    recompute_us: float = 0.0
    backward_us: float = 0.0
    baseline_us: float = 0.0

    @property
    def valid(self) -> bool:
        return not self.errors

    @property
    def ok(self) -> bool:
        return not self.errors and not self.violations

    @property
    def compute_us(self) -> float:
        """Total time of all steps, summed exactly (``math.fsum``): the same multiset of
        times gives the same total whatever the order, so solvers can compare to the bit."""
        return math.fsum(step.time_us for step in self.steps)

    @property
    def overhead(self) -> float:
        """Extra compute relative to the cheapest no-recompute schedule (0.1 = 10 %)."""
        if self.baseline_us <= 0:
            return 0.0
        return self.compute_us / self.baseline_us - 1.0

    def where(self) -> str:
        return self.peak_step.describe() if self.peak_step is not None else "fixed memory only"

    def stage_peaks(self) -> list[int]:
        peaks: dict[int, int] = {}
        for step in self.steps:
            peaks[step.stage] = max(peaks.get(step.stage, 0), step.peak)
        return [peaks[k] for k in sorted(peaks)]

    def summary(self) -> str:
        return (
            f"peak {human_bytes(self.peak_bytes)} ({self.peak_bytes} B) at {self.where()}; "
            f"compute {self.compute_us:.6g} us = {1 + self.overhead:.4f}x the no-recompute baseline"
        )


def chosen_impls(network: Network, schedule: Schedule) -> dict[str, str]:
    """Every op's implementation under ``schedule`` (single-implementation ops implied)."""
    result = {}
    for op in (*network.forward_ops, *network.backward_ops):
        result[op.name] = schedule.impls.get(op.name, op.impls[0].name)
    return result


class _Memory:
    """Live storages. Several tensors can share one storage (views, in-place outputs)."""

    def __init__(self) -> None:
        self.storage_of: dict[str, int] = {}
        self.users: dict[int, set[str]] = {}
        self.size: dict[int, int] = {}
        self.live = 0
        self._next = 0

    def new(self, nbytes: int) -> int:
        sid = self._next
        self._next += 1
        self.size[sid] = nbytes
        self.users[sid] = set()
        self.live += nbytes
        return sid

    def attach(self, tensor: str, sid: int) -> None:
        self.storage_of[tensor] = sid
        if sid != _FIXED:
            self.users[sid].add(tensor)

    def detach(self, tensor: str) -> None:
        sid = self.storage_of.pop(tensor, None)
        if sid is None or sid == _FIXED:
            return
        users = self.users[sid]
        users.discard(tensor)
        if not users:
            self.live -= self.size.pop(sid)
            del self.users[sid]

    def drop_if_unused(self, sid: int) -> None:
        if sid != _FIXED and sid in self.users and not self.users[sid]:
            self.live -= self.size.pop(sid)
            del self.users[sid]

    def aliases(self, tensor: str) -> set[str]:
        sid = self.storage_of.get(tensor)
        if sid is None or sid == _FIXED:
            return set()
        return set(self.users[sid]) - {tensor}

    def __contains__(self, tensor: str) -> bool:
        return tensor in self.storage_of


class _Replay:
    """One simulation run; see the module docstring for the rules it enforces."""

    def __init__(self, network: Network, schedule: Schedule, result: Simulation):
        self.net = network
        self.sched = schedule
        self.result = result
        self.idx = index(network)
        self.tensors = network.tensors
        self.mem = _Memory()
        self.fixed = network.fixed_bytes
        self.impls: dict[str, str] = {}
        self.carried: set[str] = set()
        self.lines = schedule.source.splitlines() if schedule.source else []
        self.last_read_stage: dict[str, int] = {}
        self.carried_since: dict[str, int] = {}
        self.seeds: set[str] = set()

    # reporting ---------------------------------------------------------------------
    def _diag(self, message: str, line: int = 0, severity: str = "error") -> Diagnostic:
        source_line = self.lines[line - 1] if 0 < line <= len(self.lines) else None
        column = len(source_line) - len(source_line.lstrip()) + 1 if source_line else 0
        return Diagnostic(message, self.sched.path, line, column, source_line, severity)

    def error(self, message: str, line: int = 0) -> None:
        if len(self.result.errors) < 50:
            self.result.errors.append(self._diag(message, line))

    def warn(self, message: str, line: int = 0) -> None:
        self.result.warnings.append(self._diag(message, line, "warning"))

    def violation(self, message: str, line: int = 0) -> None:
        self.result.violations.append(self._diag(message, line))

    # set-up ------------------------------------------------------------------------
    def choose_impls(self) -> None:
        for op, impl in self.sched.impls.items():
            line = self.sched.impl_lines.get(op, 0)
            if not self.net.has_op(op):
                self.error(f"impl {op} = {impl}: there is no operator {op}", line)
                continue
            known = self.net.op(op).impl_names
            if impl not in known:
                self.error(f"impl {op} = {impl}: {op} has no implementation {impl} (it has {', '.join(known)})", line)
        for op in (*self.net.forward_ops, *self.net.backward_ops):
            choice = self.sched.impls.get(op.name)
            if choice is None or choice not in op.impl_names:
                if choice is None and len(op.impls) > 1:
                    self.error(f"no implementation chosen for {op.name}: add `impl {op.name} = NAME` ({', '.join(op.impl_names)})",
                               self.sched.line)
                choice = op.impls[0].name
            self.impls[op.name] = choice

    def fimpl(self, op: ForwardOp) -> ForwardImpl:
        return op.impl(self.impls[op.name])

    def reads_of_backward(self, bop: BackwardOp) -> frozenset[str]:
        return bop.impl(self.impls[bop.name]).reads

    def is_fixed(self, name: str) -> bool:
        return self.tensors[name].is_fixed

    # steps -------------------------------------------------------------------------
    def run(self) -> None:
        self.choose_impls()
        order = self.check_stage_list()
        self.stage_lines = [self.sched.forward_line] + [stage.line for stage in order]  # by step.stage
        self.count_gradient_uses()
        self.forward_stage()
        self.start_backward()
        for t, stage in enumerate(order, start=1):
            self.backward_stage(t, stage)
        self.report_waste(len(order))

    def count_gradient_uses(self) -> None:
        """How many backward ops will read, and still have to write, each gradient."""
        self.gradient_readers = Counter()
        self.gradient_writers_left = Counter()
        for bop in self.net.backward_ops:
            for name in self.reads_of_backward(bop):
                if self.tensors[name].kind is TensorKind.GRADIENT:
                    self.gradient_readers[name] += 1
            for name in bop.outputs:
                self.gradient_writers_left[name] += 1

    def start_backward(self) -> None:
        """Allocate the seeds: the caller holds them (autograd passes them in) until the backward ends."""
        self.seeds = set(self.idx.seeds())
        for seed in sorted(self.seeds):
            self.mem.attach(seed, self.mem.new(self.tensors[seed].storage_bytes))

    def check_stage_list(self):
        seen: dict[str, int] = {}
        stages = []
        for stage in self.sched.stages:
            if stage.backward not in self.idx.backward_ops:
                hint = " (it is a forward op)" if stage.backward in self.idx.forward_ops else ""
                self.error(f"stage {stage.backward}: there is no backward op of that name{hint}", stage.line)
                continue
            if stage.backward in seen:
                self.error(f"stage {stage.backward} appears twice (first at line {seen[stage.backward]})", stage.line)
                continue
            seen[stage.backward] = stage.line
            stages.append(stage)
        missing = [b for b in self.idx.backward_order if b not in seen]
        if missing:
            self.error(f"the schedule has no stage for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", self.sched.line)
        return stages

    def forward_stage(self) -> None:
        keep = set()
        for name in self.sched.forward_keep:
            if name not in self.tensors:
                self.error(f"forward keep {name}: there is no tensor of that name", self.sched.forward_line)
            elif not self.idx.is_forward_tensor(name):
                what = self.tensors[name].kind.value
                self.error(f"forward keep {name}: it is a {what}, not a forward tensor (it needs no keeping)", self.sched.forward_line)
            elif name in keep:
                self.warn(f"forward keep lists {name} twice", self.sched.forward_line)
            else:
                keep.add(name)
        self.carried = keep | set(self.net.outputs)
        for name in self.carried:
            self.carried_since[name] = 0
        steps = [("forward", self.idx.forward_ops[n]) for n in self.idx.forward_order]
        self.run_stage(0, "forward", steps, self.sched.forward_line)
        for name in sorted(keep):
            if name not in self.mem:
                owner = self.idx.producing_op(name)
                if name in self.idx.derived_by:
                    self.error(
                        f"forward keep {name}: implementation {self.impls[owner]} of {owner} does not produce it",
                        self.sched.forward_line,
                    )

    def backward_stage(self, t: int, stage) -> None:
        bop = self.idx.backward_ops[stage.backward]
        carried_before = set(self.carried)
        for name in stage.free:
            if self.tensors.get(name) is not None and self.tensors[name].kind is TensorKind.GRADIENT:
                self.error(f"free {name}: gradients are freed automatically after their last reader", stage.line)
            elif name in self.net.outputs:
                self.error(f"stage {stage.backward}: free {name}: it is a network output, held until the end of the step", stage.line)
            elif name not in carried_before:
                self.error(f"stage {stage.backward}: free {name}, but {name} is not kept at this point", stage.line)
        for name in stage.keep:
            if name not in self.tensors:
                self.error(f"stage {stage.backward}: keep {name}: there is no tensor of that name", stage.line)
            elif self.tensors[name].kind is TensorKind.GRADIENT:
                self.error(f"keep {name}: gradients are kept automatically until their last reader", stage.line)
            elif name in carried_before:
                self.error(f"stage {stage.backward}: keep {name}, but {name} is already kept", stage.line)
        self.carried = (carried_before | {n for n in stage.keep if n in self.tensors}) - set(stage.free)
        for name in stage.keep:
            self.carried_since.setdefault(name, t)
        steps = []
        recomputed: set[str] = set()
        for name in stage.recompute:
            if name not in self.idx.forward_ops:
                hint = " (it is a backward op)" if name in self.idx.backward_ops else ""
                self.error(f"stage {stage.backward}: recompute {name}: there is no forward op of that name{hint}", stage.line)
                continue
            if name in recomputed:
                self.error(f"stage {stage.backward}: {name} is recomputed twice", stage.line)
                continue
            recomputed.add(name)
            steps.append(("recompute", self.idx.forward_ops[name]))
        steps.append(("backward", bop))
        self.run_stage(t, stage.backward, steps, stage.line, dropped=carried_before - self.carried)
        produced = set()
        for name in recomputed:
            op = self.idx.forward_ops[name]
            produced.update(op.outputs)
            produced.update(self.fimpl(op).derived)
        for name in stage.keep:
            if name in self.tensors and self.tensors[name].kind is not TensorKind.GRADIENT and name not in carried_before:
                if name not in produced:
                    self.error(f"stage {stage.backward}: keep {name}, but this stage does not recompute it", stage.line)
        for name in set(stage.free) & carried_before:
            self.carried_since.pop(name, None)

    def step_reads(self, kind: str, op) -> list[str]:
        if kind == "backward":
            return sorted(self.reads_of_backward(op))
        impl = self.fimpl(op)
        reads = list(op.inputs)
        if kind == "recompute":
            reads.extend(sorted(impl.recompute_reads))
        return reads

    def run_stage(self, t: int, label: str, steps, line: int, dropped: set[str] = frozenset()) -> None:
        reads = [self.step_reads(kind, op) for kind, op in steps]
        last_use: dict[str, int] = {}
        for pos, names in enumerate(reads):
            for name in names:
                last_use[name] = pos
        # tensors dropped by this stage and not read in it go before the first step
        for name in sorted(dropped):
            if name not in last_use:
                self.mem.detach(name)
        for pos, ((kind, op), names) in enumerate(zip(steps, reads)):
            self.execute(t, label, pos, kind, op, names, last_use, line)

    def execute(self, t: int, label: str, pos: int, kind: str, op, reads: list[str], last_use, line: int) -> None:
        mem = self.mem
        where = "the forward pass" if t == 0 else f"stage {label}"
        for name in reads:
            if self.is_fixed(name):
                continue
            self.last_read_stage[name] = t
            if name not in mem:
                self.error(self._missing_message(where, kind, op, name), line)
            elif self.tensors[name].kind is TensorKind.GRADIENT and self.gradient_writers_left[name] > 0:
                self.error(f"{where}: {op.name} reads {name} before every op that writes it has run", line)
        live_before = mem.live
        if kind == "backward":
            impl = op.impl(self.impls[op.name])
            outputs = list(op.outputs)
            workspace, time_us, impl_name = impl.workspace, impl.time_us, impl.name
        else:
            impl = self.fimpl(op)
            outputs = list(op.outputs) + list(impl.derived)
            workspace, impl_name = impl.workspace, impl.name
            time_us = impl.time_us if kind == "forward" else impl.effective_recompute_time_us
            if kind == "recompute" and all(o in mem for o in outputs):
                self.error(f"{where}: recompute {op.name}, but all its outputs are already present", line)
        # allocation -------------------------------------------------------------------
        pending: list[tuple[str, int, bool]] = []  # (tensor, storage, keep?)
        storage_before = {name: mem.storage_of.get(name) for name in reads}  # before any in-place write
        for k, out in enumerate(outputs):
            tensor = self.tensors[out]
            duplicate = out in mem
            if kind == "backward":
                if out in impl.accumulates:
                    continue  # added into its resident storage piece by piece: nothing new
                if out == op.overwriting_output(impl):
                    sid = self._take_gradient(where, op, impl, line)
                    if sid is not None:
                        pending.append((out, sid, True))
                    continue
                merge = tensor.grad_of is not None and self.tensors[tensor.grad_of].is_fixed
                sid = mem.new(tensor.storage_bytes)
                pending.append((out, sid, not (merge or duplicate)))
                continue
            if tensor.view_of is not None:
                base = tensor.view_of
                sid = _FIXED if self.is_fixed(base) else storage_before.get(base, mem.storage_of.get(base))
                if sid is None:
                    continue  # the missing base is already reported as a missing input
                pending.append((out, sid, not duplicate))
            elif k == 0 and impl.overwrites is not None:
                target = impl.overwrites
                sid = mem.storage_of.get(target)
                if sid is None:
                    continue
                self._check_overwrite(where, op, impl, target, pos, last_use, line)
                for victim in [target, *sorted(mem.aliases(target))]:
                    mem.users[sid].discard(victim)
                    mem.storage_of.pop(victim, None)
                pending.append((out, sid, not duplicate))
            else:
                pending.append((out, mem.new(tensor.storage_bytes), not duplicate))
        peak = self.fixed + mem.live + workspace
        step = Step(len(self.result.steps), t, label, kind, op.name, impl_name, live_before, peak, 0, time_us)
        # commit outputs, then release what this stage no longer needs -----------------------
        for out, sid, keep in pending:
            if keep:
                mem.attach(out, sid)
            else:
                mem.drop_if_unused(sid)
        if kind == "backward":
            for out in outputs:
                self.gradient_writers_left[out] -= 1
            for name in reads:
                if self.tensors[name].kind is TensorKind.GRADIENT:
                    self.gradient_readers[name] -= 1
            for name in set(outputs) | set(reads):
                tensor = self.tensors[name]
                if (tensor.kind is TensorKind.GRADIENT and self.gradient_readers[name] <= 0 and self.gradient_writers_left[name] <= 0
                        and name not in self.seeds):
                    mem.detach(name)
        for name in set(reads) | set(outputs):
            if name in mem and self.tensors[name].kind is not TensorKind.GRADIENT:
                if name not in self.carried and last_use.get(name, -1) <= pos:
                    mem.detach(name)
        step = Step(step.index, t, label, kind, op.name, impl_name, live_before, peak, mem.live, time_us)
        self.result.steps.append(step)

    def _missing_message(self, where: str, kind: str, op, name: str) -> str:
        tensor = self.tensors[name]
        if tensor.kind is TensorKind.GRADIENT:
            return f"{where}: {op.name} reads {name}, which no earlier backward op has produced"
        verb = "recomputing" if kind == "recompute" else "running"
        producer = self.idx.producing_op(name)
        if name in self.idx.derived_by and self.impls.get(producer) not in self.idx.derived_by[name][1]:
            return (
                f"{where}: {verb} {op.name} needs {name}, but implementation {self.impls.get(producer)} of {producer}"
                f" does not produce it"
            )
        hint = f"keep it earlier or recompute {producer} first" if producer else "it is never produced"
        return f"{where}: {verb} {op.name} needs {name}, which is not present ({hint})"

    def _take_gradient(self, where, op, impl, line) -> int | None:
        """The storage of the gradient a backward implementation writes over (it stops
        being present); None when it is missing (reported as a missing read)."""
        target = impl.overwrites
        sid = self.mem.storage_of.get(target)
        if sid is None:
            return None
        if target in self.seeds or self.gradient_readers[target] > 1 or self.mem.aliases(target):
            self.error(f"{where}: {op.name} ({impl.name}) overwrites {target}, which is still needed after this step", line)
        self.mem.users[sid].discard(target)
        self.mem.storage_of.pop(target, None)
        return sid

    def _check_overwrite(self, where, op, impl, target, pos, last_use, line) -> None:
        if last_use.get(target, -1) > pos:
            self.error(f"{where}: {op.name} ({impl.name}) overwrites {target} in place, but a later step of this stage reads it", line)
        if target in self.carried:
            self.error(f"{where}: {op.name} ({impl.name}) overwrites {target} in place, but {target} is kept", line)
        for alias in sorted(self.mem.aliases(target)):
            if alias in self.carried or last_use.get(alias, -1) > pos:
                self.error(f"{where}: {op.name} ({impl.name}) overwrites {target}, destroying its view {alias}, which is still needed", line)

    def report_waste(self, n_stages: int) -> None:
        for name, since in sorted(self.carried_since.items()):
            if name in self.net.outputs or name not in self.carried:
                continue
            last = self.last_read_stage.get(name, 0)
            if last < n_stages and name in self.mem:
                stage = self.sched.stages[last - 1].backward if last >= 1 and last <= len(self.sched.stages) else "forward"
                self.warn(f"{name} is kept to the end but last read in {'the forward pass' if last == 0 else 'stage ' + stage}; free it there")


def simulate(
    network: Network,
    schedule: Schedule,
    *,
    constraints: ResolvedConstraints | None = None,
    fingerprint: str | None = None,
    baseline_us: float | None = None,
) -> Simulation:
    """Replay ``schedule`` on ``network``; never raises for a bad schedule.

    ``fingerprint`` (the spec's) makes a schedule for another spec an error.
    ``constraints`` adds budget, overhead and pin checks (reported as violations).
    ``baseline_us`` is the no-recompute compute time (computed when not given).
    """
    result = Simulation(network, schedule, fixed_bytes=network.fixed_bytes)
    replay = _Replay(network, schedule, result)
    if fingerprint is not None and schedule.fingerprint != fingerprint:
        replay.error(
            f"this schedule was made for another spec (fingerprint {schedule.fingerprint}, spec {fingerprint});"
            f" solve the spec again",
            schedule.line,
        )
        return result
    replay.run()
    for kind in ("forward", "recompute", "backward"):
        setattr(result, f"{kind}_us", math.fsum(step.time_us for step in result.steps if step.kind == kind))
    result.baseline_us = baseline_us if baseline_us is not None else no_recompute_compute_us(network, cheapest_impls(network))
    if result.steps:
        result.peak_step = max(result.steps, key=lambda s: (s.peak, -s.index))
        result.peak_bytes = result.peak_step.peak
    else:
        result.peak_bytes = result.fixed_bytes
    if constraints is not None and result.valid:
        _check_constraints(replay, constraints)
    return result


def _check_constraints(replay: _Replay, constraints: ResolvedConstraints) -> None:
    result, sched = replay.result, replay.sched
    if constraints.memory_budget is not None and result.peak_bytes > constraints.memory_budget:
        replay.violation(
            f"peak memory {human_bytes(result.peak_bytes)} ({result.peak_bytes} B) exceeds the budget"
            f" {human_bytes(constraints.memory_budget)} ({constraints.memory_budget} B), at {result.where()}",
            replay.stage_lines[result.peak_step.stage] if result.peak_step is not None else sched.line,
        )
    if constraints.max_overhead is not None and result.overhead > constraints.max_overhead + 1e-12:
        digits = 2 if f"{result.overhead:.2%}" != f"{constraints.max_overhead:.2%}" else 6  # rounding must not hide it
        replay.violation(f"compute overhead {result.overhead:.{digits}%} exceeds the cap {constraints.max_overhead:.{digits}%}", sched.line)
    recomputed: dict = {}
    for stage in sched.stages:
        for name in stage.recompute:
            recomputed.setdefault(name, stage)  # report the first stage that recomputes it
    for name in sorted(constraints.keep):
        producer = replay.idx.producing_op(name)
        if name not in sched.forward_keep:
            replay.violation(f"the constraints keep {name}, but the forward pass does not keep it", sched.forward_line)
        elif producer in recomputed:
            replay.violation(f"the constraints keep {name}, but stage {recomputed[producer].backward} recomputes {producer}", recomputed[producer].line)
    for name in sorted(constraints.never_recompute):
        if name in recomputed:
            replay.violation(f"the constraints never recompute {name}, but stage {recomputed[name].backward} does", recomputed[name].line)
    for op, allowed in sorted(constraints.allowed_impls.items()):
        if replay.impls.get(op) not in allowed:
            replay.violation(
                f"the constraints allow {op} only {', '.join(allowed)}, but the schedule uses {replay.impls.get(op)}",
                sched.impl_lines.get(op, 0),
            )
