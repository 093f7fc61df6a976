"""Buffers a training step writes besides batch norm's running statistics.

A traced step returns the new values of the buffers it updates (``num_batches_tracked +=
1``, a running maximum...); the runtime applies them once after the forward pass. A
counter's increment is a number added to the buffer, applied to all counters at once;
anything else is evaluated from the traced nodes that compute it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ..errors import ScheduleError
from ..lowering.graphs import call_node
from ..tracing.joint import packet_name

__all__ = ["BufferUpdates", "buffer_updates"]


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
