"""Workspace: the transient memory each implementation's runtime step really allocates.

The memory model counts, during a step, everything live, the step's new outputs and the
implementation's ``workspace`` (``docs/memory-model.md``). The runtime's steps allocate
temporaries besides their outputs: the math attention backward forms ``grad @ v^T`` and
its product with the probabilities, a local backward graph forms intermediate gradients,
the adapter from the gradients of q, k and v to the gradient of their projection copies
each one before joining them, a decomposed RMS norm forms its squares and means.

:func:`measure_workspaces` runs every implementation's step function exactly as the
runtime lowers it (:mod:`monetdsl.lowering.program`), on FakeTensors of the traced shapes
(nothing of their size is allocated), under :class:`StorageTracker`, a dispatch mode that
counts new storages while they live, as :class:`~monetdsl.runtime.memory.LiveTensorProbe`
does on real tensors. The workspace of an implementation is its step's peak of new
storage bytes above the bytes the memory model allocates for the step's outputs:

>>> import torch
>>> from torch._subclasses.fake_tensor import FakeTensorMode
>>> with FakeTensorMode():
...     x = torch.empty(256)                       # 1 KiB, made before counting starts
...     with StorageTracker() as tracker:
...         y = (x * 2).exp()                      # x * 2 is a 1 KiB temporary
...     tracker.peak, tracker.live
(2048, 1024)

A forward implementation's workspace is the larger of its first forward's and its
recomputation's. Custom ops (``torch.ops.monetdsl.*``) count as one call, as the probe
sees them: their outputs only.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..ir import ForwardOp, Network
from .storage_counter import StorageCounter
from ..lowering.program import _backward_step, _forward_step, _OpLowering, value_nodes

__all__ = ["StorageTracker", "WorkspaceReport", "measure_workspaces", "step_workspace"]


class StorageTracker(StorageCounter):
    """Counts new storages while they live, fake ones included (keyed by the storage
    object, since fake storages have no data pointer)."""


def step_workspace(fn, make_values, planned_bytes: int) -> tuple[int, tuple, int]:
    """Run ``fn(*make_values())`` under a :class:`StorageTracker`: the workspace (peak new
    bytes above ``planned_bytes``, the outputs' bytes the memory model allocates), the
    results and the new bytes they hold. A first, uncounted call warms up what a step
    builds once (the gradient adapters trace their graph on first use, on FakeTensors of
    their own)."""
    fn(*make_values())
    values = make_values()
    tracker = StorageTracker()
    with tracker:
        results = fn(*values)
    return max(0, tracker.peak - planned_bytes), results, tracker.live


@dataclass
class WorkspaceReport:
    """What :func:`measure_workspaces` found: the network with workspaces, and notes for
    implementations whose step could not be run on FakeTensors (their workspace stays 0)."""

    network: Network
    notes: list[str] = field(default_factory=list)
    measured: dict[tuple[str, str], int] = field(default_factory=dict)  # (op, impl) -> bytes
    #: (op, impl, step kind) -> bytes of the outputs the memory model allocates but the step
    #: does not (a gradient that is the incoming one, as for a sum; a recomputation that
    #: returns the seed it was given): the model over-counts these steps by that much
    aliased: dict[tuple[str, str, str], int] = field(default_factory=dict)


def _example(val) -> torch.Tensor:
    """A fresh fake tensor with the layout of a traced value (inside the active fake mode)."""
    return torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device=val.device)


def measure_workspaces(built) -> WorkspaceReport:
    """The workspace of every implementation of every op of ``built`` (a
    :class:`~monetdsl.tracing.to_ir.BuiltNetwork` whose network may lack the loss ops),
    measured on its runtime step function. Returns a new network; ``built`` is untouched."""
    network, report, node_of = built.network, WorkspaceReport(built.network), value_nodes(built)
    if node_of is None:
        report.notes.append("workspace not measured: the trace carries no joint graph")
        return report
    facts, value_names = built.facts, built.value_names
    tensors = network.tensors
    forward_ws: dict[tuple[str, str], int] = {}
    backward_ws: dict[tuple[str, str], int] = {}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.cache_enabled = False  # a cached result may share what a fresh call would allocate
    with mode:
        examples: dict[str, torch.Tensor] = {}

        def value(name: str) -> torch.Tensor:
            if name not in examples:
                base = name[5:-1] if name.startswith("grad(") and name.endswith(")") and name not in node_of else name
                examples[name] = _example(value(base)) if base != name else _example(node_of[name].meta["val"])
            return examples[name]

        lowerings = {}
        for record in built.records:
            if not network.has_op(record.name):
                continue
            op = network.op(record.name)
            low = _OpLowering(record, facts, value_names, network)
            lowerings[record.name] = low
            for impl in op.impls:
                try:
                    forward_ws[(op.name, impl.name)] = _forward_workspace(low, op, impl, value, examples, tensors, report.aliased)
                except Exception as exc:  # noqa: BLE001 - reported, never hidden
                    report.notes.append(f"{op.name} impl {impl.name}: workspace not measured ({type(exc).__name__}: {exc})")
        # from the loss backwards, so a gradient's example is what its first writer returns
        # (its real layout: a step may copy a gradient that arrives in another layout)
        for bop in reversed(network.backward_ops):
            low = lowerings[bop.of]
            for impl in bop.impls:
                try:
                    step = _backward_step(low, bop, impl, first=impl.name == bop.impls[0].name)
                    planned = bop.new_output_bytes(impl, tensors)
                    ws, results, held = step_workspace(step.with_scratch_targets(value(step.reads[0]).device), lambda: [value(n) for n in step.reads], planned)
                    if held < planned:
                        report.aliased[(bop.name, impl.name, "backward")] = planned - held
                    for name, result in zip(step.writes, results):
                        if result is not None:  # None: added into a parameter's gradient
                            examples.setdefault(name, result)
                    del results
                    backward_ws[(bop.name, impl.name)] = ws
                except Exception as exc:  # noqa: BLE001 - reported, never hidden
                    report.notes.append(f"{bop.name} impl {impl.name}: workspace not measured ({type(exc).__name__}: {exc})")
    report.measured = {**forward_ws, **backward_ws}
    report.network = network.with_impls(
        lambda op, i: replace(i, workspace=forward_ws.get((op.name, i.name), i.workspace)),
        lambda op, i: replace(i, workspace=backward_ws.get((op.name, i.name), i.workspace)))
    return report


def _forward_workspace(low, op: ForwardOp, impl, value, examples: dict, tensors, aliased: dict) -> int:
    """The larger of the first forward's and the recomputation's workspace; the derived
    tensors of the first forward become the examples the backward and the recomputation read."""
    planned = 0
    for k, out in enumerate((*op.outputs, *impl.derived)):
        if k == 0 and impl.overwrites is not None:
            continue
        planned += tensors[out].storage_bytes
    workspace = 0
    for recompute in (False, True):
        step = _forward_step(low, op, impl, recompute=recompute)
        ws, results, held = step_workspace(
            step.fn, lambda: [_example(value(n)) if n == impl.overwrites else value(n) for n in step.reads], planned)
        if held < planned:
            aliased[(op.name, impl.name, "recompute" if recompute else "forward")] = planned - held
        workspace = max(workspace, ws)
        if not recompute:
            for name, result in zip(step.writes, results):
                if name in impl.derived and name not in examples:
                    examples[name] = result
        del results
    return workspace
