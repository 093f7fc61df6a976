"""Runs of a stretch's forward calls run by TorchScript's interpreter, not one Python call each.

Inside a stretch (:mod:`.stretches`) the forward records autograd's graph, and its
backward is one call into autograd's engine, as in eager training. Its forward was still a
Python call per op: an unrolled GRU of 359 tiny ops took 1.7 ms where eager's C++ loop
over the same aten calls takes 1.2 ms, the whole of the store-all step's x1.12-1.16 over
eager's (its backward is eager's own). A run of consecutive forward steps of one stretch,
each a single aten call with a Python binding (:data:`~.forward_code.PYTHON_BINDINGS`:
elementwise ops, matrix products, views; no randomness, no in-place writes), is written
as one Python function of the tensors it reads, returning those it leaves in the
environment; on its first call that function is traced (``torch.jit.trace``) on the
actual tensors and afterwards the traced graph runs, every op through the dispatcher with
autograd recording as it would from Python (``torch.jit.optimized_execution(False)``: no
fusion, no differentiable graphs of the JIT's own), so the graph and the gradients are
the same, bit for bit.

Memory stays the plan's: the interpreter drops each value after its last use, as the plan
releases it after its last reader; a run never reads a tensor from outside that the plan
releases before the run's last step (the run ends at that step), so nothing the caller
passes in lives longer than planned. Where tracing is not available (a PyTorch without
``torch.jit``) or fails, the run's Python function is used as it is.
"""
from __future__ import annotations

import warnings

import torch

from ..lowering.graphs import ArgPath
from .forward_code import PYTHON_BINDINGS

__all__ = ["ScriptedRun", "MIN_SCRIPTED_STEPS", "scripted_runs"]

#: entering a traced function costs a few microseconds more than a Python call: on the
#: 2-core CPU, runs of ``add`` on an 8x64 tensor under grad took 5.3 us as 4 Python calls
#: against 7.3 traced, 10.4 against 11.1 for 8, 21.0 against 18.7 for 16; the pass also
#: saves its bookkeeping per step (environment writes, releases), so runs of 10 calls on
MIN_SCRIPTED_STEPS = 10


class ScriptedRun:
    """A run's Python function (``fn(*tensors) -> tuple of tensors``), traced into
    TorchScript on its first call and run traced afterwards."""

    def __init__(self, fn):
        if fn.__module__ is None:  # written into a generated pass: the tracer names a function by its module
            fn.__module__ = __name__
        self.fn = fn
        self.traced = None

    def __call__(self, *args):
        if self.traced is None:
            self.traced = self._trace(args)
        if self.traced is False:
            return self.fn(*args)
        with torch.jit.optimized_execution(False):
            return self.traced(*args)

    def _trace(self, args):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes (deprecation, constants) say nothing here
                with torch.jit.optimized_execution(False):
                    return torch.jit.trace(self.fn, args, check_trace=False, strict=False)
        except Exception:  # noqa: BLE001 - the Python function computes the same values
            return False


def scripted_runs(forward: list, stretch_of: dict) -> dict[int, int]:
    """The runs of ``forward`` (planned forward steps) to trace: ``{first index: index
    after the last}``. A run's steps lie in one stretch (``stretch_of``: op -> its
    stretch), each one inline call with a Python binding on arguments whose views have
    one too, not run as a planned node, writing no tensor in place; a step that releases
    a tensor from before the run ends it. The tensors the stretch enters
    (:class:`~.stretches.Enter`) that the run reads are entered before it: each exists
    already (made outside the stretch, so before the run), and its alias holds nothing
    of its own."""
    runs: dict[int, int] = {}
    k = 0
    while k < len(forward):
        stretch = stretch_of.get(forward[k].step.op)
        end, made = k, set()
        while end < len(forward) and stretch is not None and stretch_of.get(forward[end].step.op) is stretch \
                and _traceable(forward[end], stretch, first=end == k):
            planned = forward[end]
            made.update(planned.step.writes)
            end += 1
            if any(n not in made for n in planned.release_after):
                break  # the run's caller holds what it passes in until the run returns
        if end - k >= MIN_SCRIPTED_STEPS:
            runs[k] = end
        k = max(end, k + 1)
    return runs


def _traceable(planned, stretch, *, first: bool) -> bool:
    step = planned.step
    direct = step.direct
    if direct is None or step.overwrites is not None or planned.keep_existing or (planned.release_before and not first):
        return False
    if step.op in stretch.nodes:
        return False
    return _bound(direct.target) and all(_bound(step[1]) for a in _paths(direct) for step in a.steps if step[0] != "getitem")


def _bound(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.name() in PYTHON_BINDINGS


def _paths(direct):
    for a in (*direct.args, *direct.kwargs.values()):
        if isinstance(a, ArgPath):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, ArgPath))
