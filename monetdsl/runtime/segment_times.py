"""A plan's batch-sliced segments timed on the device, slice count by slice count.

The formulas of :mod:`monetdsl.slicing.segment` charge a segment its member ops' times
plus one kernel launch fee per op and extra slice. On a CPU a slice also pays the
runtime's Python per member step and, in the backward, one autograd call per slice: on
``monetdsl.models.tiny_vgg`` (batch 16) a plan on the formulas' times planned +9.6 %
and measured x1.69 of eager's step. So where the plan's costs are measured on the device
(``monetdsl.optimize``'s default), each segment's ``slicedK`` forward and backward are
run as the runtime runs them (:mod:`.segment_steps`) on random tensors of the traced
shapes, and their times (median of a few runs after a warm-up) replace the formulas'.
The workspaces stay the formulas' (an upper bound of what the allocator sees: tested).
The times are kept in the measurement store by graph, segment and machine, so the same
plan made again solves on the same spec (and finds its cached schedule).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from ..costs import MeasurementStore
from ..costs.signature import machine_signature
from ..grammar import parse_spec
from ..grammar.printer import format_spec
from ..ir import Spec, grad_name
from ..lowering.program import value_nodes
from ..slicing import is_segment, segment_members, slice_count
from ..tracing.api import TraceResult
from .segment_steps import backward_step, forward_fn, member_chain

__all__ = ["TIMED_RUNS", "with_measured_segment_times"]

#: timed runs of each segment implementation, after one warm-up run
TIMED_RUNS = 3


def _timed_us(run, device: str) -> float:
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e6

    once()
    return statistics.median(once() for _ in range(TIMED_RUNS))


def _random(like: torch.Tensor, device: str) -> torch.Tensor:
    if like.is_floating_point():
        return torch.randn(tuple(like.shape), dtype=like.dtype, device=device)
    return torch.zeros(tuple(like.shape), dtype=like.dtype, device=device)


def _segment_times(trace, op, bop, device: str) -> dict:
    """``{"forward": {K: us}, "backward": {K: us}}`` for each ``slicedK`` the op offers."""
    chain = member_chain(trace, segment_members(trace.built.network, op.name))
    nodes = value_nodes(trace.built)
    layouts = {name: (tuple(node.meta["val"].shape), node.meta["val"].dtype) for name, node in nodes.items()
               if isinstance(node.meta.get("val"), torch.Tensor)}
    values = [_random(nodes[name].meta["val"], device) for name in op.inputs]
    grad_out = _random(nodes[op.outputs[0]].meta["val"], device)
    times = {"forward": {}, "backward": {}}
    with torch.no_grad():
        for impl in op.impls:
            k = slice_count(impl.name)
            forward = forward_fn(chain, op.inputs, k)
            times["forward"][str(k)] = _timed_us(lambda: forward(*values), device)
        for impl in bop.impls:
            k = slice_count(impl.name)
            step = backward_step(chain, op, bop.name, tuple(bop.outputs), k, layouts)
            targets = step.scratch_targets(device)
            reads = {grad_name(op.outputs[0]): grad_out, **dict(zip(op.inputs, values))}
            args = [reads[name] for name in step.reads]
            times["backward"][str(k)] = _timed_us(lambda: step.fn(*args, into=targets), device)
    return times


def with_measured_segment_times(trace, inputs, cache_dir=None):
    """``trace`` with its segments' ``slicedK`` times measured on the inputs' device (kept
    in the measurement store of ``cache_dir``, default the user's), or ``trace`` itself
    when it has no segment."""
    network = trace.spec.network
    segments = [op for op in network.forward_ops if is_segment(op)]
    if not segments:
        return trace
    store = MeasurementStore(cache_dir) if cache_dir is not None else MeasurementStore()
    device = "cuda" if any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs) else "cpu"
    forward_ops, backward_ops = list(network.forward_ops), list(network.backward_ops)
    for op in segments:
        position = next(i for i, b in enumerate(backward_ops) if b.of == op.name)
        bop = backward_ops[position]
        key = f"batch-sliced segment times; graph {trace.spec.fingerprint}; {op.name}; {machine_signature(device)}"
        times = store.get(key)
        if times is None or set(times) != {"forward", "backward"}:
            times = _segment_times(trace, op, bop, device)
            store.put(key, times)
        forward_ops[forward_ops.index(op)] = replace(op, impls=tuple(
            replace(i, time_us=times["forward"].get(str(slice_count(i.name)), i.time_us)) for i in op.impls))
        backward_ops[position] = replace(bop, impls=tuple(
            replace(i, time_us=times["backward"].get(str(slice_count(i.name)), i.time_us)) for i in bop.impls))
    timed = replace(network, forward_ops=tuple(forward_ops), backward_ops=tuple(backward_ops))
    spec = parse_spec(format_spec(replace(trace.spec, network=timed)), trace.spec.path)
    spec = Spec(spec.network, spec.constraints, path=trace.spec.path)
    header = [*trace.header, "note: the batch-sliced segments' times measured on the device, slice count by slice count"]
    result = TraceResult(spec, trace.built, trace.cost_model, trace.capture_seconds, trace.total_seconds, header)
    spec.source = result.text()
    return result
