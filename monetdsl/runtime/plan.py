"""From a model and example inputs to an executable plan: trace, schedule, lower.

:func:`build_plan` is the runtime's one planning step for an input signature: the
traced, costed spec (:mod:`.costed_trace`), the runtime's implementation pins (norms whose
weight has a zero, dropout kept as eager draws it), a schedule for it
(:func:`monetdsl.planning.schedule_for`: a file, or solved and cached), then the lowered
program and the executor's step plan, gathered in a :class:`RuntimePlan`.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace

import torch

from ..errors import EstimatedCostsWarning, ScheduleError, SolveError, warn_at_user
from ..ir import Schedule, Spec
from ..lowering.graphs import ArgPath, arg_path
from ..lowering.program import Program, lower
from ..planning import Constraints, clear_caches, schedule_cache, schedule_for
from ..planning.kept_backwards import adopt_kept_backwards, keep_backwards
from ..planning.kept_verdicts import adopt_autograd_verdicts, keep_autograd_verdicts
from ..search.progress import ProgressInfo
from ..tracing.kept_captures import capture_key
from ..search.simulator import Simulation, chosen_impls
from .buffer_updates import BufferUpdates, buffer_updates
from .calibrate import CALIBRATION_NOTE
from .cap_check import schedule_holding_cap
from .costed_trace import trace_for_plan, trace_for_runtime
from .eager_random import pins_keeping_eager_dropout
from .eager_reference import cap_against_eager
from .executor import StepPlan, plan_steps
from .scale_weights import pins_avoiding_from_output, weights_divided_by, zero_weight_ops
from .segment_steps import add_segment_steps, needs_segments, with_planned_segments
from .stretches import ENGINE_ROOM

#: ``Constraints``, ``trace_for_runtime``, ``schedule_for`` and ``clear_caches`` live in
#: :mod:`monetdsl.planning` and :mod:`.costed_trace`; they are importable here too
__all__ = ["RuntimePlan", "ModelTensors", "build_plan", "Constraints", "trace_for_runtime", "schedule_for", "clear_caches"]


class ModelTensors:
    """Where a plan's parameters and buffers sit in the model (from ``fixed_sources``):
    the submodule names down to the one holding each, and its name there. Looked up
    through ``_modules``, ``_parameters`` and ``_buffers`` on every step (a replaced
    parameter or submodule is seen at once), which costs a few dictionary reads per
    tensor where ``named_parameters()`` walks every module and hashes every tensor
    (0.2-0.3 ms per ResNet-18 step)."""

    def __init__(self, fixed_sources: dict):
        self.param_keys = {name: key for name, (kind, key, _) in fixed_sources.items() if kind == "param"}
        self.params = [(key, *_split_name(key)) for key in self.param_keys.values()]
        self.buffers = [(key, *_split_name(key)) for kind, key, _ in fixed_sources.values() if kind == "buffer"]

    def lookup(self, model: torch.nn.Module) -> tuple[dict, dict] | None:
        """``(parameters, buffers)`` by name, or ``None`` when one is not where it was."""
        try:
            params = {key: _submodule(model, path)._parameters[leaf] for key, path, leaf in self.params}
            buffers = {key: _submodule(model, path)._buffers[leaf] for key, path, leaf in self.buffers}
        except (KeyError, AttributeError):
            return None
        if any(t is None for t in params.values()) or any(t is None for t in buffers.values()):
            return None
        return params, buffers


def _split_name(key: str) -> tuple[tuple[str, ...], str]:
    """``"layers.0.conv1.weight"`` -> ``(("layers", "0", "conv1"), "weight")``."""
    *path, leaf = key.split(".")
    return tuple(path), leaf


def _submodule(model: torch.nn.Module, path: tuple) -> torch.nn.Module:
    for part in path:
        model = model._modules[part]
    return model


@dataclass
class RuntimePlan:
    """Everything one input signature needs to train with a schedule."""

    trace: object  # monetdsl.tracing.TraceResult
    spec: Spec
    schedule: Schedule
    simulation: Simulation
    program: Program
    steps: StepPlan
    output: str  # the network output (storage owner)
    output_path: ArgPath  # how the model's returned tensor derives from it
    input_names: tuple[str, ...]
    fixed_sources: dict  # fixed tensor name -> (kind "param" | "buffer" | "input", model name, input position)
    buffer_updates: BufferUpdates = field(default_factory=lambda: BufferUpdates())  # applied after the forward
    #: (norm op, parameter name): weights the chosen backwards divide by, checked before each step
    weight_checks: tuple = ()
    #: norms planned without their backward from the output (their weight had a zero)
    avoided: frozenset = frozenset()
    #: the schedule is autograd's own (no cap fits the runtime: Constraints.eager): the model runs itself
    runs_eager: bool = False

    @functools.cached_property
    def model_tensors(self) -> ModelTensors:
        """Where the parameters and buffers the plan reads sit in the model."""
        return ModelTensors(self.fixed_sources)

    @property
    def planned_peak(self) -> int:
        """The simulated peak, and what the stretches' engine calls add to it
        (:data:`~.stretches.ENGINE_ROOM`)."""
        return self.simulation.peak_bytes + self.steps.engine_overshoot

    @property
    def planned_activation_peak(self) -> int:
        """The planned peak above fixed memory (parameters, gradients, optimizer state, inputs)."""
        return self.planned_peak - self.simulation.fixed_bytes

    def __repr__(self) -> str:
        """What a user wants to see of a plan: its peak, its overhead and what it recomputes
        (the fields hold whole graphs; ``plan.schedule`` prints as the schedule file)."""
        from ..units import human_bytes

        name = self.spec.network.name
        if self.runs_eager:
            return f"<RuntimePlan {name}: trains as eager PyTorch (no schedule that recomputes fits the cap)>"
        recomputed = sorted({op for stage in self.schedule.stages for op in stage.recompute})
        others = [op for op, impl in self.schedule.impls.items() if impl != self.spec.network.op(op).impls[0].name]
        return (f"<RuntimePlan {name}: planned peak {human_bytes(self.planned_peak)}"
                f" ({human_bytes(self.planned_activation_peak)} above fixed memory), overhead"
                f" {self.simulation.overhead:+.1%}; recomputes {len(recomputed)} of"
                f" {len(self.spec.network.forward_ops)} forward ops; {len(others)} ops use an alternative implementation>")


def build_plan(model: torch.nn.Module, inputs, constraints: Constraints, *, optimizer: str, cache_dir=None,
               trace=None, profile: bool | None = None, avoid: frozenset | None = None, progress=None,
               segments: bool = True) -> RuntimePlan:
    """Trace (unless ``trace`` is given), schedule and lower ``model`` for these inputs.

    ``profile``: solve on costs measured on the inputs' device (True), on the roofline
    (False), or, by default, measured unless a schedule file decides already (nothing to
    solve) or the inputs are on the meta device.

    ``avoid``: norm ops whose backward may not divide by their weight (:mod:`.scale_weights`);
    by default those whose weight has a zero now. A schedule file is used as it is.
    ``cache_dir``: where solved schedules (:data:`~.schedule_cache.USER_CACHE`, a path, or
    None: memory only) and the measured costs are kept; the captured step and the
    lowering's local backwards are kept in its ``traces`` directory
    (:mod:`monetdsl.tracing.kept_captures`, :mod:`monetdsl.planning.kept_backwards`),
    so a second process plans without tracing. ``progress``: the search's progress
    callback. ``segments``: under a budget the ops one by one cannot meet, run the widest
    blocks of per-sample ops as batch-sliced segments (:mod:`.segment_steps`); a
    ``trace`` given is used as it is."""
    schedule_dir = schedule_cache.resolve_cache_dir(cache_dir)  # measurements: their own default for USER_CACHE
    kept_dir = None if schedule_dir is None else schedule_dir / "traces"  # captured steps and their local backwards
    capture = capture_key(model, inputs, "output") if kept_dir is not None else None
    adopted = adopt_kept_backwards(kept_dir, capture)
    if trace is None:
        trace = trace_for_plan(model, inputs, constraints, optimizer=optimizer, profile=profile,
                               cache_dir=None if cache_dir is schedule_cache.USER_CACHE else cache_dir, capture_cache=kept_dir)
        if segments and constraints.schedule is None and needs_segments(trace, constraints.budget):
            trace = with_planned_segments(trace, inputs, constraints.budget)
            segments = False  # planned with them already
    else:
        segments = False  # a trace given is used as it is
    asked = constraints
    spec = trace.spec
    if progress is not None:
        progress(ProgressInfo("monetdsl", f"traced {len(spec.network.forward_ops)} ops, planning", 0.0, None, None, None, "us"))
    facts, names = trace.built.facts, trace.built.value_names
    sources = {}
    for node in facts.graph.nodes:
        if node.op == "placeholder" and node in names:
            ph = facts.captured.placeholders[node.name]
            sources[names[node]] = (ph.kind, ph.name, ph.index)
    network = spec.network
    if isinstance(constraints.schedule, (str, os.PathLike)) and not _on_meta(inputs) \
            and not trace.cost_model.startswith("measured"):
        warn_at_user(f"monetdsl: this schedule was solved on estimated costs ({trace.cost_model.split(' (')[0]}), not on"
                     " this machine's, so its peak here can differ from its plan (library workspaces, this device's"
                     " kernels); monetdsl.optimize(model, inputs, budget=...) plans on measured costs",
                     EstimatedCostsWarning)
    if constraints.schedule is not None:
        avoid = frozenset()
    elif avoid is None:
        avoid = zero_weight_ops(weights_divided_by(trace, None, sources), dict(model.named_parameters()))
    pins = pins_avoiding_from_output(network, avoid)
    if constraints.schedule is None:
        pins += pins_keeping_eager_dropout(network)
    if pins:
        spec = replace(spec, constraints=replace(spec.constraints, impls=spec.constraints.impls + pins))
    asked_cap = constraints.max_overhead if constraints.schedule is None else None
    store_dir = None if cache_dir is schedule_cache.USER_CACHE else cache_dir
    constraints = cap_against_eager(model, inputs, trace, spec, constraints, optimizer=optimizer, cache_dir=store_dir)
    try:
        schedule, simulation = schedule_for(spec, constraints, schedule_dir, costs=trace.cost_model, progress=progress)
    except SolveError:
        sliced = with_planned_segments(trace, inputs, asked.budget) if segments and asked.schedule is None else trace
        if sliced is trace:
            raise
        return build_plan(model, inputs, asked, optimizer=optimizer, cache_dir=cache_dir, trace=sliced, profile=profile,
                          avoid=avoid, progress=progress)
    if asked_cap is not None and constraints.max_overhead is not None and CALIBRATION_NOTE in trace.cost_model:
        schedule, simulation = schedule_holding_cap(model, inputs, trace, spec, constraints, (schedule, simulation), asked_cap,
                                                    optimizer=optimizer, schedule_dir=schedule_dir, cache_dir=store_dir,
                                                    progress=progress)
    impls = chosen_impls(network, schedule)
    verdicts = adopt_autograd_verdicts(kept_dir, capture)  # what autograd saves: checked once, kept
    known = 0 if verdicts is None else len(verdicts)
    program = lower(trace, network, impls, verdicts)
    add_segment_steps(trace, network, impls, program)
    keep_autograd_verdicts(kept_dir, capture, verdicts, known)
    keep_backwards(kept_dir, capture, adopted)  # and, at exit, the owner adapters its steps traced
    steps = plan_steps(network, schedule, program, _engine_room(simulation, constraints))
    output, output_path = _output_of(trace, network)
    input_names = tuple(n for n, (kind, _, _) in sources.items() if kind == "input")
    updates = buffer_updates(trace)
    return RuntimePlan(trace, spec, schedule, simulation, program, steps, output, output_path, input_names, sources, updates,
                       weight_checks=weights_divided_by(trace, impls, sources), avoided=frozenset(avoid),
                       runs_eager=constraints.eager)


def _engine_room(simulation: Simulation, constraints: Constraints) -> int:
    """The bytes a plan's stretches may add to its simulated peak: a share of the peak
    above fixed memory (:data:`~.stretches.ENGINE_ROOM`), never past a budget; none for
    a caller's schedule (the budget it was solved for is not known here), but as much
    for one monetdsl times as a solved plan's (``Constraints.engine_room``)."""
    if constraints.schedule is not None and not constraints.engine_room:
        return 0
    room = int(ENGINE_ROOM * (simulation.peak_bytes - simulation.fixed_bytes))
    return room if constraints.budget is None else max(0, min(room, constraints.budget - simulation.peak_bytes))


def _on_meta(inputs) -> bool:
    """Inputs on the meta device: nothing runs, so there is no machine to differ from."""
    return any(isinstance(t, torch.Tensor) and t.is_meta for t in inputs)


def _output_of(trace, network) -> tuple[str, ArgPath]:
    """The network output and the view chain from it to the tensor the model returns."""
    facts, names = trace.built.facts, trace.built.value_names
    (output,) = network.outputs
    loss_records = [r for r in trace.built.records if r.name.startswith("loss.")]
    if loss_records:
        returned = loss_records[0].node.args[0]
    else:
        returned = facts.loss
    path = arg_path(facts, names, returned)
    if path.owner != output:
        raise ScheduleError(f"the model's output {path.owner} is not the network output {output}")
    return output, path
