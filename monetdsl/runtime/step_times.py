"""Step times: how long each implementation's runtime step takes on a real device.

``monetdsl trace --profile`` (and ``optimize(..., profile=True)``) replace the roofline
estimates with times measured here. What is timed is exactly what the runtime will run:
the step functions of :mod:`monetdsl.runtime.program` (the captured aten call for
PyTorch's own forward, its local backward graph, the custom ops of the other
alternatives, a recomputation from the saved statistics, mask or seed), not the
catalogue's reference formulas, which are written for clarity and can be several times
slower than the kernels that really run (layer norm's reference forward took 15x the
fused kernel's time on a GPT block; GELU's reference backward 9x).

Every op is timed on its own, on real tensors of the traced shapes and layouts: inputs
are random, the tensors an alternative derives (masks, statistics, indices) are what its
first forward produced, gradients are random. Only one op's tensors are alive at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..ir import Network
from ..tracing.profile import time_call
from .program import _backward_step, _forward_step, _OpLowering, value_nodes

__all__ = ["StepTimes", "time_steps"]


@dataclass
class StepTimes:
    """What :func:`time_steps` found: the network with measured times, and notes for
    implementations whose step could not be timed (they keep their previous time)."""

    network: Network
    notes: list[str] = field(default_factory=list)


def _random_like(val: torch.Tensor, device: str, positive: bool) -> torch.Tensor:
    """A real tensor with the traced value's shape, strides and dtype: floats random
    (positive, away from zero, for scales and variances), booleans all true, integers zero
    (a valid class, index or seed)."""
    out = torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype, device=device)
    if val.dtype.is_floating_point:
        return out.uniform_(0.5, 1.5) if positive else out.normal_()
    return out.fill_(True) if val.dtype == torch.bool else out.zero_()


class _OpValues(dict):
    """Tensors by IR name for one op, made on first use: random ones for what the op reads,
    and its outputs and derived tensors once a forward step has produced them."""

    _POSITIVE = frozenset({"w", "running_var", "rstd", "invstd"})

    def __init__(self, node_of: dict, device: str, role_of: dict):
        super().__init__()
        self.node_of, self.device, self.role_of = node_of, device, role_of

    def __missing__(self, name: str) -> torch.Tensor:
        if name.startswith("grad(") and name.endswith(")") and name not in self.node_of:
            value = torch.randn_like(self[name[5:-1]])
        else:
            value = _random_like(self.node_of[name].meta["val"], self.device, self.role_of.get(name) in self._POSITIVE)
        self[name] = value
        return value


def time_steps(built, device: str, repeats: int = 5) -> StepTimes:
    """Every implementation of every op of ``built`` (a
    :class:`~monetdsl.tracing.to_ir.BuiltNetwork` carrying its joint graph) timed on
    ``device``: first forward, recomputation (kept as ``recompute_time_us`` for
    alternatives whose recomputation reads saved tensors) and backward steps.
    Returns a new network; ``built`` is untouched."""
    network, report, node_of = built.network, StepTimes(built.network), value_nodes(built)
    if node_of is None:
        report.notes.append("not profiled: the trace carries no joint graph; roofline times kept")
        return report
    backward_of: dict[str, list] = {}
    for bop in network.backward_ops:
        backward_of.setdefault(bop.of, []).append(bop)
    forward_times: dict[tuple[str, str], tuple[float, float | None]] = {}
    backward_times: dict[tuple[str, str], float] = {}
    with torch.no_grad():
        for record in built.records:
            if not network.has_op(record.name):
                continue
            op = network.op(record.name)
            low = _OpLowering(record, built.facts, built.value_names, network)
            values = _OpValues(node_of, device, {n: r for r, n in low.role_names.items()})
            for impl in op.impls:
                try:
                    forward_times[(op.name, impl.name)] = _time_forward(low, op, impl, values, device, repeats)
                except Exception as exc:  # noqa: BLE001 - reported, never hidden
                    report.notes.append(f"{op.name} impl {impl.name}: not profiled ({type(exc).__name__}: {str(exc)[:80]}); time kept")
            for bop in backward_of.get(op.name, ()):
                for impl in bop.impls:
                    try:
                        step = _backward_step(low, bop, impl, first=impl.name == bop.impls[0].name)
                        reads = [values[n] for n in step.reads]
                        fn = step.with_scratch_targets(device)
                        backward_times[(bop.name, impl.name)] = time_call(lambda fn=fn, reads=reads: fn(*reads), device, repeats)
                    except Exception as exc:  # noqa: BLE001 - reported, never hidden
                        report.notes.append(f"{bop.name} impl {impl.name}: not profiled ({type(exc).__name__}: {str(exc)[:80]}); time kept")
            values.clear()

    def timed_forward(op, impl):
        if (op.name, impl.name) not in forward_times:
            return impl
        first, again = forward_times[(op.name, impl.name)]
        return replace(impl, time_us=first, recompute_time_us=again)

    report.network = network.with_impls(
        timed_forward, lambda op, i: replace(i, time_us=backward_times.get((op.name, i.name), i.time_us)))
    return report


def _time_forward(low, op, impl, values: _OpValues, device: str, repeats: int) -> tuple[float, float | None]:
    """The first forward's time and, when the recomputation reads saved tensors, the
    recomputation's (on what this alternative's first forward derived). An in-place
    alternative gets a fresh copy of the input it overwrites before every run."""
    def arguments(step, own: dict) -> list:
        found = [own[n] if n in own else values[n] for n in step.reads]
        return [v.clone() if n == impl.overwrites else v for n, v in zip(step.reads, found)]

    def timed(step, own: dict) -> float:
        return time_call(lambda args: step.fn(*args), device, repeats, setup=lambda: arguments(step, own))

    first = _forward_step(low, op, impl, recompute=False)
    first_time = timed(first, {})
    results = first.fn(*arguments(first, {}))
    own = dict(zip(first.writes, results))
    for name, value in own.items():
        values.setdefault(name, value)  # what a backward alternative reads: the first alternative deriving it
    again = None
    if impl.recompute_reads:
        again = timed(_forward_step(low, op, impl, recompute=True), own)
    return first_time, again
