"""The module users train: the original model, run by a schedule.

:class:`OptimizedModule` holds the original model (so ``parameters()``, ``state_dict()``
and an optimizer built on the model keep working, as with ``torch.compile``) and, per
input signature (shapes, dtypes, devices, autocast state), a :class:`~monetdsl.runtime.plan.RuntimePlan`.
A training call runs the schedule's forward pass inside one ``torch.autograd.Function``
and returns the model's output; the caller's ``loss.backward()`` reaches that function,
which runs the backward stages and writes every parameter's ``.grad``. In ``eval()``
mode or under ``torch.no_grad()`` the model simply runs eagerly.

Planning takes seconds (a minute for large graphs on a cold cache), so it should not
happen unnoticed inside a training loop: a training call with an input signature that has
no plan yet warns (:class:`PlanningWarning`, once per signature) before it plans; give
``monetdsl.optimize`` every signature the loop will see (``example_inputs``) to plan them
up front. Searches show their progress on a terminal's stderr.
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
import os
import time
import warnings
from typing import Any

import torch

from ..errors import MonetError, PlanningWarning
from ..search.progress import ProgressInfo, StderrProgress
from .executor import Executor, StepState
from ..planning import Constraints
from .plan import RuntimePlan, build_plan
from .scale_weights import zero_weight_ops

__all__ = ["OptimizedModule", "RuntimeUsageError", "PlanningWarning"]


class RuntimeUsageError(MonetError):
    """The optimized module was used in a way the runtime does not support."""


def _describe(inputs) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}" if isinstance(t, torch.Tensor)
                     else repr(t) for t in inputs)


def _autocast_state() -> tuple:
    state = [("cpu", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))]
    if torch.cuda.is_available():
        state.append(("cuda", torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
    return tuple(state)


def _signature(inputs) -> tuple:
    return tuple((tuple(t.shape), t.dtype, str(t.device)) if isinstance(t, torch.Tensor) else ("const", repr(t)) for t in inputs)


def _ddp_active() -> bool:
    try:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel._get_active_ddp_module() is not None
    except (ImportError, AttributeError):
        return False


class _ScheduledStep(torch.autograd.Function):
    """Forward: the schedule's stage 0. Backward: its stages, writing parameter gradients."""

    @staticmethod
    def forward(ctx, module, plan, anchor, *inputs):
        state, out = module._forward_pass(plan, inputs)
        ctx.module, ctx.plan, ctx.state = module, plan, state
        if not out.is_floating_point():
            ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        state, plan, module = ctx.state, ctx.plan, ctx.module
        ctx.state = None
        if state is None:
            raise RuntimeError("monetdsl: backward through the same forward call twice (retain_graph is not supported)")
        module._backward_pass(plan, state, grad)
        return (None, None, None) + (None,) * len(plan.input_names)


class OptimizedModule(torch.nn.Module):
    """``model`` trained with schedules; call it like the model."""

    def __init__(self, model: torch.nn.Module, constraints: Constraints, *, optimizer: str = "adam",
                 cache_dir: str | os.PathLike | None = None, observe=None, profile: bool | None = None, announce: bool = True,
                 segments: bool = True):
        super().__init__()
        self._profile = profile
        self._segments = segments  # batch-sliced segments under a budget (:mod:`.segment_steps`)
        self._orig_mod = model
        self._constraints = constraints
        self._optimizer = optimizer
        self._cache_dir = cache_dir
        self._announce = announce  # warn before planning inside a training call
        self._plans: dict = {}
        self._observe = observe
        self._anchor = torch.empty(0, requires_grad=True)

    # -- attribute access falls through to the model, as with torch.compile -----------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)

    # -- train/eval mode is the model's: model.eval() switches the optimized module too ---
    def _attached_model(self) -> torch.nn.Module | None:
        """The model, or None while ``nn.Module.__init__`` runs (it sets the mode before the
        model is attached: nothing to mirror yet)."""
        return self.__dict__["_modules"].get("_orig_mod") if "_modules" in self.__dict__ else None

    @property
    def training(self) -> bool:
        model = self._attached_model()
        return True if model is None else model.training

    @training.setter
    def training(self, mode: bool) -> None:
        model = self._attached_model()
        if model is not None:
            model.training = mode

    def train(self, mode: bool = True):
        self._orig_mod.train(mode)
        return self

    # -- plans ------------------------------------------------------------------------------
    def plan_for(self, *inputs, trace=None, avoid: frozenset | None = None) -> RuntimePlan:
        """The plan (trace, schedule, lowered steps) for these inputs, made on first use.
        ``trace``: a :class:`~monetdsl.tracing.TraceResult` of the model on such inputs
        (``loss="output"``), to skip tracing again. ``avoid``: norms planned without their
        backward from the output (:mod:`.scale_weights`; by default those whose weight
        has a zero when the plan is made)."""
        key = (_signature(inputs), _autocast_state(), avoid)
        plan = self._plans.get(key)
        if plan is None:
            progress = StderrProgress()
            begin = time.perf_counter()

            def report(info: ProgressInfo) -> None:  # elapsed since planning began, tracing included
                progress(dataclasses.replace(info, elapsed=time.perf_counter() - begin))

            try:
                plan = build_plan(self._orig_mod, list(inputs), self._constraints, optimizer=self._optimizer,
                                  cache_dir=self._cache_dir, trace=trace, profile=self._profile, avoid=avoid, progress=report,
                                  segments=self._segments)
            finally:
                progress.close()
            self._plans[key] = plan
        return plan

    def has_plan_for(self, *inputs) -> bool:
        """Whether a training call with these inputs runs without planning first."""
        return (_signature(inputs), _autocast_state(), None) in self._plans

    def _plan_for_weights(self, plan: RuntimePlan, inputs) -> RuntimePlan:
        """``plan``, or, when a weight its norms' backwards divide by has a zero now, the
        plan made with those norms' backward from the input (:mod:`.scale_weights`)."""
        zeros = zero_weight_ops(plan.weight_checks, self._model_tensors(plan)[0])
        if not zeros:
            return plan
        names = ", ".join(sorted(zeros))
        if self._constraints.schedule is not None:
            raise RuntimeUsageError(f"the weight of {names} has a zero entry, and the schedule computes its backward from its"
                                    " output (from_output), which divides by that weight; choose from_input for it in the"
                                    " schedule, or let monetdsl plan (optimize without schedule=)")
        avoid = frozenset(plan.avoided | zeros)
        if (_signature(inputs), _autocast_state(), avoid) not in self._plans:
            warnings.warn(f"monetdsl: the weight of {names} has a zero entry; steps while it has use a plan with their"
                          " backward from the input (from_output would divide by zero)", stacklevel=5)
        return self.plan_for(*inputs, trace=plan.trace, avoid=avoid)

    @property
    def plans(self) -> list[RuntimePlan]:
        return list(self._plans.values())

    # -- calls ------------------------------------------------------------------------------
    def forward(self, *inputs, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self._orig_mod(*inputs, **kwargs)
        given = inputs
        if kwargs:
            inputs = _as_positional(self._orig_mod, inputs, kwargs)
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise RuntimeUsageError("monetdsl trains a whole model: an input that requires grad would need its"
                                        " gradient, which the runtime does not return; detach it or wrap the larger model")
        plan = self._plans.get((_signature(inputs), _autocast_state(), None))
        if plan is None and self._announce:
            warnings.warn(f"monetdsl: planning for new inputs ({_describe(inputs)}) inside a training call; this traces"
                          " and solves before the step runs (seconds, or a minute on a cold cache). Pass every input"
                          " shape the loop uses to monetdsl.optimize(model, example_inputs=[...]) to plan them up front",
                          PlanningWarning, stacklevel=4)
        if plan is None:
            plan = self.plan_for(*inputs)
        if plan.runs_eager:
            return self._orig_mod(*given, **kwargs)
        if plan.weight_checks:
            plan = self._plan_for_weights(plan, inputs)
        if plan.steps.whole_autograd and self._observe is None:
            out = self._autograd_pass(plan, inputs)
            if out is not None:
                return out
        return _ScheduledStep.apply(self, plan, self._anchor, *inputs)

    def _fixed(self, plan: RuntimePlan, inputs, params: dict, buffers: dict) -> dict:
        fixed = {}
        for name, (kind, key, position) in plan.fixed_sources.items():
            if kind == "input":
                fixed[name] = inputs[position]
            elif kind == "param" and key in params:
                fixed[name] = params[key].detach()
            elif key in buffers:
                fixed[name] = buffers[key]
            else:
                try:
                    fixed[name] = operator.attrgetter(key)(self._orig_mod)
                except AttributeError:
                    raise RuntimeUsageError(f"the traced graph reads {key}, which the model no longer has") from None
        return fixed

    def _model_tensors(self, plan: RuntimePlan) -> tuple[dict, dict]:
        """The parameters and buffers the plan reads, by name, as the model holds them now."""
        found = plan.model_tensors.lookup(self._orig_mod)
        if found is None:  # a name is no longer where it was: look the way named_parameters() does
            found = dict(self._orig_mod.named_parameters()), dict(self._orig_mod.named_buffers())
        return found

    def _forward_pass(self, plan: RuntimePlan, inputs):
        executor = Executor(plan.spec.network, plan.steps, self._observe)
        params, buffers = self._model_tensors(plan)
        hooks = _ddp_active() or _has_grad_hooks(params.values())
        keys = plan.model_tensors.param_keys
        with torch.no_grad(), _no_autocast():
            fixed = self._fixed(plan, inputs, params, buffers)
            state = executor.forward(fixed, lambda name: params.get(keys.get(name)), hooks=hooks)
            plan.buffer_updates.apply(fixed)
        state.params = params
        self._last_state_hooks = state.hooks
        out = plan.output_path.materialize(state.env[plan.output])
        return state, out.detach()

    def _autograd_pass(self, plan: RuntimePlan, inputs):
        """A plan whose backward is all one stretch from the output (``StepPlan.whole_autograd``):
        the forward runs as planned and the output keeps autograd's graph, so the caller's
        ``backward()`` is one engine pass that writes ``.grad`` as eager's does; nothing
        is carried in the environment (the graph holds what its formulas saved). ``None``
        when gradient hooks or DDP listen (they run step by step)."""
        params, buffers = self._model_tensors(plan)
        if _ddp_active() or _has_grad_hooks(params.values()):
            return None
        executor = Executor(plan.spec.network, plan.steps, None)
        keys = plan.model_tensors.param_keys
        with torch.no_grad(), _no_autocast():
            fixed = self._fixed(plan, inputs, params, buffers)
            state = executor.forward(fixed, lambda name: params.get(keys.get(name)))
            plan.buffer_updates.apply(fixed)
        self._last_state_hooks = False
        owner = state.env.pop(plan.output)
        state.env.clear()
        state.graph.clear()
        with torch.enable_grad():
            return plan.output_path.materialize(owner)

    def _backward_pass(self, plan: RuntimePlan, state: StepState, grad: torch.Tensor) -> None:
        executor = Executor(plan.spec.network, plan.steps, self._observe)
        owner = state.env[plan.output]
        seed = _grad_of_owner(plan, owner, grad)
        params = state.params
        keys = plan.model_tensors.param_keys

        def param_of(name: str):
            return params.get(keys.get(name))

        with torch.no_grad(), _no_autocast():
            executor.backward(state, {f"grad({plan.output})": seed}, param_of)


def _as_positional(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The call's arguments in the order of ``model.forward``'s parameters (defaults filled
    in up to the last one given), so that ``model(x, mask=m)`` plans and runs as
    ``model(x, m)``: a plan is keyed by positional tensor inputs. A keyword-only argument
    has no position, and a value that is not a tensor is not a graph input: both are
    refused, by name."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise RuntimeUsageError(f"{type(model).__name__}.forward: {exc}") from None
    named = set(bound.arguments)
    bound.apply_defaults()
    positional, pending = [], []
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            positional += [value for _, value in pending] + list(bound.arguments.get(parameter.name, ()))
            pending = []
        elif parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            pending.append((parameter.name, bound.arguments[parameter.name]))
            if parameter.name in named:  # defaults only up to the last argument given
                for name, value in pending:
                    if not isinstance(value, torch.Tensor):
                        raise RuntimeUsageError(f"{type(model).__name__}.forward: {name}={value!r} is not a tensor; the"
                                                " runtime plans tensor inputs only (bind other values in a wrapper module)")
                    positional.append(value)
                pending = []
        elif parameter.name in named:
            raise RuntimeUsageError(f"{type(model).__name__}.forward takes {parameter.name!r} by keyword only; the runtime"
                                    " plans positional inputs: make it a positional parameter or bind it in a wrapper module")
    return tuple(positional)


def _grad_of_owner(plan: RuntimePlan, owner: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of the network output's storage owner from the gradient of what the
    model returned (a view of it)."""
    if grad is None:
        return torch.zeros_like(owner)
    path = plan.output_path
    if path.is_identity:
        return grad
    from ..lowering.graphs import owner_adapter

    adapter = owner_adapter(owner, [path])
    return adapter(grad)


def _has_grad_hooks(params) -> bool:
    for p in params:
        if getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None):
            return True
    return False


class _no_autocast:
    """The captured graph already holds autocast's casts: replay it with autocast off
    (entering nothing when autocast is off already: a step of a small model is short)."""

    def __enter__(self):
        self._contexts = []
        if torch.is_autocast_enabled("cpu"):
            self._contexts.append(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available() and torch.is_autocast_enabled("cuda"):
            self._contexts.append(torch.autocast("cuda", enabled=False))
        for c in self._contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self._contexts):
            c.__exit__(*exc)
        return False
