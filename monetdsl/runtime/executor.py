"""The executor: one training step of a schedule, step by step, freeing as it goes.

Like ``torch.fx`` it runs a list of steps over an environment of values, but the
environment holds IR tensors (storage owners, by name) and the order, the recomputations
and the release points are the schedule's, decided once by :func:`plan_steps` with
exactly the simulator's rules (``docs/memory-model.md``); the steps then run as the
straight-line code :mod:`monetdsl.runtime.straight_line` writes from the plan:

* stage 0 runs every forward op; stage t recomputes its list, then runs one backward op;
* after each step a non-gradient tensor is released when no later step of the stage
  reads it and it is not carried (forward ``keep``, stage ``keep``, network outputs);
  a tensor a stage ``free``s without reading is released before the stage starts;
* a gradient lives from its first writer to its last reader; a later writer's result is
  added into it; a parameter's gradient goes to ``.grad`` (or through autograd, when
  something listens: DDP, gradient hooks); a step that accumulates a parameter gradient
  adds it into ``.grad`` itself;
* an in-place implementation's output takes its input's storage, and the input is gone.

So the live IR bytes after every step equal the simulator's (tested), and the real peak
follows the planned one.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..graph import index
from ..ir import Network, Schedule, TensorKind, grad_name
from ..search.simulator import chosen_impls
from ..lowering.program import AccumulatedGrad, GradTarget, Program, StepFn
from .straight_line import StraightLine, generate
from .stretches import composite_steps, find_stretches

__all__ = ["PlannedStep", "StepPlan", "plan_steps", "Executor", "StepState"]


@dataclass(frozen=True)
class PlannedStep:
    """A step of the schedule with what to release around it."""

    stage: int
    kind: str  # "forward", "recompute" or "backward"
    step: StepFn
    release_before: tuple[str, ...] = ()
    release_after: tuple[str, ...] = ()
    keep_existing: tuple[str, ...] = ()  # recomputed outputs already present: the new value is dropped
    # backward steps, decided once (the simulator's counters, run ahead of time):
    accumulate: frozenset = frozenset()  # gradients this step writes that an earlier writer created
    last_param_writes: frozenset = frozenset()  # parameter gradients this step writes last
    grad_release: tuple[str, ...] = ()  # gradients whose last reader and writer this step is


@dataclass
class StepPlan:
    """Every step of one training step, and facts the executor needs about gradients."""

    forward: list[PlannedStep]
    backward: list[PlannedStep]
    seeds: tuple[str, ...]
    param_grads: dict[str, str]  # gradient name -> fixed tensor it belongs to
    writers: Counter  # gradient name -> number of backward ops writing it
    carried_after_forward: tuple[str, ...]
    code: StraightLine | None = None  # the steps as straight-line Python, stretches under autograd (made by plan_steps)
    stretches: tuple = ()  # runs of stored ops whose backward autograd's engine runs (:mod:`.stretches`)
    stretched: list[PlannedStep] | None = None  # ``backward`` with each stretch's stages as one step
    stepwise_code: StraightLine | None = None  # every step on its own (for observers: each step seen)
    engine_overshoot: int = 0  # bytes the stretches' engine calls reach above the simulated peak

    @property
    def whole_autograd(self) -> bool:
        """Whether the whole backward is one stretch from the network's output with nothing
        entered from outside: autograd's graph is then the whole training step, and the
        output can carry it to the caller's ``backward()`` (one engine pass, as eager)."""
        if self.stretched is None or len(self.stretched) != 1 or len(self.stretches) != 1:
            return False
        (stretch,) = self.stretches
        return not stretch.entered and len(stretch.roots) == 1 and grad_name(stretch.roots[0]) in self.seeds


def plan_steps(network: Network, schedule: Schedule, program: Program, engine_room: int = 0) -> StepPlan:
    """The executable order of a (valid) schedule with the simulator's release points;
    ``engine_room``: the bytes its stretches' engine calls may add to the planned peak
    (:func:`~.stretches.find_stretches`; what they add is ``StepPlan.engine_overshoot``)."""
    idx = index(network)
    tensors = network.tensors
    impls = chosen_impls(network, schedule)
    outputs = set(network.outputs)
    carried = set(schedule.forward_keep) | outputs

    def run_stage(t: int, steps: list[tuple[str, StepFn]], carried: set, dropped: set, present: set) -> list[PlannedStep]:
        reads = [s.reads for _, s in steps]
        last_use: dict[str, int] = {}
        for pos, names in enumerate(reads):
            for name in names:
                last_use[name] = pos
        before = tuple(sorted(n for n in dropped if n not in last_use and n in present))
        present -= set(before)
        planned = []
        for pos, (kind, step) in enumerate(steps):
            existing = ()
            if kind == "recompute":
                existing = tuple(w for w in step.writes if w in present)
            if step.overwrites is not None:
                present.discard(step.overwrites)
            present.update(w for w in step.writes if not tensors[w].is_fixed and tensors[w].kind is not TensorKind.GRADIENT)
            after = []
            for name in dict.fromkeys((*step.reads, *step.writes)):
                tensor = tensors[name]
                if tensor.is_fixed or tensor.kind is TensorKind.GRADIENT or name not in present:
                    continue
                if name not in carried and last_use.get(name, -1) <= pos:
                    after.append(name)
                    present.discard(name)
            planned.append(PlannedStep(t, kind, step, before if pos == 0 else (), tuple(after), existing))
        return planned

    present: set[str] = set()
    forward = run_stage(0, [("forward", program.forward[n]) for n in idx.forward_order], carried, set(), present)
    backward: list[PlannedStep] = []
    for t, stage in enumerate(schedule.stages, start=1):
        before = set(carried)
        carried = (before | set(stage.keep)) - set(stage.free)
        steps = [("recompute", program.recompute[n]) for n in stage.recompute]
        steps.append(("backward", program.backward[stage.backward]))
        backward.extend(run_stage(t, steps, carried, before - carried, present))
    writers = Counter()
    for bop in network.backward_ops:
        writers.update(bop.outputs)
    param_grads = {g: t.grad_of for g, t in tensors.items() if t.kind is TensorKind.GRADIENT and t.grad_of and tensors[t.grad_of].is_fixed}
    backward = _gradient_lifetimes(backward, tensors, writers, param_grads, set(idx.seeds()))
    del impls
    plan = StepPlan(forward, backward, idx.seeds(), param_grads, writers, tuple(sorted(set(schedule.forward_keep) | outputs)))
    stretches, plan.engine_overshoot = find_stretches(network, schedule, program, backward, engine_room)
    plan.stretches = tuple(stretches)
    plan.stretched = composite_steps(backward, list(plan.stretches), program.layouts) if plan.stretches else None
    plan.code = generate(plan, {n for n, t in tensors.items() if t.is_fixed}, stretched=True)
    return plan


def _gradient_lifetimes(steps: list[PlannedStep], tensors, writers: Counter, param_grads: dict, seeds: set) -> list[PlannedStep]:
    """Fill in, for every backward step, which gradients it adds into, which parameter
    gradients it writes last and which gradients die after it (first writer to last reader)."""
    readers = Counter()
    for planned in steps:
        if planned.kind == "backward":
            readers.update(n for n in planned.step.reads if tensors[n].kind is TensorKind.GRADIENT)
    writers_left = Counter(writers)
    written: set[str] = set()
    out = []
    for planned in steps:
        if planned.kind != "backward":
            out.append(planned)
            continue
        step = planned.step
        accumulate = frozenset(n for n in step.writes if n in written and n not in param_grads)
        last = set()
        for name in step.writes:
            writers_left[name] -= 1
            written.add(name)
            if name in param_grads and writers_left[name] == 0:
                last.add(name)
        grad_reads = [n for n in step.reads if tensors[n].kind is TensorKind.GRADIENT]
        for name in grad_reads:
            readers[name] -= 1
        release = tuple(dict.fromkeys(n for n in (*step.writes, *grad_reads)
                                      if n not in param_grads and n not in seeds and readers[n] <= 0 and writers_left[n] <= 0))
        out.append(PlannedStep(planned.stage, planned.kind, step, planned.release_before, planned.release_after,
                               planned.keep_existing, accumulate, frozenset(last), release))
    return out


@dataclass
class StepState:
    """What one forward call leaves for its backward: the carried tensors."""

    env: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)  # the model's parameters by name, at the forward
    hooks: bool = False
    graph: dict = field(default_factory=dict)  # per stretch: what its forward recorded; the parameters it reads
    code: StraightLine | None = None  # the code the forward ran (the backward runs the same)


class Executor:
    """Runs a :class:`StepPlan`. ``fixed`` supplies parameters, buffers and inputs by name.

    The steps run as straight-line Python generated once per plan
    (:mod:`monetdsl.runtime.straight_line`): the rules above, with every decision that
    does not depend on the tensors taken when the code is written.

    ``observe(step, env)``, when given, is called after every step (tests compare the
    live IR bytes with the simulator's); when it has a ``before_step`` method, that is
    called with the same arguments right before the step runs, after the releases that
    precede it (tests measure each step's own peak between the two calls)."""

    def __init__(self, network: Network, plan: StepPlan, observe: Callable | None = None):
        self.network = network
        self.plan = plan
        self.observe = observe
        self.before = getattr(observe, "before_step", None)

    def _code(self, stretched: bool) -> StraightLine:
        """The plan's code: stretches under autograd (``stretched``, without an observer),
        or every step on its own (an observer sees every step; a stretch's backward is one
        engine call no observer could see into)."""
        plan = self.plan
        if (not stretched or self.observe is not None) and plan.stretches:
            if plan.stepwise_code is None:
                plan.stepwise_code = generate(plan, self._fixed_names(), stretched=False)
            return plan.stepwise_code
        if plan.code is None:  # a plan made by hand, not by plan_steps
            plan.code = generate(plan, self._fixed_names(), stretched=True)
        return plan.code

    def _fixed_names(self) -> set[str]:
        return {n for n, t in self.network.tensors.items() if t.is_fixed}

    # -- forward ---------------------------------------------------------------------------
    def forward(self, fixed: dict, param_of: Callable[[str], torch.Tensor] | None = None, *, hooks: bool = False) -> StepState:
        """Stage 0. ``param_of(name)``: the model's parameter of that name, which the
        plan's stretches read (so autograd's engine accumulates its ``.grad``); without
        it, or when gradient ``hooks`` (DDP) listen, every step runs on its own."""
        code = self._code(param_of is not None and not hooks)
        state = StepState(fixed=fixed, hooks=hooks, code=code)
        if code is self.plan.code:
            for stretch in self.plan.stretches:
                for name in stretch.params:
                    param = state.graph[name] = param_of(name)
                    if param is None:
                        raise RuntimeError(f"{name}: the model has no such parameter any more")
        grad_mode = torch.is_grad_enabled()
        try:
            code.forward(state.env, fixed, self.observe, self.before, state.graph)
        finally:  # a stretch's ops turn grad mode on; an error inside one must not leave it on
            torch._C._set_grad_enabled(grad_mode)
        return state

    # -- backward --------------------------------------------------------------------------
    def backward(self, state: StepState, seeds: dict, param_of: Callable[[str], torch.Tensor]) -> None:
        """Run every backward stage. ``seeds``: gradient name -> tensor for the network
        outputs; ``param_of(name)`` gives the parameter whose ``.grad`` receives a gradient."""
        env = state.env
        env.update(seeds)  # held by the caller until the backward ends, as the memory model says
        sink = _GradientSink(self.plan, param_of, state.hooks)
        code = state.code if state.code is not None else self._code(False)
        code.backward(env, state.fixed, sink, self.observe, self.before, state.graph)
        env.clear()
        state.graph.clear()


class _GradientSink:
    """Delivers gradients of parameters (and of any fixed tensor that needs one).

    Without listeners, ``.grad`` is set (taking the tensor, as autograd's accumulation
    does) or added into in place, so the temporary is released at once. When DDP or
    gradient hooks listen, the whole gradient goes through ``torch.autograd.backward`` on
    the parameter at its last writer, which runs them as eager training would (a shared
    parameter's partial sum is then held between its writers: memory the plan does not count)."""

    def __init__(self, plan: StepPlan, param_of: Callable[[str], torch.Tensor], hooks: bool):
        self.plan = plan
        self.param_of = param_of
        self.hooks = hooks
        self.pending: dict[str, torch.Tensor] = {}

    def target(self, grad: str, acc: AccumulatedGrad, *, adoptable: bool = False) -> GradTarget:
        """Where an accumulating step adds ``grad``: the parameter's ``.grad`` (allocated
        here when there is none, as autograd's first accumulation would; then written, not
        added, when the step writes every element, else zeroed first). A step that can
        make the gradient whole (``adoptable``) and writes all of it gets, when there is
        no ``.grad``, a target to adopt instead: its gradient becomes the ``.grad``. With
        listeners the step fills a tensor of its own, delivered through autograd by
        :meth:`accumulated` (the gradient-sized temporary the plan saved is then back)."""
        param = self.param_of(self.plan.param_grads[grad])
        if param is None:
            raise RuntimeError(f"{grad}: the model has no parameter {self.plan.param_grads[grad]} to add it into")
        own = self.hooks or not param.requires_grad
        if not own and param.grad is not None:
            return GradTarget(param.grad)
        if not own and adoptable and acc.covers:
            return GradTarget(None, overwrite=True, adopt=lambda value: self.write(grad, value, last=False, fresh=True))
        fresh = torch.empty_strided(param.size(), param.stride(), dtype=param.dtype, device=param.device)
        if not acc.covers:
            fresh.zero_()
        if not own:
            param.grad = fresh
        return GradTarget(fresh, overwrite=acc.covers)

    def accumulated(self, grad: str, target: GradTarget, *, last: bool) -> None:
        """After an accumulating step: with listeners, its gradient goes through autograd."""
        if self.hooks:
            self.write(grad, target.tensor, last=last, fresh=True)

    def write(self, grad: str, value: torch.Tensor, *, last: bool, fresh: bool) -> None:
        param = self.param_of(self.plan.param_grads[grad])
        if param is None or not param.requires_grad:
            return
        if self.hooks:
            # listeners (DDP's reducer, gradient hooks) must see the whole gradient once, as
            # eager autograd shows it: a shared parameter's partial sums wait for its last writer
            if grad in self.pending:
                value = self.pending.pop(grad) + value
            if not last:
                self.pending[grad] = value if fresh else value.clone()
                return
            torch.autograd.backward([param], [value])
            return
        if param.grad is None:
            if fresh and value.stride() == param.stride() and value.dtype == param.dtype and value._base is None:
                param.grad = value
            else:
                fresh = torch.empty_strided(param.size(), param.stride(), dtype=param.dtype, device=param.device)
                param.grad = fresh.copy_(value)
        else:
            param.grad.add_(value)
