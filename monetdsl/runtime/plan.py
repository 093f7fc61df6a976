"""From a model and example inputs to an executable plan: trace, schedule, lower.

The runtime traces with ``loss="output"``: the spec ends at the model's output (the
training loop computes its loss), or at the loss itself for a model that returns one.
A schedule comes from a file (refused, with a clear message, when its fingerprint is not
this graph's), or from :func:`monetdsl.search.solve.solve` under a budget or an overhead
cap; solved schedules are cached by the graph's fingerprint, the cost model and the
constraints (:mod:`.schedule_cache`: in memory and, with ``cache_dir``, as ``.monet`` files).
"""
from __future__ import annotations

import functools
import hashlib
import operator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from ..errors import Diagnostic, ScheduleError, SolveError
from ..grammar import load_schedule
from ..io import atomic_write
from ..ir import Schedule, Spec
from ..search.progress import ProgressInfo
from ..search.simulator import Simulation, chosen_impls, simulate
from ..search.solve import solve
from ..units import human_bytes
from ..validate import resolve_constraints
from .executor import StepPlan, plan_steps
from ..tracing.joint import packet_name
from ..lowering.graphs import ArgPath, arg_path, call_node
from ..lowering.program import Program, lower
from .eager_random import pins_keeping_eager_dropout
from .eager_reference import cap_against_eager
from .scale_weights import pins_avoiding_from_output, weights_divided_by, zero_weight_ops
from . import schedule_cache

__all__ = ["RuntimePlan", "Constraints", "build_plan", "trace_for_runtime", "schedule_for", "clear_caches"]


@dataclass(frozen=True)
class Constraints:
    """What the caller asked for: a budget (bytes), an overhead cap, a schedule file, a method,
    the searching methods' time limit (seconds; None: their default, 60 s)."""

    budget: int | None = None
    max_overhead: float | None = None
    schedule: str | Schedule | None = None  # a .monet file, or a Schedule object
    method: str = "auto"
    time_limit: float | None = None

    def describe(self) -> str:
        parts = []
        if self.budget is not None:
            parts.append(f"budget {human_bytes(self.budget)}")
        if self.max_overhead is not None:
            parts.append(f"overhead <= {self.max_overhead:.1%}")
        return ", ".join(parts) or "no constraint"


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

    @functools.cached_property
    def model_tensors(self) -> ModelTensors:
        """Where the parameters and buffers the plan reads sit in the model."""
        return ModelTensors(self.fixed_sources)

    @property
    def planned_peak(self) -> int:
        return self.simulation.peak_bytes

    @property
    def planned_activation_peak(self) -> int:
        """The planned peak above fixed memory (parameters, gradients, optimizer state, inputs)."""
        return self.simulation.peak_bytes - self.simulation.fixed_bytes


def clear_caches() -> None:
    """Forget the schedules kept in memory (the cache directory's files stay)."""
    schedule_cache.forget()


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def trace_for_runtime(model: torch.nn.Module, inputs, *, optimizer: str, device: str | None = None, profile: bool = False,
                      calibrate: bool = True):
    """Trace ``model`` on ``inputs`` ending at its output; the cost model follows the inputs'
    device (its roofline preset, or with ``profile`` every op and alternative timed on it,
    then, with ``calibrate``, corrected by timing store-all training steps in place:
    :mod:`.calibrate`)."""
    from ..costs import trace_model
    from ..tracing.capture import CaptureError

    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
    preset = device or ("cuda" if on_cuda else "cpu")
    try:
        traced = trace_model(model, list(inputs), loss="output", device=preset, optimizer=optimizer, profile=profile)
    except CaptureError:
        if preset != "cuda" or profile:
            raise
        return trace_model(model, list(inputs), loss="output", device="A100", optimizer=optimizer)
    if profile and calibrate:
        from .calibrate import calibrate as calibrate_in_place

        traced = calibrate_in_place(model, list(inputs), traced, optimizer=optimizer).trace
    return traced


def timed_trace(model: torch.nn.Module, inputs, *, optimizer: str, cache_dir: str | None = None):
    """``model`` traced with every op and implementation measured on its inputs' device
    (time and allocator-measured memory, alone and in place: :mod:`.measured_costs`), the
    measurements kept by op signature in ``cache_dir`` (default: the user's cache
    directory), so only ops never measured on this machine are run."""
    from ..costs import MeasurementStore
    from .measured_costs import measured_trace

    plain = trace_for_runtime(model, inputs, optimizer=optimizer)
    store = MeasurementStore(cache_dir) if cache_dir is not None else MeasurementStore()
    return measured_trace(model, inputs, plain, optimizer=optimizer, store=store)


def schedule_for(spec: Spec, constraints: Constraints, cache_dir: str | Path | None = None, costs: str = "",
                 progress=None) -> tuple[Schedule, Simulation]:
    """A schedule for ``spec``: the file the caller named, or a solved (cached) one.

    Solved schedules are cached by the graph's fingerprint, the constraints and ``costs``
    (the cost model's description): a schedule solved on the roofline is not reused when
    the caller asked for timed costs, while one solved on this machine's timings is reused
    by the next run on this machine, whose timings differ by noise only. ``progress``: the
    search's progress callback (:mod:`monetdsl.search.progress`)."""
    if constraints.schedule is not None:
        return _from_file(spec, constraints.schedule)
    key = schedule_cache.ScheduleKey(
        spec.fingerprint, _short_hash(costs), constraints.budget, constraints.max_overhead, constraints.method,
        _short_hash(repr(spec.constraints.impls)) if spec.constraints.impls else "")
    directory = None if cache_dir is None else Path(cache_dir)
    cached = schedule_cache.recall(spec, key, directory)
    if cached is not None:
        return cached
    result = solve(spec, constraints.method, memory_budget=constraints.budget, max_overhead=constraints.max_overhead,
                   time_limit=constraints.time_limit, progress=progress)
    if not result.success:
        known = {"min_feasible_budget_exact": result.min_feasible_budget_exact} if result.min_feasible_budget is not None else {}
        if result.details.get("min_budget_lower_bound") is not None:
            known["min_budget_lower_bound"] = result.details["min_budget_lower_bound"]
        raise SolveError(f"{spec.network.name}: {result.message}", min_feasible_budget=result.min_feasible_budget, details=known)
    found = (result.schedule, result.simulation)
    schedule_cache.keep(spec, key, found, directory)
    return found


def _from_file(spec: Spec, source) -> tuple[Schedule, Simulation]:
    schedule = source if isinstance(source, Schedule) else load_schedule(source)
    path = schedule.path
    if schedule.fingerprint != spec.fingerprint:
        raise ScheduleError(Diagnostic(
            f"this schedule was made for another graph (fingerprint {schedule.fingerprint}); the model traces to"
            f" {spec.fingerprint}. Solve again for this model and these inputs (monetdsl.optimize with a budget,"
            f" or monetdsl solve on its spec)", path, schedule.line))
    return schedule, _checked(spec, schedule)


def _checked(spec: Spec, schedule: Schedule) -> Simulation:
    constraints = resolve_constraints(spec.network, spec.constraints, path=spec.path, source=spec.source)
    simulation = simulate(spec.network, schedule, constraints=constraints, fingerprint=spec.fingerprint)
    if not simulation.valid:
        raise ScheduleError(simulation.errors)
    return simulation


def _trace_for_plan(model, inputs, constraints: Constraints, *, optimizer: str, cache_dir, profile: bool | None):
    """The trace a plan is made from. ``profile`` None (the default): measured costs on a
    real device when a schedule is to be solved; with a schedule file, the roofline trace
    (no op runs), or the measured one when the file was solved on measured costs (its
    fingerprint, which names the workspaces, is then the measured trace's: the
    measurements of this machine are in the store, so nothing runs again)."""
    on_device = not any(isinstance(t, torch.Tensor) and t.is_meta for t in inputs)
    if profile or (profile is None and constraints.schedule is None and on_device):
        return timed_trace(model, inputs, optimizer=optimizer, cache_dir=cache_dir)
    plain = trace_for_runtime(model, inputs, optimizer=optimizer)
    if profile is None and constraints.schedule is not None and on_device:
        wanted = _fingerprint_of(constraints.schedule)
        if wanted not in (None, plain.spec.fingerprint):
            measured = timed_trace(model, inputs, optimizer=optimizer, cache_dir=cache_dir)
            if measured.spec.fingerprint == wanted:
                return measured
    return plain


def _fingerprint_of(schedule) -> str | None:
    """The fingerprint a schedule (object or file) names; None when the file cannot be read
    (:func:`_from_file` then says why)."""
    if isinstance(schedule, Schedule):
        return schedule.fingerprint
    try:
        return load_schedule(schedule).fingerprint
    except Exception:  # noqa: BLE001 - reported where the schedule is used
        return None


def build_plan(model: torch.nn.Module, inputs, constraints: Constraints, *, optimizer: str, cache_dir=None,
               trace=None, profile: bool | None = None, avoid: frozenset | None = None, progress=None) -> RuntimePlan:
    """Trace (unless ``trace`` is given), schedule and lower ``model`` for these inputs.

    ``profile``: solve on costs measured on the inputs' device (True), on the roofline
    (False), or, by default, measured unless a schedule file decides already (nothing to
    solve) or the inputs are on the meta device.

    ``avoid``: norm ops whose backward may not divide by their weight (:mod:`.scale_weights`);
    by default those whose weight has a zero now. A schedule file is used as it is.
    ``cache_dir``: where solved schedules (:data:`~.schedule_cache.USER_CACHE`, a path, or
    None: memory only) and the measured costs are kept. ``progress``: the search's progress
    callback."""
    schedule_dir = schedule_cache.resolve_cache_dir(cache_dir)  # measurements: their own default for USER_CACHE
    if trace is None:
        trace = _trace_for_plan(model, inputs, constraints, optimizer=optimizer, profile=profile,
                                cache_dir=None if cache_dir is schedule_cache.USER_CACHE else cache_dir)
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
    if constraints.schedule is not None:
        avoid = frozenset()
    elif avoid is None:
        avoid = zero_weight_ops(weights_divided_by(trace, None, sources), dict(model.named_parameters()))
    pins = pins_avoiding_from_output(network, avoid)
    if constraints.schedule is None:
        pins += pins_keeping_eager_dropout(network)
    if pins:
        spec = replace(spec, constraints=replace(spec.constraints, impls=spec.constraints.impls + pins))
    constraints = cap_against_eager(model, inputs, trace, spec, constraints, optimizer=optimizer,
                                    cache_dir=None if cache_dir is schedule_cache.USER_CACHE else cache_dir)
    schedule, simulation = schedule_for(spec, constraints, schedule_dir, costs=trace.cost_model, progress=progress)
    impls = chosen_impls(network, schedule)
    program = lower(trace, network, impls)
    steps = plan_steps(network, schedule, program)
    output, output_path = _output_of(trace, network)
    input_names = tuple(n for n, (kind, _, _) in sources.items() if kind == "input")
    updates = buffer_updates(trace)
    return RuntimePlan(trace, spec, schedule, simulation, program, steps, output, output_path, input_names, sources, updates,
                       weight_checks=weights_divided_by(trace, impls, sources), avoided=frozenset(avoid))


@dataclass
class BufferUpdates:
    """Buffers the step writes besides batch norm's running statistics, applied once after
    the forward pass: ``increments`` (buffer -> number: ``num_batches_tracked += 1``, one
    ``torch._foreach_add_`` for all of them instead of a call per batch norm) and
    ``general`` (``(buffer, f(fixed) -> new value)`` pairs, copied in)."""

    increments: dict = field(default_factory=dict)
    general: list = field(default_factory=list)

    def apply(self, fixed: dict) -> None:
        groups: dict = {}
        for name, amount in self.increments.items():
            tensor = fixed[name]
            groups.setdefault((amount, tensor.device, tensor.dtype), []).append(tensor)
        for (amount, _, _), tensors in groups.items():
            torch._foreach_add_(tensors, amount)
        for name, update in self.general:
            fixed[name].copy_(update(fixed))


def buffer_updates(trace) -> BufferUpdates:
    """The buffers the traced step writes besides batch norm's running statistics (which
    the batch norm forward updates in place), e.g. ``num_batches_tracked += 1``."""
    facts, names = trace.built.facts, trace.built.value_names
    graph = facts.graph
    primals = [n for n in graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    outputs = list(next(n for n in graph.nodes if n.op == "output").args[0])
    n_forward = len(outputs) - len(primals)
    updates = BufferUpdates()
    for value in outputs[: max(n_forward - 1, 0)]:
        if not isinstance(value, fx.Node):
            continue
        if value.target is operator.getitem and packet_name(value.args[0].target) == "_native_batch_norm_legit_functional":
            continue  # running statistics: the batch norm forward updates them
        sources = {a for a in _ancestors(value) if a.op == "placeholder"}
        computed = [a for a in _ancestors(value) if a.op == "call_function"]
        buffers = [a for a in sources if facts.captured.placeholders[a.name].kind == "buffer"]
        if len(buffers) != 1 or any(facts.captured.placeholders[a.name].kind != "buffer" for a in sources):
            raise ScheduleError(f"the model updates a buffer from {value.name} ({len(sources)} graph inputs); the runtime"
                                " supports buffer updates computed from the buffer alone")
        amount = _increment(value, buffers[0])
        if amount is not None:
            updates.increments[names[buffers[0]]] = amount
        else:
            updates.general.append((names[buffers[0]], _evaluator(list(graph.nodes), computed, value, names)))
    return updates


def _increment(value: fx.Node, buffer: fx.Node):
    """``n`` when ``value`` is ``buffer + n`` for a Python number ``n`` (a counter), else None."""
    if value.target is not torch.ops.aten.add.Tensor or value.kwargs or len(value.args) != 2:
        return None
    base, amount = value.args
    if base is not buffer or isinstance(amount, bool) or not isinstance(amount, (int, float)):
        return None
    return amount


def _ancestors(node: fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _evaluator(order: list, computed: list, value: fx.Node, names: dict) -> Callable:
    members = [n for n in order if n in set(computed)]

    def run(fixed: dict) -> torch.Tensor:
        env = {}

        def value_of(n):
            return env[n] if n in env else fixed[names[n]]

        for node in members:
            env[node] = call_node(node, value_of)
        return env[value]

    return run


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
