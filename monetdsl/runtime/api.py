"""``monetdsl.optimize`` and ``monetdsl.backend``: the two ways to train with a schedule.

    >>> import torch, monetdsl
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> x = torch.randn(4, 8)
    >>> fast = monetdsl.optimize(model, x, max_overhead=0.2)
    >>> fast(x).sum().backward()          # trains like model(x): gradients land in model's .grad
    >>> model[0].weight.grad.shape
    torch.Size([16, 8])
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from ..errors import MonetError
from ..ir import Schedule
from ..options import check_search_options, option_error
from ..search.solve import METHODS
from ..tracing.fixed_memory import OPTIMIZERS
from .module import OptimizedModule
from ..planning import Constraints
from ..planning.schedule_cache import USER_CACHE, resolve_cache_dir

__all__ = ["optimize", "backend"]


#: how optimize() and backend() spell the search options in messages
_SPELLING = {"memory_budget": "budget"}


def _usage(message: str) -> MonetError:
    """A bad argument to optimize() or backend(): the same error type as a bad option anywhere."""
    return option_error(message, "monetdsl.optimize")


def _constraints(budget, max_overhead, schedule, method, time_limit=None, segments=True) -> tuple[Constraints, bool]:
    """The checked constraints, and whether plans may use batch-sliced segments."""
    if schedule is not None and (budget is not None or max_overhead is not None):
        raise _usage("give either a schedule file or a budget / overhead cap, not both (the file already decides)")
    checked = check_search_options(method=method, memory_budget=budget, max_overhead=max_overhead, time_limit=time_limit,
                                   methods=METHODS, spelling=_SPELLING, where="monetdsl.optimize", caps_up_to_one=True,
                                   segments=segments)
    if schedule is not None and not isinstance(schedule, Schedule):
        schedule = os.fspath(schedule)
        if Path(schedule).is_dir():
            raise _usage(f"schedule {schedule} is a directory; give a .monet schedule file")
        if not Path(schedule).is_file():
            raise _usage(f"schedule file {schedule} does not exist")
    if time_limit is not None and schedule is not None:
        raise _usage("time_limit bounds the search for a schedule; a schedule file needs none")
    return Constraints(checked.memory_budget, checked.max_overhead, schedule, checked.method, checked.time_limit), checked.segments


def _as_calls(example_inputs) -> list[tuple]:
    """The calls to plan for: one tensor or a tuple of tensors is one call's inputs; a list
    of those is several calls (one per input signature the training loop will see)."""
    if example_inputs is None:
        return []
    if isinstance(example_inputs, torch.Tensor):
        return [(example_inputs,)]
    if isinstance(example_inputs, (list, tuple)) and example_inputs and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return [tuple(example_inputs)]
    if isinstance(example_inputs, list) and example_inputs and all(
            isinstance(c, torch.Tensor) or (isinstance(c, tuple) and c and all(isinstance(t, torch.Tensor) for t in c))
            for c in example_inputs):
        return [(c,) if isinstance(c, torch.Tensor) else c for c in example_inputs]
    raise _usage("example_inputs must be a tensor or a tuple of tensors (what you would pass to the model), or a list"
                 " of those to plan several input shapes up front, e.g. [(x_short,), (x_long,)]")


def _cache_dir(cache_dir):
    """``cache_dir`` as given, once checked (the plan resolves it: :func:`~.plan.build_plan`)."""
    try:
        resolve_cache_dir(cache_dir)
    except TypeError as exc:
        raise _usage(str(exc)) from None
    return cache_dir


def optimize(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    budget: int | str | None = None,
    max_overhead: float | str | None = None,
    schedule: str | os.PathLike | Schedule | None = None,
    method: str = "auto",
    optimizer: str = "adam",
    cache_dir: str | os.PathLike | None = USER_CACHE,
    profile: bool | None = None,
    time_limit: float | None = None,
    segments: bool = True,
) -> OptimizedModule:
    """A module that trains ``model`` with a schedule and is called like it.

    ``budget`` is the peak memory of a training step, fixed memory included (parameters,
    their gradients, ``optimizer`` state, inputs), e.g. ``"6GiB"``; ``max_overhead`` caps
    the extra compute (0.1 = 10 %); ``schedule`` names a ``.monet`` schedule file made for
    this model and these input shapes (refused otherwise). Without ``schedule`` the model
    is traced and solved for each input signature: right away for ``example_inputs`` (one
    call's inputs, or a list of several calls' inputs, e.g. ``[(x_short,), (x_long,)]``, to
    plan every shape the loop will use), otherwise on first use, with a
    :class:`~monetdsl.runtime.module.PlanningWarning`. Solved schedules are kept by the
    graph's fingerprint, the cost model and the constraints, in memory and in ``cache_dir``
    (default :data:`~monetdsl.runtime.schedule_cache.USER_CACHE`, the user's cache directory
    ``plans`` beside the measured costs: ``$MONETDSL_CACHE/plans``, ``$XDG_CACHE_HOME/monetdsl/plans``
    or ``~/.cache/monetdsl/plans``; ``None``: memory only),
    so the next run of the same script skips the search; an entry is replayed by the
    simulator before use and ignored when damaged or stale.
    Parameters and buffers are the model's own: an optimizer built on
    ``model.parameters()`` keeps working. The schedule is solved on costs measured on the
    inputs' device (each op and alternative's time and allocator-measured memory, alone
    and inside a few store-all steps: :mod:`monetdsl.runtime.measured_costs`), so its
    budget and overhead hold on this machine; the measurements are kept by op signature in
    ``cache_dir`` (default: the user's cache directory, ``$XDG_CACHE_HOME/monetdsl`` or
    ``~/.cache/monetdsl``, or ``$MONETDSL_CACHE``, also when ``cache_dir=None``) and an op
    already measured is never run again. ``profile=False`` solves on the roofline estimates of the inputs' device kind
    instead (no op is run; a schedule file needs no costs and uses none).

    ``time_limit`` (seconds, default 60) bounds the search for a schedule (``milp``,
    ``hybrid``, and the minimum-budget search that follows an infeasible budget; tracing
    and the replay add a little). It is an upper bound: the search ends when it proves its
    result, or when further search has stopped paying (``monetdsl.search.stopping``). A
    schedule already solved for this graph and these constraints is reused whatever the limit. When no schedule fits the budget,
    :class:`~monetdsl.errors.SolveError` carries ``min_feasible_budget``: the replayed peak
    of the best schedule found, a budget that works when passed back (the schedule is kept
    for the next search of this graph in the process); ``details["min_feasible_budget_exact"]``
    says whether it is proved minimal, and the message gives the proved lower bound when not.

    ``segments`` (default True): under a budget that store-all does not meet, run the
    widest blocks of per-sample ops (convolutions, activations, pooling between two
    shrinking steps; no batch norm) as batch-sliced segments, chosen by ``monetdsl
    trace``'s rule: each block runs a slice of the batch at a time and recomputes its
    forward in the backward, which lowers the floor that running ops one by one sets
    (:mod:`monetdsl.runtime.segment_steps`). ``False`` plans every op on its own.
    """
    if not isinstance(model, torch.nn.Module):
        raise _usage(f"optimize takes an nn.Module, not {type(model).__name__}")
    if optimizer not in OPTIMIZERS:
        raise _usage(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    constraints, sliced = _constraints(budget, max_overhead, schedule, method, time_limit, segments)
    calls = _as_calls(example_inputs)
    module = OptimizedModule(model, constraints, optimizer=optimizer, cache_dir=_cache_dir(cache_dir), profile=profile,
                             segments=sliced)
    if calls:
        was = model.training
        model.train()
        try:
            for inputs in calls:
                module.plan_for(*inputs)
        finally:
            model.train(was)
    return module


def _is_state(node: torch.fx.Node, example) -> bool:
    """Whether a dynamo graph input is model state (a parameter, a buffer or another tensor
    held by a module, or a global), not data the caller passes.

    The module need not be the compiled one (``L['self']``): a step function that takes
    the model as an argument reaches its buffers as ``L['model']._modules['0']._buffers[...]``,
    and a buffer taken for data would be an input whose update (``num_batches_tracked += 1``)
    the runtime cannot apply. Dynamo marks every source reached through a module, however
    deep, with a module source; that mark, not the spelling of the path, decides."""
    if isinstance(example, torch.nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    return _reached_through_module(source) or _source_name(source).startswith(("L['self']", "G["))


def _reached_through_module(source) -> bool:
    """Whether dynamo's ``source`` (a chain of attribute and item accesses) passes through
    an ``nn.Module`` on its way from a local or global name."""
    try:
        from torch._dynamo.source import NNModuleSource
    except ImportError:  # pragma: no cover - dynamo internals moved: the names still tell
        return any(part in _source_name(source) for part in ("._modules[", "._parameters[", "._buffers["))
    while source is not None:
        if isinstance(source, NNModuleSource):
            return True
        source = getattr(source, "base", None)
    return False


def _source_name(source) -> str:
    name = getattr(source, "name", "")
    return name() if callable(name) else str(name)


class _GraphModel(torch.nn.Module):
    """A dynamo graph as a model: the parameters and buffers it takes as inputs become the
    module's parameters and buffers again (the same tensor objects)."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list):
        super().__init__()
        if hasattr(gm, "real_recompile"):
            gm.real_recompile()  # generated code dynamo can trace again (the lazy stub is on its skip list)
        self.gm = gm
        nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.state = {i: t for i, (n, t) in enumerate(zip(nodes, example_inputs)) if _is_state(n, t)}
        self.params = torch.nn.ParameterList([t for t in self.state.values() if isinstance(t, torch.nn.Parameter)])
        for k, (i, t) in enumerate((i, t) for i, t in self.state.items() if not isinstance(t, torch.nn.Parameter)):
            self.register_buffer(f"buffer{k}", t)
        self.n_inputs = len(example_inputs)

    def forward(self, *data):
        it = iter(data)
        args = [self.state[i] if i in self.state else next(it) for i in range(self.n_inputs)]
        out = self.gm(*args)
        return out[0] if isinstance(out, (list, tuple)) else out


def backend(*, budget: int | str | None = None, max_overhead: float | str | None = None, schedule=None,
            method: str = "auto", optimizer: str = "adam", cache_dir: str | os.PathLike | None = USER_CACHE,
            time_limit: float | None = None, profile: bool | None = None, segments: bool = True):
    """A ``torch.compile`` backend that trains each captured graph with a schedule:
    ``torch.compile(model, backend=monetdsl.backend(budget="6GiB"))``. The keywords are
    :func:`optimize`'s (``time_limit`` bounds each graph's search; costs are
    measured on the device unless ``profile=False``; ``segments=False`` plans every op
    on its own).

    A graph monetdsl cannot run as a whole training step (several outputs, inputs that
    need gradients: a graph break inside the model) runs unchanged, with a warning."""
    constraints, sliced = _constraints(budget, max_overhead, schedule, method, time_limit, segments)
    directory = _cache_dir(cache_dir)

    def compile_graph(gm: torch.fx.GraphModule, example_inputs):
        outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        n_out = len(outputs) if isinstance(outputs, (list, tuple)) else 1
        nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
        params = [_is_state(n, t) for n, t in zip(nodes, example_inputs)]
        data_need_grad = any(isinstance(t, torch.Tensor) and t.requires_grad and not p for t, p in zip(example_inputs, params))
        trains = any(isinstance(t, torch.nn.Parameter) and t.requires_grad for t in example_inputs)
        if n_out != 1 or data_need_grad or not trains:
            warnings.warn("monetdsl.backend: this graph is not a whole training step (several outputs, an input that"
                          " needs a gradient, or no parameter that requires grad); it runs unchanged", stacklevel=2)
            return gm.forward
        model = _GraphModel(gm, list(example_inputs))
        # torch.compile plans on the first call by design: no announcement
        module = OptimizedModule(model, constraints, optimizer=optimizer, cache_dir=directory, profile=profile, announce=False,
                                 segments=sliced)
        tuple_out = isinstance(outputs, (list, tuple))

        def run(*args):
            data = [a for a, p in zip(args, params) if not p]
            module.train(torch.is_grad_enabled())
            out = module(*data)
            return (out,) if tuple_out else out

        return run

    return compile_graph
